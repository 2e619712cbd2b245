r"""The method of multipliers: a closed-form dual update between primal solves.

For optimizers that line-search or build a Hessian (LBFGS, BFGS, torchmin, scipy) the
multipliers must *not* be among the optimized variables: the Lagrangian is linear in them,
so a line search or a quasi-Newton model diverges (λ → ±∞). Instead (Hestenes 1969, Powell
1969; Bertsekas 1982):

1. minimise the augmented Lagrangian :math:`\mathcal{L}(\theta, \lambda_k)` over
   :math:`\theta` at fixed multipliers (``mdmm(loss).value``; damping is the penalty ρ);
2. update the multipliers in closed form,

   .. math::

       \lambda_{k+1} = \Pi\big(\lambda_k + \eta\, c(\theta_{k+1})\big), \qquad
       \eta = \rho \ \text{(default)} \quad\text{or}\quad
       \eta = \min\big(\beta, \gamma / \lVert c \rVert\big) \ \text{(iALM's adaptive step)},

   with :math:`\Pi` the projection onto :math:`\lambda \le 0` for ``MaxConstraint`` /
   ``MinConstraint`` (mdmm's sign) and the identity otherwise. At the minimiser,
   :math:`\nabla f + \mathrm{scale}\,(\lambda_k + \rho c)\nabla c = 0`, so
   :math:`\lambda_k + \rho c` is the first-order multiplier estimate.

Example (min x² + y² s.t. x + y = 1 with LBFGS)::

    mdmm = MDMM([EqConstraint(lambda: x + y, 1.0, damping=10.0)])
    opt = torch.optim.LBFGS([x, y], line_search_fn="strong_wolfe")
    for _ in range(10):
        def closure():
            opt.zero_grad()
            value = mdmm(x**2 + y**2).value
            value.backward()
            return value
        opt.step(closure)
        dual_update(mdmm)

Called after every step of a first-order optimizer (with ``step`` small), the same update
is gradient descent-ascent with a closed-form dual step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from manifoldparam._device import value_readable
from manifoldparam.soft.constraints import Constraint, _is_compiling
from manifoldparam.soft.infeasible import observe

__all__ = ["dual_update"]


@torch.no_grad()
def dual_update(
    constraints: Iterable[Constraint],
    fn_values: Sequence[Tensor] | None = None,
    *,
    step: float | None = None,
    beta: float | None = None,
    gamma: float | None = None,
    check_infeasible: bool = True,
) -> Tensor:
    r"""Update every constraint's multiplier in place; return the largest true violation.

    Args:
        constraints: an :class:`~manifoldparam.soft.MDMM` or any iterable of constraints.
        fn_values: the constraint functions' values (e.g. ``mdmm(loss).fn_values``) to reuse
            instead of evaluating each ``fn`` again.
        step: the dual step :math:`\eta` for every constraint (default: each constraint's
            ``damping``, the classical method of multipliers).
        beta, gamma: the adaptive step :math:`\min(\beta, \gamma/\lVert c \rVert)` of the
            inexact ALM (Li et al. 2023), ``‖c‖`` over all constraints' true violations.
            Give both or neither.
        check_infeasible: watch the multipliers across calls; when over the last
            :data:`~manifoldparam.soft.infeasible.WINDOWS` calls they grew steadily while the
            violation did not fall, warn once (:class:`~manifoldparam.soft.InfeasibleWarning`)
            naming the constraints. One host read per call (``False``: none).

    Returns:
        The largest true violation over ``constraints`` before the update, a 0-dim tensor.

    Raises:
        ValueError: only one of ``beta``/``gamma``, both ``step`` and ``beta``, or
            ``fn_values`` of another length than ``constraints``.

    The multipliers' ``.grad`` is cleared: they are not optimized variables in this mode.

    Example:
        The method of multipliers with L-BFGS (which cannot ascend a multiplier itself) on
        :math:`\min \|w\|^2` s.t. :math:`w_1 + w_2 = 1` (solution :math:`w = (1/2, 1/2)`,
        :math:`\lambda = 1`): solve for :math:`w` at fixed :math:`\lambda`, then update.

        >>> w = nn.Parameter(torch.zeros(2))
        >>> mdmm = mp.MDMM([mp.EqConstraint(lambda: w.sum(), 1.0, damping=1.0)])
        >>> opt = torch.optim.LBFGS([w], max_iter=50, line_search_fn="strong_wolfe")
        >>> def closure():
        ...     opt.zero_grad()
        ...     value = mdmm((w**2).sum()).value
        ...     value.backward()
        ...     return value
        >>> for _ in range(30):
        ...     _ = opt.step(closure)
        ...     worst = mp.soft.dual_update(mdmm)
        >>> w.detach(), mdmm.multipliers()[0].detach(), bool(worst < 1e-4)
        (tensor([0.5000, 0.5000]), tensor(1.0000), True)
    """
    constraints = list(constraints)
    if (beta is None) != (gamma is None):
        raise ValueError("dual_update: give both beta and gamma (adaptive step) or neither.")
    if beta is not None and step is not None:
        raise ValueError("dual_update: pass either step= or beta=/gamma=, not both.")
    if fn_values is None:
        fn_values = [c.evaluate() for c in constraints]
    if len(fn_values) != len(constraints):
        raise ValueError(
            f"dual_update: {len(fn_values)} fn_values for {len(constraints)} constraints; pass "
            "the fn_values of the same MDMM's return."
        )
    pairs = list(zip(constraints, [v.detach() for v in fn_values], strict=True))
    if not pairs:
        return torch.zeros(())
    cs = [c.infeasibility(v) for c, v in pairs]
    viols = [c.violation(v) for c, v in pairs]
    worst = torch.stack([v.abs().amax() for v in viols]).amax()
    adaptive: Tensor | None = None
    if beta is not None:
        # ‖c‖ over the true violations: a satisfied inequality does not shrink the step.
        norm = torch.linalg.vector_norm(torch.cat([v.reshape(-1) for v in viols]))
        adaptive = torch.minimum(torch.as_tensor(beta), gamma / norm.clamp_min(1e-30))
    for con, c in zip(constraints, cs, strict=True):
        eta: Tensor | float = (
            adaptive if adaptive is not None else (con.damping if step is None else step)
        )
        con.lmbda.copy_(con.dual_target(c, eta))
        con.lmbda.grad = None
    if check_infeasible and not _is_compiling() and value_readable(worst):
        # One host read per call: dual_update runs between solves of an optimizer that reads
        # the loss on the host at every evaluation anyway.
        observe(constraints, viols, source="dual", steps=1, stacklevel=4)
    return worst
