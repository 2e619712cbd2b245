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
optimizer recover the loss along the constraint set. Cost: one batched backward through the
constraint functions (not the model's forward, for constraints on weights).

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

__all__ = ["restore_feasibility"]


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
) -> Tensor:
    """One Gauss–Newton step onto the constraints, in place; returns the prior violation.

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
    """
    constraints = list(constraints)
    if not constraints:
        return torch.zeros(())
    leaves = list(params) if params is not None else _leaves(constraints)
    with torch.enable_grad():
        fns = [c.evaluate() for c in constraints]
    with torch.no_grad():
        pairs = list(zip(constraints, [v.detach() for v in fns], strict=True))
        r = torch.cat([c.violation(v).reshape(-1) for c, v in pairs])
        active = torch.cat(
            [
                (torch.ones_like(v) if c.always_active else (c.violation(v) != 0))
                .to(v.dtype)
                .reshape(-1)
                for c, v in pairs
            ]
        )
        worst = r.abs().amax()
    vec = torch.cat([v.reshape(-1) for v in fns])
    m = vec.numel()
    eye = torch.eye(m, dtype=vec.dtype, device=vec.device)
    grads = torch.autograd.grad(
        vec, leaves, grad_outputs=eye, is_grads_batched=True, allow_unused=True
    )
    with torch.no_grad():
        used = [(p, g.reshape(m, -1)) for p, g in zip(leaves, grads, strict=True) if g is not None]
        if not used:
            return worst
        jac = torch.cat([g for _, g in used], dim=1) * active[:, None]
        gram = jac @ jac.mT
        # Levenberg–Marquardt: nearly parallel constraint gradients (mean|W| and ‖W‖ of one
        # layer) would otherwise turn a small violation into a large jump.
        lm = levenberg * gram.diagonal().sum() / active.sum().clamp_min(1)
        gram = gram + torch.diag(1 - active) + (lm + eps) * eye
        gate = (worst < within).to(r.dtype)
        # solve_ex: no error check, so no host sync (gram is SPD plus (lm + eps)·I).
        alpha = torch.linalg.solve_ex(gram, r)[0] * gate
        for p, g in used:
            p.add_((alpha @ g).reshape(p.shape))
    return worst
