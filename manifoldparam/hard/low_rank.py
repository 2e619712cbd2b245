r"""Matrices of rank at most ``r``, as :math:`U \operatorname{diag}(s) V^\top`.

Math. Write the weight as a matrix :math:`W \in \mathbb{R}^{n\times m}` (a weight with more
than two dims is the matrix ``(out, in*kh*kw)``). With :math:`U \in \mathrm{St}(n, r)` and
:math:`V \in \mathrm{St}(m, r)` (orthonormal columns, each through
:class:`~manifoldparam.Orthogonal`'s exponential map at its own base point) and
:math:`s \in \mathbb{R}^r`,

.. math::
    W = U \operatorname{diag}(s)\, V^\top, \qquad \operatorname{rank} W \le r.

Coordinates: :math:`(nr - r(r+1)/2) + r + (mr - r(r+1)/2) = r(n + m - r)`, the dimension of
the matrices of rank exactly :math:`r` (the top stratum of the set): minimal, with no gauge.
The rotations :math:`U \mapsto UQ`, :math:`V \mapsto VQ` that leave :math:`U D V^\top`
unchanged for a general factor :math:`D` are fixed by :math:`D` being diagonal (only signs and
permutations remain, a discrete set), so the Jacobian has full rank where the :math:`s_i` are
distinct and nonzero (all but a null set). This is the SVD with signed singular values:
every matrix of rank at most :math:`r` is reached (``right_inverse`` is its truncated SVD).
A two-factor :math:`AB^\top` would carry :math:`r^2` dead directions (the
:math:`GL(r)` gauge), which ``register`` refuses.

Registration keeps the weight's nearest point of the set, its truncated SVD (Eckart--Young).
For :math:`r = n = m` the factors keep the sign of their determinant (the exponential map
reaches one component of :math:`O(n)`), which the sign of :math:`s` makes up for.
:func:`~manifoldparam.rebase` re-centres both factors. geoopt has no low-rank manifold; see
:func:`~manifoldparam.fixed_rank` for rank exactly :math:`r` with :math:`s > 0`.

Example::

    >>> m = manifoldparam.low_rank(nn.Linear(8, 6), rank=2)
    >>> int(torch.linalg.matrix_rank(m.weight.detach()))
    2
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from manifoldparam.hard.base import LOW_PRECISION, Parametrization, max_abs
from manifoldparam.hard.orthogonal import Orthogonal
from manifoldparam.hard.registration import register

__all__ = ["LowRank", "low_rank"]


class LowRank(Parametrization):
    """Parametrization onto the matrices of rank at most ``rank`` (see the module docstring).

    Args:
        shape: shape of the weight (a matrix, or a tensor read as ``(shape[0], rest)``).
        rank: the largest rank ``r``, ``1 <= r <= min(n, m)``.
        atol: tolerance on the ``(r+1)``-th singular value over ``max(1, max|W|)``; default
            ``16·max(n, m)·eps(dtype)``.
    """

    set_name = "of rank at most r"
    has_base_point = True

    def __init__(
        self,
        shape: Sequence[int],
        *,
        rank: int,
        atol: float | None = None,
        owner: str | None = None,
    ) -> None:
        super().__init__(shape, atol=atol, owner=owner)
        fn = type(self).__name__.lower().replace("rank", "_rank")
        if len(self.shape) < 2:
            raise ValueError(
                f"{self.owner}: {fn} needs a matrix (a tensor of at least 2 dims); this one has "
                f"shape {tuple(self.shape)}."
            )
        self.rows, self.cols = self.shape[0], math.prod(self.shape[1:])
        attr, top = self.owner.rsplit(".", 1)[-1], min(self.rows, self.cols)
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise TypeError(f"{self.owner}: rank must be an int, got {rank!r}")
        if not 1 <= rank <= top:
            raise ValueError(
                f"{self.owner}: rank={rank} is not in 1..{top} (min(n, m) of the "
                f"{self.rows}x{self.cols} weight); pass manifoldparam.{fn}(module, {attr!r}, "
                f"rank=r) with 1 <= r <= {top}."
            )
        self.rank = rank
        # (the factors name the attribute: their errors, e.g. NaN coordinates, are its errors)
        self.u = Orthogonal((self.rows, rank), owner=self.owner)
        self.v = Orthogonal((self.cols, rank), owner=self.owner)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "owner" and "u" in self._modules:  # register() names an instance late
            self.u.owner = self.v.owner = value

    @property
    def dim(self) -> int:
        """Dimension of the set: ``r(n + m - r)``."""
        return self.rank * (self.rows + self.cols - self.rank)

    def default_atol(self, dtype: torch.dtype) -> float:
        big = max(self.rows, self.cols)
        if dtype in LOW_PRECISION:  # rounding adds a full-rank error of norm <= u·‖W‖_F
            return big * torch.finfo(dtype).eps + self.default_atol(torch.float32)
        return 16.0 * big * torch.finfo(dtype).eps

    # ------------------------------------------------------------ the singular values
    def values(self, xs: Tensor) -> Tensor:
        """The diagonal ``s`` of its coordinates (signed here; positive in FixedRank)."""
        return xs

    def values_inverse(self, s: Tensor) -> Tensor:
        return s

    def _lift(self, s: Tensor) -> Tensor:
        """Singular values of the nearest point (those beyond the rank already zero)."""
        return s

    # ------------------------------------------------------------ the map
    def map(self, x: Tensor) -> Tensor:
        du = self.u.dim
        xu, xs, xv = x[..., :du], x[..., du : du + self.rank], x[..., du + self.rank :]
        u, v = self.u.map(xu), self.v.map(xv)
        return ((u * self.values(xs)) @ v.mT).reshape(self.shape)

    def _svd(self, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        u, s, vh = torch.linalg.svd(w.reshape(self.rows, self.cols), full_matrices=False)
        return u[:, : self.rank], s[: self.rank], vh[: self.rank].mT

    def inverse(self, w: Tensor) -> Tensor:
        u, s, v = self._svd(w)
        xu, xv = self.u.inverse(u), self.v.inverse(v)
        return torch.cat([xu, self.values_inverse(s).to(xu.dtype), xv])

    def project(self, w: Tensor) -> Tensor:
        """The truncated SVD: the nearest matrix of rank at most ``r`` (Eckart--Young)."""
        u, s, v = self._svd(w)
        return ((u * self._lift(s)) @ v.mT).reshape(self.shape)

    def _scale(self, w: Tensor) -> Tensor:
        return max_abs(w).clamp_min(1.0)

    def distance(self, w: Tensor) -> Tensor:
        """The largest singular value beyond the ``r``-th, over ``max(1, max|W|)``."""
        s = torch.linalg.svdvals(w.reshape(self.rows, self.cols))
        return max_abs(s[self.rank :]) / self._scale(w)

    def explain(self, w: Tensor, d: float, tol: float) -> str:
        s = torch.linalg.svdvals(w.reshape(self.rows, self.cols).double())
        big = int((s > tol * float(self._scale(w))).sum())
        return (
            f"{big} singular values above the tolerance (rank at most {self.rank}); the "
            f"({self.rank + 1})-th is {d:.3e} relative > tolerance {tol:.3e} ({w.dtype})"
        )

    def check_state(self, state: MutableMapping[str, Any], prefix: str) -> None:
        """The factors' base points ``<prefix>u.base`` and ``<prefix>v.base``: orthogonal
        (see :meth:`Orthogonal.check_state`)."""
        self.u.check_state(state, prefix + "u.")
        self.v.check_state(state, prefix + "v.")

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, owner={self.owner}, rank={self.rank}"


def low_rank(
    module: nn.Module, name: str = "weight", *, rank: int, atol: float | None = None
) -> nn.Module:
    r"""Constrain ``module.<name>`` to have rank at most ``rank``.

    :math:`W = U \operatorname{diag}(s) V^\top` with :math:`U, V` orthonormal columns (each
    through the exponential map at a base point) and :math:`s` free: :math:`r(n+m-r)`
    coordinates, the dimension of the rank-:math:`r` matrices, no gauge. The current weight
    is kept, moved to its truncated SVD (the nearest matrix of rank at most :math:`r`).

    Args:
        module: the module that holds the attribute.
        name: the attribute to constrain (a matrix; more dims are read as
            ``(shape[0], rest)``).
        rank: the largest rank, ``1 <= rank <= min(n, m)``.
        atol: how large (relative to ``max(1, max|W|)``) the ``(r+1)``-th singular value of
            an assigned value may be; ``None``: ``16·max(n, m)·eps``.

    Returns:
        ``module``, whose ``module.<name>`` now has rank at most ``rank``.

    Raises:
        ValueError: ``rank`` outside ``1..min(n, m)``, a vector weight, a NaN/Inf or empty
            weight, an attribute already parametrized.
        TypeError: a non-floating weight, a non-int ``rank``.
        AttributeError: ``module`` has no attribute ``name``.

    Example:
        >>> layer = mp.low_rank(nn.Linear(64, 32), rank=4)    # a LoRA-sized layer
        >>> layer.parametrizations.weight.original.numel()   # 4·(32 + 64 - 4)
        368
        >>> int(torch.linalg.matrix_rank(layer.weight.detach()))
        4
    """
    return register(module, name, LowRank, rank=rank, atol=atol)
