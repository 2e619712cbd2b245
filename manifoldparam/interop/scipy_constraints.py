"""Soft constraints as native scipy constraints, and scipy's multipliers back into them.

Each soft constraint of :mod:`manifoldparam.soft` becomes one scipy constraint over the flat
coordinate vector (``fn == value`` an equality, ``fn <= max`` / ``fn >= min`` inequalities, one
row per element of ``fn``'s value, autograd Jacobians); after ``SLSQP`` and ``trust-constr``
each constraint's multiplier is set from scipy's, in the library's sign convention.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from manifoldparam.interop.flat import FlatObjective
from manifoldparam.soft.constraints import Constraint

__all__ = ["Placement", "copy_multipliers", "native_constraints", "scipy_constraints"]


# ------------------------------------------------------------------------ constraints
def _flat_jacobian(out: Tensor, params: Sequence[Tensor], size: int) -> np.ndarray:
    rows = []
    flat = out.reshape(-1)
    for i in range(flat.numel()):
        grads = torch.autograd.grad(flat[i], params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).reshape(-1).double().cpu()
                    for g, p in zip(grads, params, strict=True)
                ]
            )
        )
    return torch.stack(rows).numpy() if rows else np.zeros((0, size))


class _SoftConstraint:
    """One soft constraint's ``fn`` as a function of ``x``, with its Jacobian."""

    def __init__(self, constraint: Any, flat: FlatObjective) -> None:
        self.c = constraint
        self.flat = flat

    def values(self, x: np.ndarray) -> np.ndarray:
        self.flat.set_x(x)
        with torch.no_grad():
            out = self.c.evaluate().detach().reshape(-1).double().cpu().numpy()
        self.flat.check_finite(f"value of {self.c.describe()}", out, drop_point=True)
        return out

    def jac(self, x: np.ndarray) -> np.ndarray:
        self.flat.set_x(x)
        with torch.enable_grad():
            out = self.c.evaluate()
            jac = _flat_jacobian(out, self.flat.params, self.flat.size)
        self.flat.check_finite(f"Jacobian of {self.c.describe()}", jac, drop_point=True)
        return jac

    def hess(self, x: np.ndarray, v: np.ndarray) -> np.ndarray:
        """``∇²(v · fn)(x)`` as a dense matrix (trust-constr's constraint Hessian)."""
        self.flat.set_x(x)
        params = self.flat.params
        vt = torch.as_tensor(np.asarray(v, dtype=np.float64))
        with torch.enable_grad():
            out = self.c.evaluate().reshape(-1)
            s = (out * vt.to(out)).sum()
            grads = torch.autograd.grad(s, params, create_graph=True, allow_unused=True)
            g = torch.cat(
                [
                    (gi if gi is not None else torch.zeros_like(p)).reshape(-1)
                    for gi, p in zip(grads, params, strict=True)
                ]
            )
            if not g.requires_grad:
                return np.zeros((self.flat.size, self.flat.size))
            h = _flat_jacobian(g, params, self.flat.size)
        return 0.5 * (h + h.T)

    def bounds(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """``(lower, upper)`` on ``fn``'s flattened value; ``None`` where unbounded."""
        c = self.c
        n = int(c.lmbda.numel())

        def full(t: Tensor) -> np.ndarray:
            return np.broadcast_to(t.detach().double().cpu().numpy().reshape(-1), (n,)).copy()

        rel = getattr(c, "relation", None)
        if rel == "==":
            v = full(torch.broadcast_to(c.value, c.lmbda.shape))
            return v, v
        if rel == "<=":
            return None, full(torch.broadcast_to(c.max, c.lmbda.shape))
        if rel == ">=":
            return full(torch.broadcast_to(c.min, c.lmbda.shape)), None
        if rel == "in":
            return (
                full(torch.broadcast_to(c.min, c.lmbda.shape)),
                full(torch.broadcast_to(c.max, c.lmbda.shape)),
            )
        raise TypeError(
            f"scipy_minimize: {type(c).__name__} has relation {rel!r}; only '==', '<=', '>=' "
            "and 'in' map to scipy constraints."
        )


#: Where one soft constraint went in the list handed to scipy: (index, role) per entry, the
#: role being "nl" (a trust-constr NonlinearConstraint), "eq", "upper" (max - fn >= 0) or
#: "lower" (fn - min >= 0).
Placement = list[tuple[int, str]]


def scipy_constraints(constraints: Iterable[Any], flat: FlatObjective, method: str) -> list[Any]:
    """Soft constraints as native scipy constraints for ``method`` (scipy objects pass through).

    ``trust-constr`` gets :class:`scipy.optimize.NonlinearConstraint` objects with autograd
    Jacobians and Hessians; ``SLSQP`` / ``COBYLA`` / ``COBYQA`` get ``{"type": "eq"|"ineq"}``
    dicts (``fun(x) >= 0`` for inequalities), with Jacobians for SLSQP.
    """
    return native_constraints(constraints, flat, method)[0]


def native_constraints(
    constraints: Iterable[Any], flat: FlatObjective, method: str
) -> tuple[list[Any], list[tuple[Any, Placement]]]:
    from scipy.optimize import NonlinearConstraint

    out: list[Any] = []
    placed: list[tuple[Any, Placement]] = []
    for c in constraints:
        if not isinstance(c, Constraint):
            out.append(c)  # a scipy constraint already
            continue
        sc = _SoftConstraint(c, flat)
        lo, hi = sc.bounds()
        where: Placement = []
        placed.append((c, where))
        if method == "trust-constr":
            lb = -np.inf if lo is None else lo
            ub = np.inf if hi is None else hi
            where.append((len(out), "nl"))
            out.append(NonlinearConstraint(sc.values, lb, ub, jac=sc.jac, hess=sc.hess))
            continue
        if lo is not None and hi is not None and np.array_equal(lo, hi):
            where.append((len(out), "eq"))
            out.append(
                {"type": "eq", "fun": lambda x, sc=sc, v=lo: sc.values(x) - v, "jac": sc.jac}
            )
            continue
        if hi is not None:
            where.append((len(out), "upper"))
            out.append(
                {
                    "type": "ineq",
                    "fun": lambda x, sc=sc, v=hi: v - sc.values(x),
                    "jac": lambda x, sc=sc: -sc.jac(x),
                }
            )
        if lo is not None:
            where.append((len(out), "lower"))
            out.append(
                {"type": "ineq", "fun": lambda x, sc=sc, v=lo: sc.values(x) - v, "jac": sc.jac}
            )
    if method in ("cobyla", "cobyqa"):
        for d in out:
            if isinstance(d, dict):
                d.pop("jac", None)
    return out, placed


# ------------------------------------------------------------------------ multipliers back
def _slsqp_rows(con: Any, x: np.ndarray) -> list[tuple[str, int]]:
    """``(type, rows)`` of the old-style entries SLSQP makes of one constraint, in its order
    (scipy's ``new_constraint_to_old``: the equality rows, then the inequality rows)."""
    if isinstance(con, dict):
        return [(con["type"], int(np.atleast_1d(con["fun"](x, *con.get("args", ()))).size))]
    from scipy.optimize import LinearConstraint

    if isinstance(con, LinearConstraint):
        m = int(con.A.shape[0])  # 2-D (dense or sparse) after scipy's validation
    else:
        m = int(np.atleast_1d(con.fun(x)).size)
    lb = np.broadcast_to(np.asarray(con.lb, dtype=float), (m,))
    ub = np.broadcast_to(np.asarray(con.ub, dtype=float), (m,))
    eq = lb == ub
    ineq = int(np.sum((lb != -np.inf) ^ eq) + np.sum((ub != np.inf) ^ eq))
    return [(t, n) for t, n in (("eq", int(eq.sum())), ("ineq", ineq)) if n]


def _slsqp_offsets(out: list[Any], x: np.ndarray, total: int) -> dict[int, int] | None:
    """First row in SLSQP's ``result.multipliers`` of each entry of ``out`` (``None`` when the
    rows do not add up to ``total``). SLSQP orders all equality rows before all inequality
    rows; a scipy object split in two has its second part appended after the list."""
    entries: list[tuple[int, str, int]] = []
    appended: list[tuple[int, str, int]] = []
    for i, con in enumerate(out):
        parts = _slsqp_rows(con, x)
        entries += [(i, *p) for p in parts[:1]]
        appended += [(i, *p) for p in parts[1:]]
    offsets: dict[int, int] = {}
    row = 0
    for kind in ("eq", "ineq"):
        for i, t, n in [*entries, *appended]:
            if t == kind:
                offsets.setdefault(i, row)
                row += n
    return offsets if row == total else None


def _signed_slope(constraint: Any, lo: np.ndarray | None, hi: np.ndarray | None) -> np.ndarray:
    """``∂c/∂fn`` of the constraint's signed value ``c`` (its ``infeasibility``) on the violated
    side, per element: -1 for ``value - fn``, ``max - fn`` and the clamp kinds, +1 for
    ``fn - min`` (MinConstraint)."""
    point = hi + 1.0 if hi is not None else lo - 1.0  # type: ignore[operator]
    lam = constraint.lmbda
    t = torch.as_tensor(point, dtype=lam.dtype, device=lam.device).reshape(lam.shape)
    t.requires_grad_()
    with torch.enable_grad():
        (slope,) = torch.autograd.grad(constraint.infeasibility(t).sum(), t)
    return slope.detach().reshape(-1).double().cpu().numpy()


@torch.no_grad()
def _set_multiplier(constraint: Any, w: np.ndarray, flat: FlatObjective) -> None:
    """Set ``λ`` from scipy's multiplier ``w`` in the form ``∇f + Σ w ∇fn = 0``.

    The library's Lagrangian ``f + scale·λ·c(fn)`` is stationary where
    ``∇f + scale·λ·(∂c/∂fn)·∇fn = 0``, so ``λ = w / (scale·∂c/∂fn)``; the inequality kinds'
    multipliers are kept ``<= 0`` as :func:`~manifoldparam.soft.dual_update` keeps them.
    """
    lo, hi = _SoftConstraint(constraint, flat).bounds()
    denom = float(constraint.scale) * _signed_slope(constraint, lo, hi)
    lam = constraint.lmbda
    old = lam.detach().reshape(-1).double().cpu().numpy()
    new = np.where(denom != 0, w / np.where(denom != 0, denom, 1.0), old)
    value = torch.as_tensor(new, dtype=lam.dtype, device=lam.device).reshape(lam.shape)
    if constraint.nonpositive_multiplier:
        value = value.clamp(max=0)
    lam.copy_(value)
    lam.grad = None


def copy_multipliers(
    result: Any,
    method: str,
    out: list[Any],
    placed: list[tuple[Any, Placement]],
    flat: FlatObjective,
) -> None:
    """Write scipy's Lagrange multipliers into the soft constraints (trust-constr, SLSQP)."""
    if not placed:
        return
    if method == "trust-constr":
        vs = getattr(result, "v", None)  # ∇f + Σ Jᵢᵀ vᵢ = 0 at the solution
        if vs is None:
            return
        for con, where in placed:
            (i, _), *_ = where
            _set_multiplier(con, np.asarray(vs[i], dtype=np.float64).reshape(-1), flat)
    elif method == "slsqp":
        mult = getattr(result, "multipliers", None)  # ∇f - Σ μᵢ ∇fun_i = 0 at the solution
        if mult is None:
            return
        mult = np.asarray(mult, dtype=np.float64)
        offsets = _slsqp_offsets(out, result.x, mult.size)
        if offsets is None:
            warnings.warn(
                "scipy_minimize: could not match SLSQP's multipliers to the constraints; "
                "the soft constraints' multipliers were left unchanged.",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        for con, where in placed:
            n = int(con.lmbda.numel())
            w = np.zeros(n)
            for i, role in where:
                mu = mult[offsets[i] : offsets[i] + n]
                # eq: fun = fn - v; lower: fn - min >= 0 (∇fun = ∇fn); upper: max - fn >= 0
                w += mu if role == "upper" else -mu
            _set_multiplier(con, w, flat)
