r"""The tall path of :class:`~manifoldparam.Orthogonal`: the same map in :math:`O(nk^2 + k^3)`
for :math:`k \ll n` (:mod:`manifoldparam.linalg.stiefel`).

The coordinates are those of the square path, in the same order: the strict lower triangle
of :math:`S` (row by row), then :math:`C` (row by row), :math:`nk - k(k+1)/2` numbers,
minimal. The base point is kept as three buffers instead of the :math:`n\times n` matrix
:math:`[U, U_\perp]`: ``base`` (:math:`U`, :math:`n\times k`), ``reflectors`` and ``wy``
(:math:`V`, :math:`T`: the complement :math:`U_\perp` in compact WY form, the Householder
reflectors of a QR of :math:`U`, reconstructed from :math:`U`). For the same
:math:`[U, U_\perp]` the two paths give the same weight.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from typing import Any

import torch
from torch import Tensor

from manifoldparam.hard.base import Parametrization, compute_dtype, max_abs
from manifoldparam.linalg.stiefel import householder_frame, orthonormalize, stiefel_map

#: The automatic switch (``tall=None``): the tall path when ``n >= TALL_RATIO * k`` and
#: ``n >= TALL_MIN_N``. Measured (BENCHMARKS.md, "Tall and wide Stiefel"): below, the square
#: map is as fast or faster (one skew exponential, its Taylor path without the correction step,
#: against a non-normal 2k×2k exponential and the n×k products).
TALL_RATIO = 3
TALL_MIN_N = 256


def use_tall(n: int, k: int, tall: bool | None) -> bool:
    if tall is None:
        return n >= TALL_RATIO * k and n >= TALL_MIN_N
    if type(tall) is not bool:
        raise ValueError(f"tall must be None (automatic by shape), True or False, got {tall!r}")
    return tall


def setup(p: Parametrization, tall: bool | None) -> bool:
    """Set ``p.tall`` (:func:`use_tall`); if true, register the tall path's buffers at the
    identity base (:math:`U = E_k`, :math:`Q = I`). Returns ``p.tall``."""
    p.tall = use_tall(p.n, p.k, tall)
    if not p.tall:
        return False
    n, k, batch = p.n, p.k, p.batch_shape
    ii, jj = torch.tril_indices(k, k, offset=-1)
    p.register_buffer("index", (ii * k + jj).contiguous(), persistent=False)
    eye = torch.eye(n, k)
    p.register_buffer("base", eye.expand(*batch, n, k).clone() if batch else eye)
    p.register_buffer("reflectors", eye.expand(*batch, n, k).clone() if batch else eye.clone())
    p.register_buffer("wy", torch.zeros(*batch, k, k))
    return True


def tall_map(p: Parametrization, x: Tensor) -> Tensor:
    """:math:`W = U F_1 + U_\\perp (C F_2)` for the coordinates ``x`` (``(*batch, dim)``)."""
    k = p.k
    m = k * (k - 1) // 2
    index = p.index.expand(*x.shape[:-1], -1)
    low = x.new_zeros(*x.shape[:-1], k * k).scatter(-1, index, x[..., :m]).unflatten(-1, (k, k))
    c = x[..., m:].unflatten(-1, (p.n - k, k))
    return stiefel_map(
        low - low.mT,
        c,
        p.base.to(x.dtype),
        p.reflectors.to(x.dtype),
        p.wy.to(x.dtype),
        cayley=p.method == "cayley",
        max_squarings=p.max_squarings,
    )


def set_frame(p: Parametrization, u: Tensor) -> None:
    """Move the base point to ``u`` (nearly orthonormal columns: a point of the set within its
    tolerance), made orthonormal to working precision (Newton--Schulz steps in float64), and
    its complement's Householder reflectors from the stored base (in the dtype the map runs in: the
    complement is as orthogonal as that dtype allows), all :math:`O(nk^2)`."""
    dtype = p.base.dtype
    work = compute_dtype(dtype)
    # (to a tenth of the stored dtype's eps, or to float64's round-off floor)
    coarse = 0.1 * torch.finfo(work).eps if work != torch.float64 else 0.0
    u = orthonormalize(u.detach().to(torch.float64), coarse + 8 * math.sqrt(p.k) * 2**-52)
    base = u.to(dtype).contiguous()
    v, t = householder_frame(base.to(work))
    p.base = base
    p.reflectors = v.to(dtype).contiguous()
    p.wy = t.to(dtype).contiguous()


def frame_error(base: Tensor, v: Tensor, t: Tensor) -> float:
    """``max| |Q[:, :k]ᵀ U| - I |`` in float64: whether the complement in ``(v, t)`` is that of
    ``base`` (``Q[:, :k] = U·D``, ``D`` diagonal ±1)."""
    b, v, t = (z.detach().to(torch.float64) for z in (base, v, t))
    k = b.shape[-1]
    eye = torch.eye(v.shape[-2], k, dtype=b.dtype, device=b.device)
    q = eye - v @ (t @ v[..., :k, :].mT)
    return float(max_abs((q.mT @ b).abs() - torch.eye(k, dtype=b.dtype, device=b.device)))


def check_frame(
    p: Parametrization, state: MutableMapping[str, Any], prefix: str, tol: float
) -> None:
    """The checkpoint's ``reflectors`` and ``wy``: of this path's shapes, finite, and the
    complement of the checkpoint's (or this) base. Nothing on the square path."""
    if not p.tall:
        return
    v = p._loaded(state, prefix + "reflectors", p.reflectors, "complement reflectors")
    t = p._loaded(state, prefix + "wy", p.wy, "complement WY factor")
    if v is None or t is None:
        return
    b = state.get(prefix + "base", p.base)
    error = frame_error(b, v, t)
    if not math.isfinite(error) or error > tol:
        raise RuntimeError(
            f"{p.owner}: the checkpoint's {prefix}reflectors/{prefix}wy do not complete its "
            f"base point (max error {error:.3e} > {tol:.3e}); loaded, the weight would be off "
            "the set. Load the checkpoint these buffers were saved with."
        )


def check_shape(p: Parametrization, state: MutableMapping[str, Any], key: str) -> None:
    """A base of the other path's shape (``n×n`` where this is tall, or ``n×k`` where it is
    square): name the option that reads it."""
    b = state.get(key)
    if not isinstance(b, Tensor) or b.shape == p.base.shape or b.dim() < 2:
        return
    n, k = p.n, p.k
    if tuple(b.shape[-2:]) in ((n, n), (n, k)) and n != k:
        flag = not p.tall
        raise RuntimeError(
            f"{p.owner}: the checkpoint's base point {key!r} has shape {tuple(b.shape)}, that "
            f"of the {'tall' if flag else 'square'} path; this constraint uses the "
            f"{'tall' if p.tall else 'square'} one. Build it with orthogonal(..., tall={flag}) "
            "to load this checkpoint (and keep that option for models saved with it)."
        )
