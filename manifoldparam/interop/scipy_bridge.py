r"""Minimise a model's objective with :func:`scipy.optimize.minimize`.

The variables are the flat vector of the model's trainable tensors -- for a constrained
model, the unconstrained coordinates (``...parametrizations.<name>.original``), so every
point scipy tries maps onto the constraint sets: hard constraints hold at every iterate.
Gradients come from autograd; Hessian-vector products (``Newton-CG``, ``trust-ncg``,
``trust-krylov``, ``trust-constr``) from a double backward; the dense Hessian
(``dogleg``, ``trust-exact``) from ``d`` of them.

Soft constraints (:mod:`manifoldparam.soft`) can be handed to ``SLSQP``, ``trust-constr``,
``COBYLA`` and ``COBYQA`` as *native* scipy constraints (``fn == value`` an equality,
``fn <= max`` / ``fn >= min`` inequalities, one row per element of ``fn``'s value, with
autograd Jacobians). After ``trust-constr`` (``result.v``) and ``SLSQP``
(``result.multipliers``) each constraint's multiplier holds scipy's Lagrange multiplier in
the library's sign convention, so training can go on with MDMM or the method of
multipliers from scipy's solution. With any other method use the method of multipliers:
minimise ``mdmm(loss).value`` and call :func:`manifoldparam.soft.dual_update` between solves.

Example::

    import manifoldparam as mp

    def objective():
        return loss_fn(model(x), y)

    res = mp.scipy_minimize(objective, model, method="trust-ncg")
    # model now holds res.x; model.weight is still orthogonal

    mdmm = MDMM(soft_constraints(model))
    res = mp.scipy_minimize(objective, model, method="SLSQP", constraints=mdmm)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn

from manifoldparam.interop.compile import check_second_order, explain_double_backward_error
from manifoldparam.interop.flat import (
    FlatObjective,
    NonFiniteError,
    trainable,
)
from manifoldparam.interop.scipy_constraints import (
    Placement,
    copy_multipliers,
    native_constraints,
)

__all__ = ["scipy_minimize"]

#: scipy methods that take ``hessp`` (Hessian-vector products).
HESSP_METHODS = frozenset({"newton-cg", "trust-ncg", "trust-krylov", "trust-constr"})
#: scipy methods that need the dense Hessian ``hess``.
HESS_METHODS = frozenset({"dogleg", "trust-exact"})
#: scipy methods that take gradients (``jac=True``).
GRADIENT_FREE = frozenset({"nelder-mead", "powell", "cobyla", "cobyqa"})
#: scipy methods that accept general nonlinear constraints.
CONSTRAINED_METHODS = frozenset({"slsqp", "trust-constr", "cobyla", "cobyqa"})


# ------------------------------------------------------------------------ the entry point
def scipy_minimize(
    objective: Callable[[], Tensor],
    params: nn.Module | Iterable[Tensor],
    *,
    method: str = "L-BFGS-B",
    constraints: Iterable[Any] = (),
    **kwargs: Any,
) -> Any:
    r"""Minimise ``objective()`` over ``params`` with :func:`scipy.optimize.minimize`.

    Args:
        objective: a zero-argument callable returning a scalar tensor computed from the
            parameters (a torchmin-style closure: no ``backward()`` inside).
        params: a module (its trainable parameters: for a constrained model, the unconstrained
            coordinates) or an iterable of tensors.
        method: any :func:`scipy.optimize.minimize` method. Gradients are passed to every
            gradient-based method, Hessian-vector products to ``Newton-CG``, ``trust-ncg``,
            ``trust-krylov`` and ``trust-constr``, the dense Hessian to ``dogleg`` and
            ``trust-exact``.
        constraints: soft constraints (an ``MDMM``, or :class:`manifoldparam.soft.Constraint`
            objects, e.g. ``soft_constraints(model)``), turned into native scipy constraints
            for ``SLSQP`` / ``trust-constr`` / ``COBYLA`` / ``COBYQA``; scipy constraint objects
            pass through unchanged. After ``SLSQP`` and ``trust-constr`` each soft
            constraint's multiplier (``constraint.lmbda``) is set from scipy's Lagrange
            multipliers (COBYLA / COBYQA return none: left unchanged).
        **kwargs: passed to :func:`scipy.optimize.minimize` (``options=``, ``tol=``,
            ``bounds=``, ``callback=`` ...).

    Returns:
        scipy's ``OptimizeResult``; ``params`` hold ``result.x`` afterwards (float64
        arithmetic in scipy, cast back to each tensor's dtype). ``result.nhev`` counts the
        Hessian-vector products. A NaN/Inf objective, gradient, Hessian-vector product or
        soft constraint value/Jacobian at any evaluation stops the run: ``success=False``,
        ``status=-1``, ``result.nonfinite`` says what was not finite and ``message`` names
        it; ``result.x`` is the best finite point evaluated (the last finite one when there
        are constraints) and the multipliers are left unchanged.

    Raises:
        ValueError: constraints given to a method that takes none (use the method of
            multipliers), or ``params`` with no trainable tensor.
        TypeError: a second-order method on a compiled module
            (:func:`~manifoldparam.interop.check_second_order`).

    Multipliers, in the library's sign convention (the Lagrangian ``f + scale·λ·c`` with
    ``c = value - fn``, ``max - fn``, ``fn - min`` or ``clamp(fn) - fn``, stationary at the
    solution): for ``min x² + y² s.t. x + y == 1``, ``λ = 1``; a binding ``MaxConstraint`` /
    ``MinConstraint`` gets ``λ < 0``, one that does not bind ``λ = 0``; the clamp kinds keep
    mdmm's signs (``MinConstraintHard``: ``λ > 0``). ``dual_update`` and
    ``mdmm(loss).value`` then continue from scipy's solution instead of from ``λ = 0``.

    Example (:math:`\min x^2 + y^2` s.t. :math:`x + y = 1`: the solution
    :math:`(1/2, 1/2)` with :math:`\lambda = 1`):
        >>> p = torch.zeros(2, requires_grad=True)
        >>> c = mp.EqConstraint(lambda: p.sum(), 1.0)
        >>> res = mp.scipy_minimize(lambda: (p**2).sum(), [p], method="SLSQP", constraints=[c])
        >>> [round(v, 4) for v in p.tolist()], round(float(c.lmbda.detach()), 4)
        ([0.5, 0.5], 1.0)
    """
    from scipy.optimize import minimize

    m = method.lower()
    tensors = trainable(params)
    if m in HESSP_METHODS or m in HESS_METHODS:
        if isinstance(params, nn.Module):
            check_second_order(params, method)
    constraints = list(constraints)
    if constraints and m not in CONSTRAINED_METHODS:
        raise ValueError(
            f"scipy_minimize(method={method!r}) takes no constraints; scipy's SLSQP, "
            "trust-constr, COBYLA and COBYQA do. With this method use the method of "
            "multipliers instead: minimise mdmm(loss).value and call "
            "manifoldparam.soft.dual_update(mdmm) between solves."
        )
    for k in ("jac", "hess", "hessp"):
        if k in kwargs:
            raise TypeError(
                f"scipy_minimize computes {k}= with autograd; do not pass it (call "
                "scipy.optimize.minimize yourself with FlatObjective for a custom one)."
            )
    flat = FlatObjective(objective, tensors)
    x0 = flat.x0()
    extra: dict[str, Any] = {}
    if m in GRADIENT_FREE:
        fun: Callable[..., Any] = flat.fun
    else:
        fun = flat.fun_and_grad
        extra["jac"] = True
    if m in HESSP_METHODS:
        extra["hessp"] = flat.hessp
    elif m in HESS_METHODS:
        extra["hess"] = flat.hess
    placed: list[tuple[Any, Placement]] = []
    if constraints:
        extra["constraints"], placed = native_constraints(constraints, flat, m)
    try:
        result = minimize(fun, x0, method=method, **extra, **kwargs)
    except NonFiniteError as err:
        result = _nonfinite_result(err, flat, method, constrained=bool(constraints))
    except RuntimeError as err:
        new = explain_double_backward_error(err, method)
        if new is err:
            raise
        raise new from err
    flat.set_x(result.x)
    result.nhev = flat.nhev
    if placed and result.success:
        copy_multipliers(result, m, extra["constraints"], placed, flat)
    return result


def _nonfinite_result(
    err: NonFiniteError, flat: FlatObjective, method: str, constrained: bool
) -> Any:
    """The failed result of a run stopped at a non-finite value: at the best finite point
    evaluated (the last finite one with constraints, where a lower objective may be
    infeasible), or at ``x0`` when no evaluation was finite."""
    from scipy.optimize import OptimizeResult

    kept = flat.last_finite if constrained else flat.best
    if kept is None:
        x, fun, where = flat.x0(), float("nan"), "the starting point (no evaluation was finite)"
    else:
        fun, x = kept
        which = "last finite point evaluated" if constrained else "best finite point evaluated"
        where = f"the {which} (objective {fun:.6g})"
    return OptimizeResult(
        x=x,
        fun=fun,
        success=False,
        status=-1,
        message=(
            f"scipy_minimize(method={method!r}): {err}; stopped there, because scipy does not "
            "stop at a non-finite value (L-BFGS-B would report convergence at it). The "
            f"parameters hold {where}. Check the objective's domain (sqrt or log of a "
            "negative number, a division by zero, an overflow) or keep the search inside it "
            "(bounds=, a hard constraint)."
        ),
        nfev=flat.nfev,
        nit=None,
        nonfinite=err.what,
    )
