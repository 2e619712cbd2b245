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
largest violation is below ``within`` (far from the set, a linearisation jumps to a poor
point), decided on the device with no host sync. Cost: one batched backward through the
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
    within: float = 1e-2,
    eps: float = 1e-12,
) -> Tensor:
    """One Gauss–Newton step onto the constraints, in place; returns the prior violation.

    Args:
        constraints: an :class:`~manifoldparam.soft.MDMM` or any iterable of constraints.
        params: the leaf tensors to move (default: those behind the constrained attributes:
            the attribute itself, or the ``original`` of a hard constraint on it).
        within: apply the step only when the largest violation is below this
            (``float('inf')``: always).
        eps: Tikhonov term of the ``m×m`` solve (m = number of constraint elements).
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
        active = torch.cat([
            (torch.ones_like(v) if not c.nonpositive_multiplier else (c.violation(v) != 0))
            .to(v.dtype)
            .reshape(-1)
            for c, v in pairs
        ])
        worst = r.abs().amax()
    vec = torch.cat([v.reshape(-1) for v in fns])
    m = vec.numel()
    eye = torch.eye(m, dtype=vec.dtype, device=vec.device)
    grads = torch.autograd.grad(
        vec, leaves, grad_outputs=eye, is_grads_batched=True, allow_unused=True
    )
    with torch.no_grad():
        rows = [g.reshape(m, -1) for g in grads if g is not None]
        if not rows:
            return worst
        jac = torch.cat(rows, dim=1) * active[:, None]
        gram = jac @ jac.mT + torch.diag(1 - active) + eps * eye
        alpha = torch.linalg.solve(gram, r) * (worst < within).to(r.dtype)
        for p, g in zip(leaves, grads, strict=True):
            if g is not None:
                p.add_((alpha @ g.reshape(m, -1)).reshape(p.shape))
    return worst
