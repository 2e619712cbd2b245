r"""Unitary and complex Stiefel weights through the exponential of skew-Hermitian matrices.

Math. Write the complex weight as a tall matrix :math:`W \in \mathbb{C}^{n\times k}`,
:math:`k \le n` (a wide weight as its transpose: orthonormal rows, :math:`WW^H = I`; a weight
with more than two dims as the matrix ``(out, rest)``, or a batch of matrices over its last two
dims with ``batched=True``). The set is the complex Stiefel manifold
:math:`\{W : W^H W = I_k\}` (for :math:`k = n` the unitary group :math:`U(n)`, connected: every
unitary matrix is reached). The map is

.. math::
    W = \operatorname{NS}\big(B \exp(A) E_k\big),\qquad
    A = \begin{pmatrix} S & -C^H \\ C & 0 \end{pmatrix},\quad S^H = -S,

with :math:`B \in U(n)` a base point (a buffer), :math:`E_k` the first :math:`k` columns of
:math:`I_n` and :math:`\operatorname{NS}` one Newton--Schulz step, as for
:class:`~manifoldparam.Orthogonal` (skipped where the exponential's round-off is already at
its floor; its backward is the identity on tangent vectors). The coordinates are a complex
tensor (torch keeps the weight's dtype for them): the strict lower triangle of :math:`S` and
:math:`C` (:math:`nk - k(k+1)/2` complex entries), then the :math:`k` real numbers of the
imaginary diagonal of :math:`S` packed two per complex entry: :math:`\lceil k/2 \rceil`
more. That is :math:`2nk - k^2 = \dim_{\mathbb{R}} \mathrm{St}_{\mathbb{C}}(n, k)` real
numbers for even :math:`k`; for odd :math:`k` one more (a complex tensor holds an even
number of reals), the imaginary part of the last entry, which the map ignores (its gradient
is 0): the one exception to minimal coordinates. The exponential is
:func:`~manifoldparam.linalg.expm_projected`, which handles complex matrices (under
``torch.compile`` and tracing, ``torch.linalg.matrix_exp``).

Registration keeps the weight, moved to its polar factor :math:`UV^H` (SVD): the nearest
point in the Frobenius norm. Assignment ``module.weight = Q`` sets the base to ``Q`` completed
to a unitary matrix and the coordinates to zero; :func:`~manifoldparam.rebase` does the same
with the current weight. geoopt's Stiefel manifold is real only, so
:attr:`~manifoldparam.Parametrization.manifold` is ``None``; the membership test is
:math:`\max|W^H W - I|`.

Example::

    >>> m = nn.Linear(4, 4, bias=False).to(torch.complex64)
    >>> U = mp.unitary(m).weight
    >>> bool(torch.allclose(U.mH @ U, torch.eye(4, dtype=torch.complex64), atol=1e-6))
    True
    >>> m.parametrizations.weight.original.numel()   # 6 + 2 complex: n² = 16 reals
    8
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from manifoldparam.hard.base import Parametrization, max_abs
from manifoldparam.hard.orthogonal import _exp
from manifoldparam.hard.registration import register

__all__ = ["Unitary", "unitary"]

#: Whether the base was made unitary in its own dtype (instance ``__dict__``).
_EXACT = "_manifoldparam_base_exact"


def _ns_correction(t: Tensor) -> Tensor:
    """``NS(t) - t = t/2 - t(tᴴt)/2`` for a (detached) nearly unitary ``t``."""
    return torch.matmul(t, t.mH @ t).mul_(-0.5).add_(t, alpha=0.5)


def _unitarize(b: Tensor, steps: int = 2) -> Tensor:
    """``b`` (nearly unitary) made unitary to working precision: Newton--Schulz steps in
    complex128, rounded back."""
    y = b.to(torch.complex128)
    for _ in range(steps):
        y = y + _ns_correction(y)
    return y.to(b.dtype)


class Unitary(Parametrization):
    """Parametrization onto unitary / complex Stiefel matrices (see the module docstring).

    Args:
        shape: shape of the (complex) weight.
        batched: for a weight with more than two dims, constrain each matrix over the last two
            dims instead of the flattened ``(out, rest)`` matrix.
        atol: assignment/check tolerance on ``max|WᴴW - I|``; default ``16·n·eps``.
    """

    set_name = "unitary (orthonormal complex columns/rows)"
    has_base_point = True
    complex_weight = True
    __jit_ignored_attributes__ = (_EXACT,)

    def __init__(
        self,
        shape: Sequence[int],
        *,
        batched: bool = False,
        atol: float | None = None,
        owner: str | None = None,
    ) -> None:
        super().__init__(shape, atol=atol, owner=owner)
        if len(self.shape) < 2 or (batched and len(self.shape) < 3):
            need = "at least 3 dims (a batch of matrices)" if batched else "a matrix"
            raise ValueError(
                f"{self.owner}: unitary needs {need}; this weight has shape {tuple(self.shape)}."
            )
        self.batched = batched
        if batched:
            self.batch_shape = self.shape[:-2]
            rows, cols = self.shape[-2], self.shape[-1]
        else:
            self.batch_shape = torch.Size()
            rows, cols = self.shape[0], math.prod(self.shape[1:])
        self.transposed = rows < cols
        self.n, self.k = max(rows, cols), min(rows, cols)
        n, k = self.n, self.k
        ii, jj = torch.tril_indices(n, n, offset=-1)
        keep = jj < k
        lower = ii[keep] * n + jj[keep]
        diag = torch.arange(k) * (n + 1)
        self.register_buffer("index", torch.cat([lower, diag]).contiguous(), persistent=False)
        eye = torch.eye(n, dtype=torch.complex64)
        self.register_buffer("base", eye.expand(*self.batch_shape, n, n).clone())

    @property
    def lower_count(self) -> int:
        """Complex entries of ``A`` below the diagonal, per matrix: ``nk - k(k+1)/2``."""
        return self.n * self.k - self.k * (self.k + 1) // 2

    @property
    def real_dim(self) -> int:
        """The real dimension of the set per matrix: ``2nk - k²``."""
        return 2 * self.n * self.k - self.k * self.k

    @property
    def real_dimension(self) -> int:
        """The real dimension of the whole set (all matrices): ``dim`` counts complex entries."""
        return self.batch_shape.numel() * self.real_dim

    @property
    def matrix_dim(self) -> int:
        """Complex coordinates per matrix: ``nk - k(k+1)/2 + ceil(k/2)``."""
        return self.lower_count + (self.k + 1) // 2

    @property
    def dim(self) -> int:
        """Complex coordinates (``original.numel()``): ``ceil(real_dim / 2)`` per matrix."""
        return self.batch_shape.numel() * self.matrix_dim

    def default_atol(self, dtype: torch.dtype) -> float:
        return 16.0 * max(self.n, 1) * torch.finfo(dtype.to_real()).eps

    def _to_tall(self, w: Tensor) -> Tensor:
        t = w if self.batched else w.reshape(self.shape[0], -1)
        return t.mT if self.transposed else t

    def _from_tall(self, t: Tensor) -> Tensor:
        return (t.mT if self.transposed else t).reshape(self.shape)

    def skew_hermitian(self, x: Tensor) -> Tensor:
        """``A = L - Lᴴ`` from the coordinates ``x`` (complex, ``(*batch, matrix_dim)``): ``L``
        holds the strict lower entries, then ``i/2`` times the diagonal's reals (packed two
        per complex entry)."""
        m, n, k = self.lower_count, self.n, self.k
        diag = torch.view_as_real(x[..., m:]).flatten(-2)[..., :k]
        values = torch.cat([x[..., :m], torch.complex(torch.zeros_like(diag), 0.5 * diag)], -1)
        index = self.index.expand(*x.shape[:-1], -1)
        flat = values.new_zeros(*x.shape[:-1], n * n).scatter(-1, index, values)
        low = flat.unflatten(-1, (n, n))
        return low - low.mH

    def map(self, x: Tensor) -> Tensor:
        x = x.reshape(*self.batch_shape, self.matrix_dim)
        e, clean = _exp(self.skew_hermitian(x), None)
        if self.k < self.n:
            e = e[..., : self.k]
        t = self.base.to(e.dtype) @ e
        # (the Taylor path's round-off is at the floor; a base converted from a lower precision
        # is not: _apply clears the flag, inverse sets it)
        if not (clean and self.__dict__.get(_EXACT, False)):
            t = t + _ns_correction(t.detach())
        return self._from_tall(t)

    def inverse(self, w: Tensor) -> Tensor:
        t = self._to_tall(w)
        if self.k < self.n:
            q, _ = torch.linalg.qr(t, mode="complete")
            t = torch.cat([t, q[..., self.k :]], dim=-1)
        self.base = _unitarize(t.detach()).to(self.base.dtype).contiguous()
        self.__dict__[_EXACT] = True  # (straight into __dict__: no cache invalidation)
        return w.new_zeros(*self.batch_shape, self.matrix_dim)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> nn.Module:
        self.__dict__[_EXACT] = False  # .to()/.double(): the base may be of another precision
        return super()._apply(fn, recurse)

    def project(self, w: Tensor) -> Tensor:
        """The polar factor ``U Vᴴ`` of (each matrix of) ``w``: the nearest unitary one."""
        u, _, vh = torch.linalg.svd(self._to_tall(w), full_matrices=False)
        return self._from_tall(u @ vh)

    def distance(self, w: Tensor) -> Tensor:
        t = self._to_tall(w)
        eye = torch.eye(self.k, dtype=t.dtype, device=t.device)
        return max_abs(t.mH @ t - eye)

    def explain(self, w: Tensor, d: float, tol: float) -> str:
        kind = "rows" if self.transposed else "columns"
        return (
            f"max|WᴴW - I| over its {kind} is {d:.3e} > tolerance {tol:.3e} "
            f"({w.dtype}, {self.n}x{self.k})"
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, matrix={self.n}x{self.k}"
            f"{' (transposed)' if self.transposed else ''}, batched={self.batched}"
        )


def unitary(
    module: nn.Module,
    name: str = "weight",
    *,
    batched: bool = False,
    atol: float | None = None,
) -> nn.Module:
    r"""Constrain the complex ``module.<name>`` to be unitary (square) or to have orthonormal
    columns (tall) or rows (wide): :math:`W^H W = I`.

    :math:`W = B\exp(A)E_k` with :math:`A` skew-Hermitian (:class:`Unitary`): complex
    coordinates holding :math:`2nk - k^2` reals per matrix (the set's real dimension; one
    more, inert, for odd :math:`k`), onto the whole (connected) set. The current weight is
    kept, moved to its polar factor.

    Args:
        module: the module that holds the attribute (complex64/complex128).
        name: the attribute to constrain.
        batched: constrain each matrix over the last two dims of a weight with more than two.
        atol: how far from the set an assigned value may be; ``None`` derives it from the
            dtype and size.

    Returns:
        ``module``, whose ``module.<name>`` is now unitary.

    Raises:
        TypeError: a real weight (the message says how to make it complex, or to use
            :func:`~manifoldparam.orthogonal`).
        ValueError: a vector, and the checks every constraint shares.

    Example:
        >>> cell = nn.Linear(6, 3, bias=False).to(torch.complex128)
        >>> W = mp.unitary(cell).weight                  # 3x6: orthonormal complex rows
        >>> bool(torch.allclose(W @ W.mH, torch.eye(3, dtype=W.dtype)))
        True
    """
    return register(module, name, Unitary, batched=batched, atol=atol)
