r"""Symmetric positive definite weights through a Cholesky factor.

Math. For coordinates :math:`x \in \mathbb{R}^{n(n+1)/2}` (per matrix), let :math:`L` be the
lower-triangular matrix whose strict lower triangle is read from :math:`x` and whose diagonal
is :math:`\operatorname{softplus}(x_{\mathrm{diag}}) > 0`. The map is

.. math::
    W = L L^\top + \varepsilon I,

where :math:`\varepsilon \ge 0` is the eigenvalue floor (``min_eigenvalue``): every
eigenvalue of :math:`W` exceeds it. The map is a diffeomorphism from
:math:`\mathbb{R}^{n(n+1)/2}` onto :math:`\{W = W^\top,\ W \succ \varepsilon I\}` (the
Cholesky factor with positive diagonal is unique), so the coordinates are minimal and every
SPD matrix above the floor is reached: ``right_inverse`` is the Cholesky factorisation of
:math:`W - \varepsilon I`. Registration moves a non-SPD weight to the nearest SPD matrix
(symmetrise, lift eigenvalues above the floor). A weight with more than two dims is a batch of
``n×n`` matrices over its last two dims. geoopt's set: ``SymmetricPositiveDefinite``.

Example::

    >>> m = manifoldparam.spd(nn.Linear(8, 8, bias=False), min_eigenvalue=1e-3)
    >>> bool(torch.linalg.eigvalsh(m.weight).min() > 1e-3)
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from manifoldparam.hard.base import (
    LOW_PRECISION,
    Parametrization,
    max_abs,
)
from manifoldparam.hard.registration import register

__all__ = ["SPD", "spd"]


def softplus_inverse(y: Tensor) -> Tensor:
    """The inverse of softplus, ``log(exp(y) - 1)``, stable for all ``y > 0``."""
    tiny = torch.finfo(y.dtype).tiny
    y = y.clamp_min(tiny)
    return y + torch.log(-torch.expm1(-y))


class SPD(Parametrization):
    """Parametrization onto symmetric positive definite matrices (see the module docstring).

    Args:
        shape: shape of the weight, ``(*batch, n, n)``.
        min_eigenvalue: the floor ``ε`` (default 0): ``W - εI`` is positive definite.
        atol: tolerance of the membership check on the relative asymmetry
            ``max|W - Wᵀ| / max(1, max|W|)``; default ``16·n·eps(dtype)``.
    """

    set_name = "symmetric positive definite"

    def __init__(
        self,
        shape: Sequence[int],
        *,
        min_eigenvalue: float = 0.0,
        atol: float | None = None,
        owner: str | None = None,
    ) -> None:
        super().__init__(shape, atol=atol, owner=owner)
        if len(self.shape) < 2 or self.shape[-1] != self.shape[-2]:
            raise ValueError(
                f"{self.owner}: spd needs a square matrix (or a batch of them over the last "
                f"two dims); the weight has shape {tuple(self.shape)}. For a rectangular "
                "weight use orthogonal() or a soft constraint."
            )
        if not (min_eigenvalue >= 0.0 and min_eigenvalue < float("inf")):
            raise ValueError(
                f"{self.owner}: min_eigenvalue must be finite and >= 0, got {min_eigenvalue}"
            )
        self.n = self.shape[-1]
        self.min_eigenvalue = float(min_eigenvalue)
        rows, cols = torch.tril_indices(self.n, self.n)
        self.register_buffer("index", (rows * self.n + cols).contiguous(), persistent=False)
        self.register_buffer("is_diag", rows == cols, persistent=False)

    @property
    def dim(self) -> int:
        """Dimension of the set: ``n(n+1)/2`` per matrix."""
        return self.shape[:-2].numel() * self.n * (self.n + 1) // 2

    @property
    def manifold(self) -> object:
        import geoopt

        return geoopt.SymmetricPositiveDefinite()

    def default_atol(self, dtype: torch.dtype) -> float:
        if dtype in LOW_PRECISION:  # rounding keeps symmetry; to_storage keeps the floor
            return 4.0 * torch.finfo(dtype).eps
        return 16.0 * max(self.n, 1) * torch.finfo(dtype).eps

    def to_storage(self, y: Tensor, dtype: torch.dtype) -> Tensor:
        r"""``round(y + cI)`` in the half-precision ``dtype``, with ``c`` the smallest shift the
        rounding error provably cannot undo, so the stored matrix is itself positive definite
        above the floor (rounding alone can make a well-conditioned float32 SPD matrix
        indefinite in bfloat16). Rounding ``W' = y + cI`` moves it by ``Δ``,
        :math:`|\Delta_{ij}| \le u|W'_{ij}|`, and :math:`\|\Delta\|_2 \le
        \min(\|\Delta\|_1, \|\Delta\|_F)`, so :math:`\lambda_{\min}(W' + \Delta) \ge
        \lambda_{\min}(y) + c - \|\Delta\|_2 \ge \lambda_{\min}(y)` for
        :math:`c = u \min(\|y\|_1/(1-u),\ \|y\|_F/(1-u\sqrt n))`. For a diagonally dominant
        ``y`` (near ``I``) that is about one rounding unit of the diagonal."""
        u = torch.finfo(dtype).eps / 2
        norm1 = y.abs().sum(-2).amax(-1) / (1 - u)
        fro = torch.linalg.matrix_norm(y) / (1 - u * math.sqrt(self.n))
        # 1% over the bound: the float32 arithmetic of W' itself (relative 6e-8) must not undo it
        c = 1.01 * u * torch.minimum(norm1, fro)
        return (y + c[..., None, None] * self._eye(y)).to(dtype)

    def _eye(self, like: Tensor) -> Tensor:
        return torch.eye(self.n, dtype=like.dtype, device=like.device)

    def cholesky_factor(self, x: Tensor) -> Tensor:
        """The factor ``L`` of the coordinates ``x`` (shape ``(*batch, n(n+1)/2)``)."""
        x = torch.where(self.is_diag, F.softplus(x), x)
        flat = x.new_zeros(*x.shape[:-1], self.n * self.n).index_copy(-1, self.index, x)
        return flat.unflatten(-1, (self.n, self.n))

    def map(self, x: Tensor) -> Tensor:
        factor = self.cholesky_factor(x)
        w = factor @ factor.mT
        # Symmetric to the bit: a GEMM need not round (i, j) and (j, i) alike (MKL's AVX-512
        # kernels do not), and fl(a + b) = fl(b + a). The same map and derivative, one pass.
        w = (w + w.mT).mul_(0.5)
        if self.min_eigenvalue:
            w = w + self.min_eigenvalue * self._eye(w)
        return w

    def inverse(self, w: Tensor) -> Tensor:
        sym = 0.5 * (w + w.mT)
        factor = torch.linalg.cholesky(sym - self.min_eigenvalue * self._eye(w))
        x = factor.flatten(-2)[..., self.index]
        return torch.where(self.is_diag, softplus_inverse(x), x)

    def project(self, w: Tensor) -> Tensor:
        """Symmetrise, then lift the eigenvalues to at least the floor plus a small margin
        (``sqrt(eps)·max(1, max|λ|)``, so the result is strictly inside the set)."""
        sym = 0.5 * (w + w.mT)
        lam, vec = torch.linalg.eigh(sym)
        scale = lam.abs().amax(dim=-1, keepdim=True).clamp_min(1.0)
        margin = torch.finfo(w.dtype).eps ** 0.5 * scale
        lam = torch.maximum(lam, self.min_eigenvalue + margin)
        out = (vec * lam.unsqueeze(-2)) @ vec.mT
        return 0.5 * (out + out.mT)

    def distance(self, w: Tensor) -> Tensor:
        """Relative asymmetry, or how far the smallest eigenvalue is below the floor."""
        scale = max_abs(w).clamp_min(1.0)
        asym = max_abs(w - w.mT) / scale
        lam_min = torch.linalg.eigvalsh(0.5 * (w + w.mT)).amin() if w.numel() else w.new_zeros(())
        below = torch.relu(self.min_eigenvalue - lam_min) / scale
        return torch.maximum(asym, below)

    def membership_failure(self, w: Tensor) -> str | None:
        sym = 0.5 * (w + w.mT)
        info = torch.linalg.cholesky_ex(sym - self.min_eigenvalue * self._eye(w)).info
        if bool((info != 0).any()):
            return (
                f"W - {self.min_eigenvalue}·I has no Cholesky factor (not positive definite; "
                f"smallest eigenvalue {float(torch.linalg.eigvalsh(sym).amin()):.3e})"
            )
        return None

    def explain(self, w: Tensor, d: float, tol: float) -> str:
        return (
            f"relative asymmetry or eigenvalue deficit {d:.3e} > tolerance {tol:.3e} "
            f"({w.dtype}, floor {self.min_eigenvalue})"
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, min_eigenvalue={self.min_eigenvalue}"


def spd(
    module: nn.Module,
    name: str = "weight",
    *,
    min_eigenvalue: float = 0.0,
    atol: float | None = None,
) -> nn.Module:
    r"""Constrain ``module.<name>`` to be symmetric positive definite, through a Cholesky
    factor.

    :math:`W = L L^\top + \varepsilon I` with :math:`L` lower-triangular, its diagonal
    :math:`\operatorname{softplus}` of the coordinates (:math:`n(n+1)/2` of them per matrix),
    so every eigenvalue of :math:`W` exceeds :math:`\varepsilon` = ``min_eigenvalue`` (in
    exact arithmetic: ``eigvalsh`` of a float32 ``W`` may read a few ulps of
    :math:`\|W\|` below the floor, within the constraint's tolerance). The
    current weight is kept, moved to the nearest SPD matrix (symmetrised, eigenvalues lifted
    above the floor). A weight with more than two dims is a batch of matrices over its last
    two.

    Args:
        module: the module that holds the attribute.
        name: the attribute to constrain; its last two dims must be equal.
        min_eigenvalue: the floor :math:`\varepsilon \ge 0` of the eigenvalues.
        atol: how far from the set an assigned value may be; ``None`` derives it from the
            dtype and size.

    Returns:
        ``module``, whose ``module.<name>`` is now symmetric positive definite.

    Raises:
        ValueError: a non-square weight, a negative ``min_eigenvalue``, a NaN/Inf or empty
            weight, an attribute already parametrized.
        TypeError: a non-floating weight.
        AttributeError: ``module`` has no attribute ``name``.

    Example:
        >>> cov = mp.spd(nn.Linear(4, 4, bias=False), min_eigenvalue=1e-3)
        >>> W = cov.weight
        >>> bool(torch.equal(W, W.T)), bool(torch.linalg.eigvalsh(W).min() > 1e-3)
        (True, True)
        >>> cov.parametrizations.weight.original.numel()   # n(n+1)/2
        10
    """
    return register(module, name, SPD, min_eigenvalue=min_eigenvalue, atol=atol)
