r"""Skew-symmetric matrices, in minimal coordinates: the strict lower triangle.

Math. For coordinates :math:`x \in \mathbb{R}^{n(n-1)/2}` (per matrix), let :math:`L` be the
strictly lower-triangular matrix read from :math:`x`; the map is the linear bijection

.. math::
    W = L - L^\top

onto :math:`\{W = -W^\top\}` (the Lie algebra :math:`\mathfrak{so}(n)`): ``W`` is skew to the
bit, with a zero diagonal. ``right_inverse`` reads the strict lower triangle of
:math:`(W - W^\top)/2`; registration moves the weight to its skew part, the nearest skew
matrix. A weight with more than two dims is a batch of ``n×n`` matrices over its last two
dims. geoopt has no skew-symmetric manifold.

Example::

    >>> m = manifoldparam.skew(nn.Linear(5, 5, bias=False))
    >>> torch.equal(m.weight, -m.weight.T)
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from manifoldparam.hard.base import LOW_PRECISION, Parametrization, max_abs
from manifoldparam.hard.registration import register
from manifoldparam.hard.symmetric import mirrored_entries, square_matrix

__all__ = ["Skew", "skew"]


class Skew(Parametrization):
    """Parametrization onto skew-symmetric matrices (see the module docstring).

    Args:
        shape: shape of the weight, ``(*batch, n, n)`` with ``n >= 2``.
        atol: tolerance on ``max|W + Wᵀ| / max(1, max|W|)``; default ``4·eps(dtype)·√n``.
    """

    set_name = "skew-symmetric"

    def __init__(
        self, shape: Sequence[int], *, atol: float | None = None, owner: str | None = None
    ) -> None:
        super().__init__(shape, atol=atol, owner=owner)
        self.n = square_matrix(
            self.shape,
            self.owner,
            "skew",
            "Register it on a square weight (e.g. nn.Linear(n, n)).",
        )
        if self.n < 2:
            raise ValueError(
                f"{self.owner}: a 1x1 skew-symmetric matrix is 0, there is nothing to train; "
                "drop the constraint (or use a zero buffer) for n = 1."
            )
        rows, cols, entry = mirrored_entries(self.n, -1)
        # One gather and one product: the sign is +1 below the diagonal, -1 above, 0 on it.
        sign = torch.zeros(self.n, self.n)
        sign[rows, cols], sign[cols, rows] = 1.0, -1.0
        self.register_buffer("entry", entry, persistent=False)
        self.register_buffer("sign", sign.flatten(), persistent=False)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    @property
    def dim(self) -> int:
        """Dimension of the set: ``n(n-1)/2`` per matrix."""
        return self.shape[:-2].numel() * self.n * (self.n - 1) // 2

    def default_atol(self, dtype: torch.dtype) -> float:
        eps = torch.finfo(dtype).eps
        return 4.0 * eps if dtype in LOW_PRECISION else 4.0 * eps * self.n**0.5

    def map(self, x: Tensor) -> Tensor:
        w = x.index_select(-1, self.entry) * self.sign  # (±1, 0: exact in any promotion)
        return w.unflatten(-1, (self.n, self.n))

    def inverse(self, w: Tensor) -> Tensor:
        return (0.5 * (w - w.mT))[..., self.rows, self.cols]

    def project(self, w: Tensor) -> Tensor:
        """The skew part ``(W - Wᵀ)/2``."""
        return 0.5 * (w - w.mT)

    def distance(self, w: Tensor) -> Tensor:
        """``max|W + Wᵀ| / max(1, max|W|)`` (the diagonal included: ``2|W_ii|``)."""
        return max_abs(w + w.mT) / max_abs(w).clamp_min(1.0)

    def explain(self, w: Tensor, d: float, tol: float) -> str:
        return f"relative symmetric part max|W + Wᵀ|/max(1, max|W|) = {d:.3e} > {tol:.3e}"


def skew(module: nn.Module, name: str = "weight", *, atol: float | None = None) -> nn.Module:
    r"""Constrain ``module.<name>`` to be skew-symmetric, :math:`W = -W^\top`.

    The coordinates are the strict lower triangle (:math:`n(n-1)/2` per matrix), so the
    weight is skew to the bit (zero diagonal). The current weight is kept, moved to its skew
    part :math:`(W - W^\top)/2`. A weight with more than two dims is a batch of matrices
    over its last two.

    Args:
        module: the module that holds the attribute.
        name: the attribute to constrain; its last two dims must be equal and at least 2.
        atol: how far (relative) from skew an assigned value may be; ``None``: ``4·eps·√n``.

    Returns:
        ``module``, whose ``module.<name>`` is now skew-symmetric.

    Raises:
        ValueError: a non-square or 1x1 weight, a NaN/Inf or empty weight, an attribute
            already parametrized.
        TypeError: a non-floating weight.
        AttributeError: ``module`` has no attribute ``name``.

    Example:
        >>> gen = mp.skew(nn.Linear(4, 4, bias=False))   # a generator of rotations
        >>> torch.equal(gen.weight, -gen.weight.T)
        True
        >>> gen.parametrizations.weight.original.numel()   # n(n-1)/2
        6
    """
    return register(module, name, Skew, atol=atol)
