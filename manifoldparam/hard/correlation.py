r"""Correlation matrices: symmetric positive definite with unit diagonal.

Math. A correlation matrix :math:`C \succ 0`, :math:`C_{ii} = 1`, has a Cholesky factor
:math:`L` whose rows are unit vectors (:math:`C_{ii} = \|L_{i,:}\|^2 = 1`) with a positive last
entry: row :math:`i` lies on the open upper hemisphere of :math:`S^i \subset \mathbb{R}^{i+1}`.
Each hemisphere is charted by its gnomonic (central) projection, a diffeomorphism from
:math:`\mathbb{R}^i`:

.. math::
    L_{i,:} = \frac{(z_i, 1)}{\sqrt{1 + \|z_i\|^2}},\qquad z_i \in \mathbb{R}^i,
    \qquad C = L L^\top,

so the coordinates are the strict lower triangle :math:`Z` (:math:`n(n-1)/2` numbers per
matrix: the dimension of the set), the map is onto every correlation matrix, and
``right_inverse`` is :math:`z_{ij} = L_{ij}/L_{ii}` from the Cholesky factor. The diagonal is
set to exactly 1 (it is :math:`1` up to round-off; its derivative is 0). A weight with more
than two dims is a batch of ``n×n`` matrices over its last two dims.

Registration moves the weight onto the set: the symmetric part with its eigenvalues lifted to a
small margin (as :func:`~manifoldparam.spd`), then scaled to unit diagonal,
:math:`D^{-1/2} W D^{-1/2}`. That is *a* nearby correlation matrix, not the nearest one in the
Frobenius norm (Higham's problem, iterative); a correlation matrix is kept as it is.

Example::

    >>> m = mp.correlation(nn.Linear(4, 4, bias=False))
    >>> C = m.weight
    >>> bool(torch.equal(C.diagonal(), torch.ones(4))), bool(torch.linalg.eigvalsh(C).min() > 0)
    (True, True)
    >>> m.parametrizations.weight.original.numel()   # n(n-1)/2
    6
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from manifoldparam.hard.base import LOW_PRECISION, Parametrization, max_abs
from manifoldparam.hard.registration import register

__all__ = ["Correlation", "correlation"]


class Correlation(Parametrization):
    """Parametrization onto correlation matrices (see the module docstring).

    Args:
        shape: shape of the weight, ``(*batch, n, n)``.
        atol: tolerance of the membership check on ``max(max|C - Cᵀ|, max|diag C - 1|)``
            (plus positive definiteness, by a Cholesky); default ``16·n·eps(dtype)``.
    """

    set_name = "a correlation matrix (positive definite, unit diagonal)"

    def __init__(
        self, shape: Sequence[int], *, atol: float | None = None, owner: str | None = None
    ) -> None:
        super().__init__(shape, atol=atol, owner=owner)
        if len(self.shape) < 2 or self.shape[-1] != self.shape[-2]:
            raise ValueError(
                f"{self.owner}: correlation needs square matrices (shape (..., n, n)); this "
                f"weight has shape {tuple(self.shape)}. For unit-norm rows of a rectangular "
                "weight use a sphere/oblique constraint instead."
            )
        self.n = self.shape[-1]
        rows, cols = torch.tril_indices(self.n, self.n, offset=-1)
        self.register_buffer("index", (rows * self.n + cols).contiguous(), persistent=False)

    @property
    def dim(self) -> int:
        """``n(n-1)/2`` per matrix."""
        return self.shape[:-2].numel() * self.n * (self.n - 1) // 2

    @property
    def manifold(self) -> object:
        import geoopt  # (the set lies in geoopt's SPD manifold; geoopt has no correlation set)

        return geoopt.SymmetricPositiveDefinite()

    def default_atol(self, dtype: torch.dtype) -> float:
        if dtype in LOW_PRECISION:  # the diagonal stays 1 and symmetry exact when rounded
            return 4.0 * torch.finfo(dtype).eps
        return 16.0 * max(self.n, 1) * torch.finfo(dtype).eps

    def _eye(self, like: Tensor) -> Tensor:
        return torch.eye(self.n, dtype=like.dtype, device=like.device)

    def factor(self, x: Tensor) -> Tensor:
        """The Cholesky factor ``L`` (unit rows) of the coordinates ``x``, shape
        ``(*batch, n(n-1)/2)``."""
        flat = x.new_zeros(*x.shape[:-1], self.n * self.n).index_copy(-1, self.index, x)
        m = flat.unflatten(-1, (self.n, self.n)) + self._eye(x)
        return m / torch.linalg.vector_norm(m, dim=-1, keepdim=True)

    def map(self, x: Tensor) -> Tensor:
        factor = self.factor(x.reshape(*self.shape[:-2], -1))
        c = factor @ factor.mT
        c = (c + c.mT).mul_(0.5)  # symmetric to the bit
        return torch.where(self._eye(c).bool(), torch.ones_like(c), c)

    def inverse(self, w: Tensor) -> Tensor:
        factor = torch.linalg.cholesky(0.5 * (w + w.mT))
        z = factor / factor.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)
        return z.flatten(-2)[..., self.index]

    def project(self, w: Tensor) -> Tensor:
        """Symmetrise, lift the eigenvalues to a margin (``sqrt(eps)·max(1, max|λ|)``) unless
        it is positive definite already, scale to unit diagonal: a nearby correlation matrix
        (the nearest one is Higham's iterative problem); a correlation matrix is returned
        unchanged up to round-off."""
        sym = 0.5 * (w + w.mT)
        lam, vec = torch.linalg.eigh(sym)
        scale = lam.abs().amax(dim=-1, keepdim=True).clamp_min(1.0)
        lam = torch.maximum(lam, torch.finfo(w.dtype).eps ** 0.5 * scale)
        lifted = (vec * lam.unsqueeze(-2)) @ vec.mT
        # A positive definite matrix is only scaled (so a point of the set is kept as it is).
        definite = torch.linalg.cholesky_ex(sym).info == 0
        spd = torch.where(definite[..., None, None], sym, lifted)
        d = spd.diagonal(dim1=-2, dim2=-1).rsqrt()
        c = spd * d.unsqueeze(-1) * d.unsqueeze(-2)
        c = 0.5 * (c + c.mT)
        return torch.where(self._eye(c).bool(), torch.ones_like(c), c)

    def to_storage(self, y: Tensor, dtype: torch.dtype) -> Tensor:
        r"""``round((y + cI)/(1 + c))`` in the half-precision ``dtype``: the diagonal stays 1,
        and ``c`` is large enough that rounding the off-diagonal entries (an error
        :math:`\Delta` with :math:`\|\Delta\|_2 \le u\|y\|_1`) cannot make the matrix
        indefinite: :math:`\lambda_{\min} \ge (\lambda_{\min}(y) + c - u\|y\|_1)/(1 + c)
        > 0` for :math:`c = 1.01\,u\|y\|_1` (a rounding of the correlations by about
        :math:`n u`)."""
        u = torch.finfo(dtype).eps / 2
        c = 1.01 * u * y.abs().sum(-2).amax(-1)[..., None, None]
        out = (y + c * self._eye(y)) / (1 + c)
        return torch.where(self._eye(y).bool(), torch.ones_like(y), out).to(dtype)

    def distance(self, w: Tensor) -> Tensor:
        asym = max_abs(w - w.mT)
        diag = max_abs(w.diagonal(dim1=-2, dim2=-1) - 1)
        return torch.maximum(asym, diag)

    def membership_failure(self, w: Tensor) -> str | None:
        info = torch.linalg.cholesky_ex(0.5 * (w + w.mT)).info
        if bool((info != 0).any()):
            lam = float(torch.linalg.eigvalsh(0.5 * (w + w.mT)).amin())
            return f"it is not positive definite (smallest eigenvalue {lam:.3e})"
        return None

    def explain(self, w: Tensor, d: float, tol: float) -> str:
        return (
            f"max(|C - Cᵀ|, |diag C - 1|) = {d:.3e} > tolerance {tol:.3e} ({w.dtype}, "
            f"{self.n}x{self.n})"
        )


def correlation(module: nn.Module, name: str = "weight", *, atol: float | None = None) -> nn.Module:
    r"""Constrain ``module.<name>`` to be a correlation matrix: symmetric positive definite
    with unit diagonal.

    :math:`C = LL^\top` with the rows of the Cholesky factor :math:`L` on the unit sphere,
    each charted from :math:`\mathbb{R}^i` by central projection: :math:`n(n-1)/2` coordinates
    per matrix, onto every correlation matrix (:class:`Correlation`). The current weight is
    kept, moved onto the set (eigenvalues lifted, scaled to unit diagonal). A weight with more
    than two dims is a batch of matrices over its last two.

    Args:
        module: the module that holds the attribute.
        name: the attribute to constrain, of shape ``(..., n, n)``.
        atol: how far from the set an assigned value may be; ``None`` derives it from the
            dtype and size.

    Returns:
        ``module``, whose ``module.<name>`` is now a correlation matrix.

    Raises:
        ValueError: a weight that is not square, and the checks every constraint shares.

    Example:
        >>> m = nn.Module()
        >>> m.weight = nn.Parameter(torch.randn(2, 3, 3))
        >>> C = mp.correlation(m).weight
        >>> C.diagonal(dim1=-2, dim2=-1)
        tensor([[1., 1., 1.],
                [1., 1., 1.]], grad_fn=<DiagonalBackward0>)
    """
    return register(module, name, Correlation, atol=atol)
