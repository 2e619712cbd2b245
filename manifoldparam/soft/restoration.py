r"""Feasibility restoration: one Gauss–Newton step onto the constraint set, after the step.

A first-order optimizer (Adam above all) keeps moving the parameters by about its learning
rate in every direction, the constraints' included, so the multipliers alone hold the
violation near ``lr``-sized values at best (mdmm on the issue-4 MLP: 6e-3 at damping 10).
Once the multipliers have brought the iterate *near* the feasible set, this step removes
the remaining violation to second order: with :math:`r = \Pi(\mathrm{fn}) - \mathrm{fn}`
the true infeasibilities of the active constraints (every equality; each violated
inequality) and :math:`J = \partial\,\mathrm{fn} / \partial\theta`,

.. math::

    \theta \leftarrow \theta + J^\top (J J^\top + \epsilon I)^{-1} r ,

the smallest change that meets the linearised constraints. It is applied only while the
largest violation is below ``within`` (default 0.1: far from the set a linearisation jumps
to a poor point, so the multipliers bring the iterate there first), decided on the device
with no host sync; switching it on early, while the learning rate is still large, lets the
optimizer recover the loss along the constraint set. Cost: one backward through each constraint
function, batched over its elements (not the model's forward, for constraints on weights).

It never writes a non-finite value and never moves a parameter when it does not apply: the
step is taken only if the gate is open *and* the step is finite everywhere, else every
parameter keeps its exact bits (both decided on the device, no host sync). Inactive
constraints (satisfied inequalities) contribute exactly nothing, even where their gradient
is NaN (``sqrt(Σw²)`` at ``w = 0``). An *active* constraint with a non-finite gradient makes
the whole step be skipped (a partial Gauss–Newton step would not meet the others either).

Example (after every Adam step)::

    opt.step()
    restore_feasibility(mdmm)            # constraints declared with constrain()
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor
from torch.nn.utils import parametrize

from manifoldparam.soft.constraints import Constraint

__all__ = ["restore_feasibility", "tangent_gradients"]


def _leaves(constraints: Sequence[Constraint]) -> list[Tensor]:
    out: dict[int, Tensor] = {}
    for c in constraints:
        if c.target is None:
            raise ValueError(
                f"restore_feasibility: {c.describe()} is not declared on a module attribute, "
                "so its parameters are unknown; pass params=[...] (the tensors fn reads)."
            )
        module, name = c.target
        if parametrize.is_parametrized(module, name):
            plist = module.parametrizations[name]
            leaves = [
                t for n, t in plist.named_parameters(recurse=False) if n.startswith("original")
            ]
        else:
            leaves = [getattr(module, name)]
        for t in leaves:
            if t.requires_grad:
                out[id(t)] = t
    return list(out.values())


def restore_feasibility(
    constraints: Iterable[Constraint],
    params: Iterable[Tensor] | None = None,
    *,
    within: float = 1e-1,
    levenberg: float = 1e-2,
    eps: float = 1e-12,
    iters: int = 1,
    keep_sign: bool = False,
) -> Tensor:
    r"""Gauss–Newton steps onto the constraints, in place; returns the prior violation.

    Args:
        constraints: an :class:`~manifoldparam.soft.MDMM` or any iterable of constraints.
        params: the leaf tensors to move (default: those behind the constrained attributes:
            the attribute itself, or the ``original`` of a hard constraint on it).
        within: apply the step only when the largest violation is below this
            (``float('inf')``: always).
        levenberg: Levenberg–Marquardt damping of the ``m×m`` solve, relative to the mean
            of ``diag(JJᵀ)``: a direction where the constraints' gradients are nearly
            parallel is corrected over several steps instead of by one large jump.
        eps: Tikhonov term of the solve (m = number of constraint elements).
        iters: Gauss–Newton steps to take (each re-linearised at the last one's point).
        keep_sign: no element crosses zero in a step: one that would stops at 0. For
            constraints with a kink at 0 (``mean|W|``, an L1 budget), where the step,
            linearised on one side of the kink, overshoots and flips small weights instead
            of zeroing them. An element at 0 has a zero gradient of ``|w|`` and stays there,
            so with ``iters`` > 1 on an L1 budget the steps are Michelot's algorithm: the
            soft-threshold projection onto the L1 ball, exact after a few steps.

    Returns:
        The largest violation before the first step, a 0-dim tensor (no host sync).

    Raises:
        ValueError: a constraint not declared on a module attribute and no ``params``,
            or ``iters`` < 1.

    Nothing moves (bit for bit) when the largest violation is not below ``within`` (NaN
    included) or when the step would not be finite everywhere.

    Example (:math:`\mathrm{mean}|W| = 1` on a layer: the step
    :math:`\theta + J^\top (J J^\top + \mu I)^{-1} r` removes all of the violation but the
    Levenberg share :math:`\mu / (JJ^\top + \mu)`, 1%):
        >>> layer = nn.Linear(4, 4)
        >>> with torch.no_grad():
        ...     _ = layer.weight.fill_(0.98)
        >>> mdmm = mp.MDMM([mp.constrain(layer, "weight", mp.soft.mean_abs, eq=1.0)])
        >>> round(float(mp.soft.restore_feasibility(mdmm)), 6)     # the violation before
        0.02
        >>> round(1 - float(layer.weight.abs().mean()), 4)          # after: 1% of it
        0.0002
    """
    constraints = list(constraints)
    if not constraints:
        return torch.zeros(())
    if iters < 1:
        raise ValueError(f"restore_feasibility(iters={iters}): take at least one step.")
    leaves = list(params) if params is not None else _leaves(constraints)
    worst = _step(constraints, leaves, within, levenberg, eps, keep_sign)
    for _ in range(iters - 1):
        _step(constraints, leaves, within, levenberg, eps, keep_sign)
    return worst


def _step(
    constraints: Sequence[Constraint],
    leaves: Sequence[Tensor],
    within: float,
    levenberg: float,
    eps: float,
    keep_sign: bool,
) -> Tensor:
    with torch.enable_grad():
        fns = [c.evaluate() for c in constraints]
    with torch.no_grad():
        pairs = list(zip(constraints, [v.detach() for v in fns], strict=True))
        viols = [c.violation(v).reshape(-1) for c, v in pairs]
        r = torch.cat(viols)
        active = torch.cat(
            [
                torch.ones_like(v, dtype=torch.bool) if c.always_active else v != 0
                for c, v in zip(constraints, viols, strict=True)
            ]
        )
        worst = r.abs().amax()
    # One batched backward per constraint, not one for all: in a shared backward a satisfied
    # constraint's 0·inf (the gradient of sqrt(Σw²) at w = 0 times a zero row of grad_outputs)
    # is NaN and lands in the rows of every other constraint on the same tensors.
    blocks = []
    for v in fns:
        n = v.numel()
        if n == 1:  # a plain backward: cheaper than a batch of one
            g = torch.autograd.grad(v.reshape(()), leaves, allow_unused=True, retain_graph=True)
        else:
            g = torch.autograd.grad(
                v.reshape(-1),
                leaves,
                grad_outputs=torch.eye(n, dtype=v.dtype, device=v.device),
                is_grads_batched=True,
                allow_unused=True,
                retain_graph=True,  # constraints on one attribute share its parametrization
            )
        blocks.append([None if gi is None else gi.reshape(n, -1) for gi in g])
    m = int(active.numel())
    with torch.no_grad():
        used = []
        for j, p in enumerate(leaves):
            if all(b[j] is None for b in blocks):
                continue
            col = torch.cat(
                [
                    p.new_zeros(v.numel(), p.numel()) if b[j] is None else b[j]
                    for b, v in zip(blocks, fns, strict=True)
                ]
            )
            # Bool, applied with torch.where, never as a 0/1 factor: 0·NaN is NaN, so an
            # inactive constraint whose gradient is NaN would otherwise poison the solve.
            used.append((p, torch.where(active[:, None], col, 0.0)))
        if not used:
            return worst
        jac = torch.cat([g for _, g in used], dim=1)
        eye = torch.eye(m, dtype=jac.dtype, device=jac.device)
        r = torch.where(active, r, 0.0)
        gram = jac @ jac.mT
        # Levenberg–Marquardt: nearly parallel constraint gradients (mean|W| and ‖W‖ of one
        # layer) would otherwise turn a small violation into a large jump.
        lm = levenberg * gram.diagonal().sum() / active.sum().clamp_min(1)
        gram = gram + torch.diag((~active).to(gram.dtype)) + (lm + eps) * eye
        # solve_ex: no error check, so no host sync (gram is SPD plus (lm + eps)·I).
        alpha = torch.linalg.solve_ex(gram, r)[0]
        steps = [(p, (alpha @ g).reshape(p.shape)) for p, g in used]
        # Decided on the device (no host sync): the gate (near the set), and a step that is
        # finite everywhere (a NaN Jacobian row of an active constraint, an overflow). With
        # either false every parameter keeps its exact bits (where, not p + 0·step).
        ok = (worst < within) & torch.stack([torch.isfinite(s).all() for _, s in steps]).all()
        for p, s in steps:
            new = p + s
            if keep_sign:  # stop at the kink: an element that would change sign becomes 0
                new = torch.where(new * p < 0, torch.zeros_like(new), new)
            p.copy_(torch.where(ok, new, p))
    return worst


def tangent_gradients(
    constraints: Iterable[Constraint],
    params: Iterable[Tensor] | None = None,
    *,
    within: float = 1e-1,
    near: float = 1e-4,
    eps: float = 1e-12,
) -> None:
    r"""Project the parameters' gradients onto the tangent space of the active constraints.

    With :math:`J` the Jacobian of the active constraints' values :math:`c`, in place:

    .. math::

        g \leftarrow g - J^\top (J J^\top + \epsilon I)^{-1} J g ,

    the gradient with the least-squares multiplier estimate's term removed: what is left moves
    the parameters *along* the constraints. Call it between ``backward()`` and
    ``opt.step()`` and :func:`restore_feasibility` after the step: the optimizer then spends
    its whole step (Adam's ``lr`` per coordinate, whose normaliser no longer sees the normal
    component) descending along the constraint set, and the restoration removes the
    curvature's second-order drift. Active: every equality, a violated inequality, and one
    within ``near`` of its bound whose descent direction ``-g`` points outside. Far from the
    set (the largest violation not below ``within``, as for :func:`restore_feasibility`)
    nothing changes: there the multipliers' normal component is what brings the iterate in.

    Args:
        constraints: an :class:`~manifoldparam.soft.MDMM` or any iterable of constraints.
        params: the leaf tensors whose ``.grad`` to project (as in
            :func:`restore_feasibility`).
        within: project only when the largest violation is below this.
        near: how close (in ``c``) to its bound a satisfied inequality counts as on it.
        eps: Tikhonov term of the solve.

    Raises:
        ValueError: a constraint not declared on a module attribute and no ``params``.

    Example (on :math:`x + y = 1` the gradient :math:`(-3.4, -0.6)` of
    :math:`(x-2)^2 + (y-1)^2` at :math:`(0.3, 0.7)` loses its mean, :math:`-2`, along the
    normal :math:`(1, 1)`):
        >>> xy = nn.Parameter(torch.tensor([0.3, 0.7], dtype=torch.float64))
        >>> line = mp.EqConstraint(lambda: xy.sum(), 1.0, dtype=torch.float64)
        >>> ((xy - torch.tensor([2.0, 1.0], dtype=torch.float64)) ** 2).sum().backward()
        >>> mp.soft.tangent_gradients([line], [xy])
        >>> [round(float(g), 6) for g in xy.grad]
        [-1.4, 1.4]
    """
    constraints = list(constraints)
    leaves = list(params) if params is not None else _leaves(constraints)
    leaves = [p for p in leaves if p.grad is not None]
    if not constraints or not leaves:
        return
    rows, masks, worst = [], [], []
    for con in constraints:
        with torch.enable_grad():
            value = con.evaluate()
            c = con.infeasibility(value).reshape(-1)
        worst.append(con.violation(value.detach()).abs().amax())
        n = c.numel()
        g = torch.autograd.grad(
            c,
            leaves,
            grad_outputs=torch.eye(n, dtype=c.dtype, device=c.device),
            is_grads_batched=True,
            allow_unused=True,
        )
        jac = torch.cat(
            [
                p.new_zeros(n, p.numel()) if gi is None else gi.reshape(n, -1)
                for p, gi in zip(leaves, g, strict=True)
            ],
            dim=1,
        )
        if con.always_active:
            mask = torch.ones(n, dtype=torch.bool, device=c.device)
        else:
            grad = torch.cat([p.grad.reshape(-1) for p in leaves])
            # c >= 0 is feasible: -g lowers c (points outside) where J·g > 0.
            mask = (c.detach() < 0) | ((c.detach() < near) & (jac @ grad > 0))
        rows.append(torch.where(mask[:, None], jac, 0.0))
        masks.append(mask)
    with torch.no_grad():
        jac = torch.cat(rows)
        mask = torch.cat(masks)
        grad = torch.cat([p.grad.reshape(-1) for p in leaves])
        gram = (
            jac @ jac.mT
            + torch.diag((~mask).to(jac.dtype))
            + eps * torch.eye(len(mask), dtype=jac.dtype, device=jac.device)
        )
        alpha = torch.linalg.solve_ex(gram, jac @ grad)[0]
        step = alpha @ jac
        ok = torch.isfinite(step).all() & (torch.stack(worst).amax() < within)
        i = 0
        for p in leaves:
            k = p.numel()
            p.grad.copy_(torch.where(ok, p.grad - step[i : i + k].reshape(p.shape), p.grad))
            i += k
