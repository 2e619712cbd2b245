r"""Positive semidefinite matrices, of full or of bounded rank, as :math:`LL^\top`.

Math. With :math:`r` = ``rank`` (:math:`n` by default), the coordinates are the entries of a
lower-trapezoidal :math:`L \in \mathbb{R}^{n\times r}` (:math:`L_{ij} = 0` for :math:`j > i`)
and the map is

.. math::
    W = L L^\top \succeq 0, \qquad \operatorname{rank} W \le r.

Every PSD matrix of rank at most :math:`r` is reached: write it :math:`W = BB^\top` with
:math:`B = V_r\Lambda_r^{1/2}` (its top :math:`r` eigenpairs) and take the QR factorisation
:math:`B^\top = QR`; then :math:`W = R^\top R` with :math:`L = R^\top` lower trapezoidal
(that is ``right_inverse``). The trapezoidal shape removes the rotation gauge
:math:`L \mapsto LQ` of a full :math:`n\times r` factor: :math:`nr - r(r-1)/2` coordinates,
the dimension of the PSD matrices of rank :math:`r` (:math:`n(n+1)/2` for ``rank=None``), and
the map's Jacobian has full rank where the top :math:`r\times r` block of :math:`L` is
invertible (all but a null set). Unlike :func:`~manifoldparam.spd`, the diagonal of
:math:`L` is free, so singular matrices are in the set and a zero coordinate is no boundary.

Registration keeps the weight's nearest point of the set: the symmetric part, with negative
eigenvalues set to zero and only the :math:`r` largest kept (Eckart--Young). A weight with more
than two dims is a batch of ``n×n`` matrices over its last two dims. In bfloat16/float16 the
stored matrix is PSD to that dtype's precision (rounding can move an eigenvalue by
:math:`u\|W\|_F`). geoopt has no PSD set (its ``SymmetricPositiveDefinite`` is the open cone).

Example::

    >>> k = manifoldparam.psd(nn.Linear(6, 6, bias=False), rank=2)
    >>> lam = torch.linalg.eigvalsh(k.weight.detach())
    >>> bool(lam.min() > -1e-6), int((lam > 1e-6).sum()) <= 2
    (True, True)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from manifoldparam.hard.base import LOW_PRECISION, Parametrization, max_abs
from manifoldparam.hard.registration import register
from manifoldparam.hard.symmetric import square_matrix

__all__ = ["PSD", "psd"]


class PSD(Parametrization):
    """Parametrization onto PSD matrices of rank at most ``rank`` (see the module docstring).

    Args:
        shape: shape of the weight, ``(*batch, n, n)``.
        rank: the largest rank ``r`` (``1 <= r <= n``); ``None``: ``n`` (every PSD matrix).
        atol: tolerance on the relative asymmetry, negative eigenvalues and eigenvalues beyond
            the ``r``-th, all over ``max(1, max|W|)``; default ``16·n·eps(dtype)``.
    """

    set_name = "positive semidefinite"

    def __init__(
        self,
        shape: Sequence[int],
        *,
        rank: int | None = None,
        atol: float | None = None,
        owner: str | None = None,
    ) -> None:
        super().__init__(shape, atol=atol, owner=owner)
        self.n = square_matrix(
            self.shape,
            self.owner,
            "psd",
            "Register it on a square weight (e.g. nn.Linear(n, n)); for a rectangular "
            "weight of bounded rank use manifoldparam.low_rank.",
        )
        n, attr = self.n, self.owner.rsplit(".", 1)[-1]
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
            raise TypeError(f"{self.owner}: rank must be None or an int, got {rank!r}")
        if rank is not None and not 1 <= rank <= n:
            raise ValueError(
                f"{self.owner}: rank={rank} is not in 1..{n} (the weight is {n}x{n}); pass "
                f"manifoldparam.psd(module, {attr!r}, rank=r) with 1 <= r <= {n}, or "
                "rank=None for every PSD matrix."
            )
        self.rank = rank
        self.r = n if rank is None else rank
        rows, cols = torch.tril_indices(n, self.r)
        self.register_buffer("index", (rows * self.r + cols).contiguous(), persistent=False)

    @property
    def dim(self) -> int:
        """Dimension of the set: ``nr - r(r-1)/2`` per matrix."""
        per = self.n * self.r - self.r * (self.r - 1) // 2
        return self.shape[:-2].numel() * per

    def default_atol(self, dtype: torch.dtype) -> float:
        n = max(self.n, 1)
        if dtype in LOW_PRECISION:  # rounding W moves eigenvalues by <= u·‖W‖_F <= u·n·max|W|
            return n * torch.finfo(dtype).eps + self.default_atol(torch.float32)
        return 16.0 * n * torch.finfo(dtype).eps

    def factor(self, x: Tensor) -> Tensor:
        """The lower-trapezoidal ``L`` (``(*batch, n, r)``) of the coordinates ``x``."""
        index = self.index.expand(*x.shape[:-1], -1)
        flat = x.new_zeros(*x.shape[:-1], self.n * self.r).scatter(-1, index, x)
        return flat.unflatten(-1, (self.n, self.r))

    def map(self, x: Tensor) -> Tensor:
        low = self.factor(x)
        w = low @ low.mT
        # symmetric to the bit (a GEMM need not round (i, j) and (j, i) alike)
        return (w + w.mT).mul_(0.5)

    def inverse(self, w: Tensor) -> Tensor:
        lam, vec = torch.linalg.eigh(0.5 * (w + w.mT))
        top = (
            vec[..., self.n - self.r :]
            * lam[..., self.n - self.r :].clamp_min(0).sqrt()[..., None, :]
        )
        _, r = torch.linalg.qr(top.mT)  # Bᵀ = QR, W = RᵀR
        return r.mT.flatten(-2)[..., self.index]

    def project(self, w: Tensor) -> Tensor:
        """The symmetric part with its negative eigenvalues zeroed and only the ``r`` largest
        kept: the nearest PSD matrix of rank at most ``r`` in Frobenius norm."""
        lam, vec = torch.linalg.eigh(0.5 * (w + w.mT))
        lam = lam.clamp_min(0)
        if self.r < self.n:
            lam = torch.cat(
                [torch.zeros_like(lam[..., : self.n - self.r]), lam[..., -self.r :]], -1
            )
        out = (vec * lam.unsqueeze(-2)) @ vec.mT
        return 0.5 * (out + out.mT)

    def distance(self, w: Tensor) -> Tensor:
        """The largest of the asymmetry, the most negative eigenvalue and (for ``r < n``) the
        largest eigenvalue beyond the ``r`` largest, relative to ``max(1, max|W|)``."""
        scale = max_abs(w).clamp_min(1.0)
        asym = max_abs(w - w.mT)
        lam = torch.linalg.eigvalsh(0.5 * (w + w.mT))
        worst = torch.maximum(asym, max_abs(torch.relu(-lam)))
        if self.r < self.n:
            worst = torch.maximum(worst, max_abs(lam[..., : self.n - self.r]))
        return worst / scale

    def explain(self, w: Tensor, d: float, tol: float) -> str:
        lam = torch.linalg.eigvalsh(0.5 * (w + w.mT).double())
        what = f"smallest eigenvalue {float(lam.min()):.3e}"
        if self.r < self.n:
            scale = max(1.0, float(w.abs().max()))
            big = int((lam.abs() > tol * scale).sum())
            what += f", {big} eigenvalues above the tolerance (rank at most {self.r})"
        return f"{what}; relative distance {d:.3e} > tolerance {tol:.3e} ({w.dtype})"

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"


def psd(
    module: nn.Module,
    name: str = "weight",
    *,
    rank: int | None = None,
    atol: float | None = None,
) -> nn.Module:
    r"""Constrain ``module.<name>`` to be positive semidefinite, of rank at most ``rank``.

    :math:`W = LL^\top` with :math:`L` lower trapezoidal :math:`n\times r` (:math:`r` =
    ``rank``, :math:`n` by default): :math:`nr - r(r-1)/2` coordinates per matrix, no gauge.
    Singular matrices are in the set (for a floor on the eigenvalues use
    :func:`~manifoldparam.spd`). The current weight is kept, moved to its nearest PSD matrix of
    rank at most :math:`r` (negative eigenvalues zeroed, the :math:`r` largest kept).

    Args:
        module: the module that holds the attribute.
        name: the attribute to constrain; its last two dims must be equal.
        rank: the largest rank, ``1 <= rank <= n``; ``None``: any PSD matrix.
        atol: how far (relative to ``max(1, max|W|)``) from the set an assigned value may be;
            ``None``: ``16·n·eps``.

    Returns:
        ``module``, whose ``module.<name>`` is now PSD of rank at most ``rank``.

    Raises:
        ValueError: a non-square weight, ``rank`` outside ``1..n``, a NaN/Inf or empty
            weight, an attribute already parametrized.
        TypeError: a non-floating weight, a non-int ``rank``.
        AttributeError: ``module`` has no attribute ``name``.

    Example:
        >>> gram = mp.psd(nn.Linear(5, 5, bias=False), rank=2)
        >>> gram.parametrizations.weight.original.numel()   # 5·2 - 1
        9
        >>> int(torch.linalg.matrix_rank(gram.weight.detach(), hermitian=True))
        2
    """
    return register(module, name, PSD, rank=rank, atol=atol)
