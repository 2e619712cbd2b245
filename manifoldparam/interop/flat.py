"""A model's trainable tensors as one flat float64 vector, for optimizers outside torch.

:class:`FlatObjective` evaluates an objective at a flat vector (written into the model's
coordinates, so hard constraints hold at every point tried), with autograd gradients,
Hessian-vector products from a double backward and the dense Hessian from ``d`` of them;
a NaN/Inf value stops the run with :class:`NonFiniteError`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from manifoldparam.hard.base import NonFiniteError as _NonFinite

__all__ = ["FlatObjective", "NonFiniteError", "trainable"]


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


def trainable(params: nn.Module | Iterable[Tensor]) -> list[Tensor]:
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
    r"""A torch objective seen as a function of one flat float64 NumPy vector.

    ``x`` is the concatenation of ``params`` (flattened, in order). Each method first writes
    ``x`` into the tensors in place (under ``no_grad``, only when it changed, so version
    counters -- and with them caches -- see every change), then evaluates ``objective()``.
    Gradients use :func:`torch.autograd.grad`: the tensors' ``.grad`` is not touched.

    Args:
        objective: a zero-argument callable returning a scalar tensor computed from
            ``params``.
        params: the tensors :math:`x` is made of, in order.

    Example (:math:`f(x) = \sum_i x_i^2`, :math:`\nabla f = 2x`, :math:`H v = 2v`):
        >>> w = torch.tensor([1.0, -2.0], requires_grad=True)
        >>> f = mp.interop.FlatObjective(lambda: (w**2).sum(), [w])
        >>> value, grad = f.fun_and_grad(f.x0())
        >>> value, grad.tolist()
        (5.0, [2.0, -4.0])
        >>> f.hessp(f.x0(), np.array([1.0, 0.0])).tolist()
        [2.0, 0.0]
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
