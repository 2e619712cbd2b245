r"""Symmetric matrices, in minimal coordinates: the lower triangle.

Math. For coordinates :math:`x \in \mathbb{R}^{n(n+1)/2}` (per matrix), let :math:`L` be the
lower-triangular matrix (diagonal included) read from :math:`x`; the map is

.. math::
    W = L + \operatorname{triu}_1(L^\top),

a linear bijection onto :math:`\{W = W^\top\}`: each free entry is stored once, so ``W`` is
symmetric to the bit and no coordinate is dead. ``right_inverse`` reads the lower triangle of
:math:`(W + W^\top)/2`; registration moves the weight to its symmetric part (the nearest
symmetric matrix in any unitarily invariant norm). A weight with more than two dims is a batch
of ``n×n`` matrices over its last two dims. geoopt has no symmetric manifold (its
``SymmetricPositiveDefinite`` is the positive definite cone: see :func:`~manifoldparam.spd`).

Example::

    >>> m = manifoldparam.symmetric(nn.Linear(5, 5, bias=False))
    >>> torch.equal(m.weight, m.weight.T)
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from manifoldparam.hard.base import LOW_PRECISION, Parametrization, max_abs
from manifoldparam.hard.registration import register

__all__ = ["Symmetric", "mirrored_entries", "square_matrix", "symmetric"]


def square_matrix(shape: torch.Size, owner: str, what: str, fix: str) -> int:
    """``n`` for a weight of shape ``(*batch, n, n)``; a ValueError naming ``owner`` and the fix
    otherwise."""
    if len(shape) < 2 or shape[-1] != shape[-2]:
        raise ValueError(
            f"{owner}: {what} needs a square matrix (or a batch of them over the last two "
            f"dims); the weight has shape {tuple(shape)}. {fix}"
        )
    return shape[-1]


def mirrored_entries(n: int, offset: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(rows, cols, entry)``: the lower triangle's indices (``offset`` as ``tril_indices``)
    and, for each entry ``(i, j)`` of an ``n×n`` matrix in row-major order, the coordinate
    ``k(max(i, j), min(i, j))`` it reads (0 where ``|i - j| < -offset``). A (skew-)symmetric
    map is then one gather, whose backward is one ``index_add``: about 2x faster than a
    scatter into zeros plus a transposed copy."""
    rows, cols = torch.tril_indices(n, n, offset=offset)
    entry = torch.zeros(n, n, dtype=torch.long)
    entry[rows, cols] = entry[cols, rows] = torch.arange(rows.numel())
    return rows, cols, entry.flatten()


class Symmetric(Parametrization):
    """Parametrization onto symmetric matrices (see the module docstring).

    Args:
        shape: shape of the weight, ``(*batch, n, n)``.
        atol: tolerance on the relative asymmetry ``max|W - Wᵀ| / max(1, max|W|)``; default
            ``4·eps(dtype)`` (``A @ A.T`` need not be symmetric to the bit).
    """

    set_name = "symmetric"

    def __init__(
        self, shape: Sequence[int], *, atol: float | None = None, owner: str | None = None
    ) -> None:
        super().__init__(shape, atol=atol, owner=owner)
        self.n = square_matrix(
            self.shape,
            self.owner,
            "symmetric",
            "Register it on a square weight (e.g. nn.Linear(n, n)).",
        )
        rows, cols, entry = mirrored_entries(self.n, 0)
        self.register_buffer("entry", entry, persistent=False)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    @property
    def dim(self) -> int:
        """Dimension of the set: ``n(n+1)/2`` per matrix."""
        return self.shape[:-2].numel() * self.n * (self.n + 1) // 2

    def default_atol(self, dtype: torch.dtype) -> float:
        eps = torch.finfo(dtype).eps
        return 4.0 * eps if dtype in LOW_PRECISION else 4.0 * eps * max(1, self.n) ** 0.5

    def map(self, x: Tensor) -> Tensor:
        return x.index_select(-1, self.entry).unflatten(-1, (self.n, self.n))

    def inverse(self, w: Tensor) -> Tensor:
        return (0.5 * (w + w.mT))[..., self.rows, self.cols]

    def project(self, w: Tensor) -> Tensor:
        """The symmetric part ``(W + Wᵀ)/2``."""
        return 0.5 * (w + w.mT)

    def distance(self, w: Tensor) -> Tensor:
        """Relative asymmetry ``max|W - Wᵀ| / max(1, max|W|)``."""
        return max_abs(w - w.mT) / max_abs(w).clamp_min(1.0)

    def explain(self, w: Tensor, d: float, tol: float) -> str:
        return f"relative asymmetry max|W - Wᵀ|/max(1, max|W|) = {d:.3e} > {tol:.3e} ({w.dtype})"


def symmetric(module: nn.Module, name: str = "weight", *, atol: float | None = None) -> nn.Module:
    r"""Constrain ``module.<name>`` to be symmetric, :math:`W = W^\top`.

    The coordinates are the lower triangle (:math:`n(n+1)/2` per matrix), so the weight is
    symmetric to the bit. The current weight is kept, moved to its symmetric part
    :math:`(W + W^\top)/2`. A weight with more than two dims is a batch of matrices over its
    last two.

    Args:
        module: the module that holds the attribute.
        name: the attribute to constrain; its last two dims must be equal.
        atol: how asymmetric (relative) an assigned value may be; ``None``: ``4·eps·√n``.

    Returns:
        ``module``, whose ``module.<name>`` is now symmetric.

    Raises:
        ValueError: a non-square weight, a NaN/Inf or empty weight, an attribute already
            parametrized.
        TypeError: a non-floating weight.
        AttributeError: ``module`` has no attribute ``name``.

    Example:
        >>> hess = mp.symmetric(nn.Linear(4, 4, bias=False))
        >>> torch.equal(hess.weight, hess.weight.T)
        True
        >>> hess.parametrizations.weight.original.numel()   # n(n+1)/2
        10
    """
    return register(module, name, Symmetric, atol=atol)
