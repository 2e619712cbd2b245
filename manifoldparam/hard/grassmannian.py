r"""The Grassmannian: k-dimensional subspaces of :math:`\mathbb{R}^n`, held as orthonormal frames.

Math. A point is the span of an orthonormal frame :math:`W \in \mathbb{R}^{n\times k}`
(:math:`k < n`; a wide weight is handled as its transpose, a weight with more than two dims
as the matrix ``(out, rest)`` or, with ``batched=True``, a batch of matrices). Frames that
differ by a rotation :math:`W Q`, :math:`Q \in O(k)`, span the same subspace, so the set has
dimension :math:`k(n-k)`, not Stiefel's :math:`nk - k(k+1)/2`. The map is the Riemannian
exponential of the Grassmannian at a base frame, horizontal directions only:

.. math::
    W = B \exp\begin{pmatrix} 0 & -C^\top \\ C & 0 \end{pmatrix} E_k,
    \qquad C \in \mathbb{R}^{(n-k)\times k},

with :math:`B \in O(n)` the base (a buffer: the first :math:`k` columns span the base
subspace, the others its complement) and :math:`E_k` the first :math:`k` columns of
:math:`I_n`: the orthogonal map of :class:`~manifoldparam.Orthogonal` with its
:math:`k\times k` block :math:`S` fixed to zero, so the coordinates are exactly the
:math:`k(n-k)` entries of :math:`C` (no rotation within the subspace: no dead direction) and
the accuracy, caching and :func:`~manifoldparam.rebase` are those of the orthogonal map. In
closed form :math:`W = B_k V\cos\Sigma V^\top + B_\perp U\sin\Sigma V^\top` for
:math:`C = U\Sigma V^\top`: the principal angles between the span of :math:`W` and the base
are the singular values :math:`\sigma_i` of :math:`C` (for :math:`\sigma_i < \pi/2`).

The span is what matters: distances between subspaces are measured by
:func:`subspace_distance`, :math:`\|WW^\top - VV^\top\|_F/\sqrt2` (the projection or chordal
distance, :math:`\|\sin\Theta\|_F`), which is invariant to the frame. Registration keeps the
weight's span and moves the frame to the nearest orthonormal one (the polar factor);
assignment takes any orthonormal frame and keeps it as the new base (coordinates zero).

Example::

    >>> basis = mp.grassmannian(nn.Linear(2, 6, bias=False))   # a 2-plane in R^6
    >>> W = basis.weight
    >>> bool(torch.allclose(W.T @ W, torch.eye(2), atol=1e-6))
    True
    >>> basis.parametrizations.weight.original.numel()   # k(n-k)
    8
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from manifoldparam.hard.orthogonal import Map, Orthogonal
from manifoldparam.hard.registration import register

__all__ = ["Grassmannian", "grassmannian", "subspace_distance"]


def subspace_distance(a: Tensor, b: Tensor) -> Tensor:
    r"""The projection (chordal) distance between the spans of two orthonormal frames
    ``(..., n, k)``: :math:`\|AA^\top - BB^\top\|_F/\sqrt2 = \|\sin\Theta\|_F`, for the
    principal angles :math:`\Theta`; 0 exactly when the spans agree, whatever the frames.

    Example:
        >>> q, _ = torch.linalg.qr(torch.randn(5, 2, dtype=torch.float64))
        >>> rot = torch.tensor([[0.6, -0.8], [0.8, 0.6]], dtype=torch.float64)
        >>> float(subspace_distance(q, q @ rot)) < 1e-15      # same span, other frame
        True
    """
    diff = a @ a.mT - b @ b.mT
    return torch.linalg.matrix_norm(diff) / 2**0.5


class Grassmannian(Orthogonal):
    """Parametrization onto k-dimensional subspaces (orthonormal frames modulo rotations; see
    the module docstring).

    Args:
        shape: shape of the weight (a tall ``n×k`` or wide ``k×n`` matrix, ``k < n``).
        map: ``"expm"`` (default) or ``"cayley"``, as for :class:`~manifoldparam.Orthogonal`.
        batched: a batch of frames over the last two dims of a weight with more than two dims.
        atol: tolerance on ``max|WᵀW - I|``; default ``16·n·eps(dtype)``.
        **options: ``newton_schulz``, ``max_squarings`` of :class:`~manifoldparam.Orthogonal`.
    """

    set_name = "an orthonormal frame (a point of the Grassmannian)"

    def __init__(
        self,
        shape: Sequence[int],
        *,
        map: Map = "expm",
        batched: bool = False,
        atol: float | None = None,
        owner: str | None = None,
        **options: int | None,
    ) -> None:
        super().__init__(shape, map=map, batched=batched, atol=atol, owner=owner, **options)
        n, k = self.n, self.k
        if k == n:
            raise ValueError(
                f"{self.owner}: grassmannian needs a tall or wide matrix (k < n: a k-dimensional "
                f"subspace of R^n); this one is {n}x{n}, whose columns span all of R^{n}. "
                "For an orthogonal square weight use manifoldparam.orthogonal(module, name)."
            )
        # The free entries of A: the block C (rows k.., columns ..k), not the k×k block S.
        rows, cols = torch.meshgrid(torch.arange(k, n), torch.arange(k), indexing="ij")
        self.index = (rows * n + cols).flatten().contiguous()

    @property
    def matrix_dim(self) -> int:
        """``k(n-k)`` per matrix: the dimension of the Grassmannian."""
        return self.k * (self.n - self.k)


def grassmannian(
    module: nn.Module,
    name: str = "weight",
    *,
    map: Map = "expm",
    batched: bool = False,
    atol: float | None = None,
) -> nn.Module:
    r"""Constrain ``module.<name>`` to an orthonormal frame whose span is what is trained:
    a point of the Grassmannian :math:`\mathrm{Gr}(n, k)` (:math:`k < n`).

    The columns of a tall weight (rows of a wide one) stay orthonormal; the coordinates move
    only the subspace they span (:math:`k(n-k)` of them, the set's dimension: no direction
    rotates the frame within its span). The current weight's span is kept (the frame moved to
    its polar factor). See :class:`Grassmannian` and :func:`subspace_distance`.

    Args:
        module: the module that holds the attribute.
        name: the attribute to constrain: an ``n×k`` or ``k×n`` matrix with ``k < n``.
        map: ``"expm"`` or ``"cayley"`` (the maps of :func:`~manifoldparam.orthogonal`).
        batched: a batch of frames over the last two dims (a weight with more than two dims).
        atol: how far from the set an assigned value may be; ``None`` derives it from the
            dtype and size.

    Returns:
        ``module``, whose ``module.<name>`` is now an orthonormal frame.

    Raises:
        ValueError: a square weight (its span is the whole space), and the checks every
            constraint shares.

    Example:
        >>> pca = mp.grassmannian(nn.Linear(8, 3, bias=False))   # 3 orthonormal rows in R^8
        >>> W = pca.weight
        >>> bool(torch.allclose(W @ W.T, torch.eye(3), atol=1e-6))
        True
    """
    return register(module, name, Grassmannian, map=map, batched=batched, atol=atol)
