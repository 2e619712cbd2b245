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

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from manifoldparam.hard.base import NonFiniteError as _NonFinite
from manifoldparam.interop.compile import check_second_order, explain_double_backward_error

__all__ = ["FlatObjective", "NonFiniteError", "scipy_constraints", "scipy_minimize"]

#: scipy methods that take ``hessp`` (Hessian-vector products).
HESSP_METHODS = frozenset({"newton-cg", "trust-ncg", "trust-krylov", "trust-constr"})
#: scipy methods that need the dense Hessian ``hess``.
HESS_METHODS = frozenset({"dogleg", "trust-exact"})
#: scipy methods that take gradients (``jac=True``).
GRADIENT_FREE = frozenset({"nelder-mead", "powell", "cobyla", "cobyqa"})
#: scipy methods that accept general nonlinear constraints.
CONSTRAINED_METHODS = frozenset({"slsqp", "trust-constr", "cobyla", "cobyqa"})


class NonFiniteError(_NonFinite):
    """The objective, its gradient, a Hessian-vector product or a soft constraint's value or
    Jacobian was NaN or infinite at a point scipy asked for (a
    :class:`manifoldparam.NonFiniteError`). :class:`FlatObjective` raises it;
    :func:`scipy_minimize` turns it into a failed result (``success=False``)."""

    def __init__(self, message: str, what: str, evaluation: int) -> None:
        super().__init__(message)
        #: what was not finite ("objective", "gradient", ..., or a constraint's description)
        self.what = what
        #: the objective evaluation count (``nfev``) when it happened
        self.evaluation = evaluation


def _describe_nonfinite(value: float | np.ndarray, sizes: Sequence[int] | None = None) -> str:
    """``nan``, ``inf`` or "NaN/Inf in 3 of 10 entries (first: entry 4 of tensor 1)"."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.size == 1:
        return str(float(arr.reshape(())))
    bad = np.flatnonzero(~np.isfinite(arr))
    where = f"entry {int(bad[0])}"
    if sizes is not None:
        ends = np.cumsum(sizes)
        t = int(np.searchsorted(ends, bad[0], side="right"))
        where = f"entry {int(bad[0] - (ends[t] - sizes[t]))} of tensor {t}"
    return f"NaN/Inf in {bad.size} of {arr.size} entries (first: {where})"


def _trainable(params: nn.Module | Iterable[Tensor]) -> list[Tensor]:
    if isinstance(params, nn.Module):
        found = [p for p in params.parameters() if p.requires_grad]
        where = f"{type(params).__name__}"
    else:
        found = list(params)
        where = "the tensors given"
    if not found:
        raise ValueError(
            f"scipy_minimize: {where} has no tensor with requires_grad=True; there is nothing "
            "to optimize."
        )
    seen: set[int] = set()
    out = []
    for p in found:
        if not isinstance(p, Tensor) or not p.is_floating_point() or p.is_complex():
            raise TypeError(
                f"scipy_minimize: every variable must be a real floating tensor, got "
                f"{type(p).__name__} {getattr(p, 'dtype', '')}."
            )
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


class FlatObjective:
    """A torch objective seen as a function of one flat float64 NumPy vector.

    ``x`` is the concatenation of ``params`` (flattened, in order). Each method first writes
    ``x`` into the tensors in place (under ``no_grad``, only when it changed, so version
    counters -- and with them caches -- see every change), then evaluates ``objective()``.
    Gradients use :func:`torch.autograd.grad`: the tensors' ``.grad`` is not touched.

    Example::

        f = FlatObjective(lambda: loss_fn(model(x), y), list(model.parameters()))
        value, grad = f.fun_and_grad(f.x0())
    """

    def __init__(self, objective: Callable[[], Tensor], params: Sequence[Tensor]) -> None:
        self.objective = objective
        self.params = list(params)
        self.sizes = [p.numel() for p in self.params]
        self.size = sum(self.sizes)
        self._x: np.ndarray | None = None
        self._versions: list[int] = []
        # (x bytes, gradient tuple with graph) for Hessian-vector products at one point
        self._graph: tuple[bytes, tuple[Tensor, ...]] | None = None
        self.nfev = 0
        self.nhev = 0
        #: ``(value, x)`` of the lowest finite objective evaluated, and ``(value, x)`` of the
        #: last evaluation whose value (and gradient, where computed) were finite.
        self.best: tuple[float, np.ndarray] | None = None
        self.last_finite: tuple[float, np.ndarray] | None = None
        self._before_last: tuple[float, np.ndarray] | None = None

    # -------------------------------------------------------------- vector <-> tensors
    def x0(self) -> np.ndarray:
        """The tensors' current values as one float64 vector."""
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1).double().cpu() for p in self.params])
        return flat.numpy().copy()

    def set_x(self, x: np.ndarray) -> None:
        """Write ``x`` into the tensors (skipped if it equals the last value written)."""
        x = np.asarray(x, dtype=np.float64)
        if x.shape != (self.size,):
            raise ValueError(f"expected a vector of {self.size} numbers, got shape {x.shape}")
        if (
            self._x is not None
            and np.array_equal(x, self._x)
            and self._versions == [p._version for p in self.params]
        ):
            return  # unchanged since we wrote it (nobody else wrote the tensors either)
        t = torch.from_numpy(x.copy())
        with torch.no_grad():
            for p, chunk in zip(self.params, t.split(self.sizes), strict=True):
                p.copy_(chunk.view_as(p))
        self._x = x.copy()
        self._versions = [p._version for p in self.params]
        self._graph = None

    def _flat(self, tensors: Sequence[Tensor | None]) -> np.ndarray:
        parts = [
            (g if g is not None else torch.zeros_like(p)).detach().reshape(-1).double().cpu()
            for g, p in zip(tensors, self.params, strict=True)
        ]
        return torch.cat(parts).numpy()

    def _value(self) -> Tensor:
        self.nfev += 1
        value = self.objective()
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise ValueError(
                "scipy_minimize: the objective must return a scalar tensor, got "
                f"{type(value).__name__}{tuple(getattr(value, 'shape', ()))}; reduce it first "
                "(e.g. .mean())."
            )
        return value.reshape(())

    def check_finite(
        self, what: str, value: float | np.ndarray, *, drop_point: bool = False
    ) -> None:
        """Raise :class:`NonFiniteError` if ``value`` (already on the host) holds NaN/Inf;
        ``drop_point``: the current point no longer counts as the best or last finite one (a
        constraint is not finite there, though the objective was).

        scipy does not stop at a NaN: L-BFGS-B reports convergence at the NaN point, COBYLA
        replaces it by 1e30 and reports success, trust-ncg raises from inside its norm."""
        if np.all(np.isfinite(value)):
            return
        if drop_point:
            self._forget_current_point()
        sizes = self.sizes if np.size(value) == self.size else None
        raise NonFiniteError(
            f"the {what} is {_describe_nonfinite(value, sizes)} at objective evaluation "
            f"{self.nfev}",
            what,
            self.nfev,
        )

    def _finite_point(self, value: float) -> None:
        x = self._x.copy() if self._x is not None else self.x0()
        if self.last_finite is not None and not np.array_equal(self.last_finite[1], x):
            self._before_last = self.last_finite
        self.last_finite = (value, x)
        if self.best is None or value < self.best[0]:
            self.best = (value, x)

    def _forget_current_point(self) -> None:
        """A constraint is not finite at the current point: it is neither best nor last."""
        x = self._x
        if x is None:
            return
        if self.last_finite is not None and np.array_equal(self.last_finite[1], x):
            self.last_finite, self._before_last = self._before_last, None
        if self.best is not None and np.array_equal(self.best[1], x):
            self.best = None

    # -------------------------------------------------------------- what scipy calls
    def fun(self, x: np.ndarray) -> float:
        """The objective's value at ``x`` (:class:`NonFiniteError` if it is NaN/Inf)."""
        self.set_x(x)
        with torch.no_grad():
            value = float(self._value())
        self.check_finite("objective", value)
        self._finite_point(value)
        return value

    def fun_and_grad(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        """The value and the gradient at ``x`` (scipy's ``jac=True`` convention);
        :class:`NonFiniteError` if either holds NaN/Inf."""
        self.set_x(x)
        with torch.enable_grad():
            value = self._value()
            grads = torch.autograd.grad(value, self.params, allow_unused=True)
        v = float(value.detach())
        self.check_finite("objective", v)
        g = self._flat(grads)
        self.check_finite("gradient", g)
        self._finite_point(v)
        return v, g

    def _grad_graph(self, x: np.ndarray) -> tuple[Tensor, ...]:
        self.set_x(x)
        key = self._x.tobytes() if self._x is not None else b""
        if self._graph is None or self._graph[0] != key:
            with torch.enable_grad():
                value = self._value()
                grads = torch.autograd.grad(
                    value, self.params, create_graph=True, allow_unused=True
                )
            grads = tuple(
                g if g is not None else torch.zeros_like(p)
                for g, p in zip(grads, self.params, strict=True)
            )
            self._graph = (key, grads)
        return self._graph[1]

    def hessp(self, x: np.ndarray, v: np.ndarray) -> np.ndarray:
        """The Hessian at ``x`` times ``v`` (autograd double backward)."""
        grads = self._grad_graph(x)
        self.nhev += 1
        vt = torch.from_numpy(np.asarray(v, dtype=np.float64).copy())
        vs = [c.view_as(p).to(p) for c, p in zip(vt.split(self.sizes), self.params, strict=True)]
        needs = [g.requires_grad for g in grads]
        if not any(needs):  # the objective is linear in every variable
            return np.zeros(self.size)
        with torch.enable_grad():
            hv = torch.autograd.grad(
                [g for g, n in zip(grads, needs, strict=True) if n],
                self.params,
                [u for u, n in zip(vs, needs, strict=True) if n],
                retain_graph=True,
                allow_unused=True,
            )
        out = self._flat(hv)
        self.check_finite("Hessian-vector product", out)
        return out

    def hess(self, x: np.ndarray) -> np.ndarray:
        """The dense Hessian at ``x`` (``d`` Hessian-vector products), symmetrised."""
        eye = np.eye(self.size)
        h = np.stack([self.hessp(x, eye[i]) for i in range(self.size)])
        return 0.5 * (h + h.T)


# ------------------------------------------------------------------------ constraints
def _soft_kinds() -> tuple[type, ...]:
    from manifoldparam.soft.constraints import Constraint

    return (Constraint,)


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
_Placement = list[tuple[int, str]]


def scipy_constraints(constraints: Iterable[Any], flat: FlatObjective, method: str) -> list[Any]:
    """Soft constraints as native scipy constraints for ``method`` (scipy objects pass through).

    ``trust-constr`` gets :class:`scipy.optimize.NonlinearConstraint` objects with autograd
    Jacobians and Hessians; ``SLSQP`` / ``COBYLA`` / ``COBYQA`` get ``{"type": "eq"|"ineq"}``
    dicts (``fun(x) >= 0`` for inequalities), with Jacobians for SLSQP.
    """
    return _native_constraints(constraints, flat, method)[0]


def _native_constraints(
    constraints: Iterable[Any], flat: FlatObjective, method: str
) -> tuple[list[Any], list[tuple[Any, _Placement]]]:
    from scipy.optimize import NonlinearConstraint

    kinds = _soft_kinds()
    out: list[Any] = []
    placed: list[tuple[Any, _Placement]] = []
    for c in constraints:
        if not isinstance(c, kinds):
            out.append(c)  # a scipy constraint already
            continue
        sc = _SoftConstraint(c, flat)
        lo, hi = sc.bounds()
        where: _Placement = []
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


def _copy_multipliers(
    result: Any,
    method: str,
    out: list[Any],
    placed: list[tuple[Any, _Placement]],
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


# ------------------------------------------------------------------------ the entry point
def scipy_minimize(
    objective: Callable[[], Tensor],
    params: nn.Module | Iterable[Tensor],
    *,
    method: str = "L-BFGS-B",
    constraints: Iterable[Any] = (),
    **kwargs: Any,
) -> Any:
    """Minimise ``objective()`` over ``params`` with :func:`scipy.optimize.minimize`.

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

    Returns scipy's ``OptimizeResult``; ``params`` hold ``result.x`` afterwards (float64
    arithmetic in scipy, cast back to each tensor's dtype). ``result.nhev`` counts the
    Hessian-vector products. A NaN/Inf objective, gradient, Hessian-vector product or soft
    constraint value/Jacobian at any evaluation stops the run: ``success=False``, ``status=-1``,
    ``result.nonfinite`` says what was not finite and ``message`` names it; ``result.x`` is
    the best finite point evaluated (the last finite one when there are constraints) and the
    multipliers are left unchanged.

    Multipliers, in the library's sign convention (the Lagrangian ``f + scale·λ·c`` with
    ``c = value - fn``, ``max - fn``, ``fn - min`` or ``clamp(fn) - fn``, stationary at the
    solution): for ``min x² + y² s.t. x + y == 1``, ``λ = 1``; a binding ``MaxConstraint`` /
    ``MinConstraint`` gets ``λ < 0``, one that does not bind ``λ = 0``; the clamp kinds keep
    mdmm's signs (``MinConstraintHard``: ``λ > 0``). ``dual_update`` and
    ``mdmm(loss).value`` then continue from scipy's solution instead of from ``λ = 0``.

    Example::

        res = scipy_minimize(lambda: loss_fn(model(x), y), model, method="trust-ncg")
    """
    from scipy.optimize import minimize

    m = method.lower()
    tensors = _trainable(params)
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
    placed: list[tuple[Any, _Placement]] = []
    if constraints:
        extra["constraints"], placed = _native_constraints(constraints, flat, m)
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
        _copy_multipliers(result, m, extra["constraints"], placed, flat)
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
