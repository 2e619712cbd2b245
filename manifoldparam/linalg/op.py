r"""The matrix exponential as a ``torch.library`` custom op, for ``torch.compile`` (where the
traced path of :mod:`._traced` does not apply: squarings beyond two, accelerators, dynamic
shapes, export, a general matrix).

``torch.ops.manifoldparam.expm_v2(a, max_squarings, projected)`` is :func:`~.expm.expm`
(``projected=False``) or :func:`~.expm.expm_projected` (``projected=True``) as one opaque
node: Dynamo and AOTAutograd do not trace into it, inductor calls it as an external kernel,
and its gradient is our Fréchet adjoint (:func:`~._frechet._adjoint`, about two forwards)
through ``register_autograd``, instead of ``torch.linalg.matrix_exp`` and its backward (the
exponential of a :math:`2n\times 2n` block matrix, about ten forwards). Inside the op the
tensors are real, so the degree and the squarings are chosen from the norms read on the host,
as in eager mode (``max_squarings = -1``), with no graph break.

The forward also returns what the backward needs, without copying it: its own
intermediates, as a list of six matrices in single precision (Padé: ``A²``, ``A⁴``, ``A⁶``,
``W``, the LU factors, ``R``; Taylor: ``A²``, ``P₁``, ``Q₂``, ``Q₁``) and eight in double
(Padé 13's ``W₁``, ``Z₁``), zeros where a path has nothing; the pivots, the per-matrix
squarings ``s`` and the path ``(m, s_max, uniform)``. The backward, a second op
``expm_backward_v2``, squares ``R`` again for the intermediate squares (``s_max - 1``
products: none at a trained weight's or OFT's usual size), rescales ``A`` and applies the
adjoint as eager mode does. No double backward (a compiled backward has none; see
``manifoldparam.interop.compile``).

With ``projected`` (``A`` skew, so ``exp(A)`` is orthogonal) the forward adds one
Newton--Schulz step where the path is off the Taylor floor (Padé, or more squarings than T_8
is allowed), which the backward does not see: what the orthogonal maps do in eager mode, so a
compiled map adds no step of its own there.

The names carry a version (``_v2``): compile caches key on op names, so a change of the
op's semantics gets a new name.
"""

from __future__ import annotations

import torch
from torch import Tensor

from manifoldparam._device import autocast_off, may_read_on_host
from manifoldparam.linalg._frechet import _adjoint
from manifoldparam.linalg._scheme import (
    _TAYLOR,
    _forward,
    _scale,
    _squarings,
    _taylor_cap,
)
from manifoldparam.linalg.expm import SYNC_FREE_SQUARINGS

__all__ = ["expm_op"]


def _choice(a: Tensor, max_squarings: int) -> int | None:
    """``None`` (read the norms) where that read is cheap, else a fixed number (a CUDA graph
    being captured, e.g. ``mode="reduce-overhead"``): as :func:`~.expm.expm` decides."""
    if max_squarings >= 0:
        return max_squarings
    return None if may_read_on_host(a) else SYNC_FREE_SQUARINGS


def _fresh(out: Tensor, *inputs: Tensor) -> Tensor:
    """A custom op may not return (a view of) an input, and must have the fake's layout."""
    out = out.contiguous()
    if any(out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in inputs):
        return out.clone()
    return out


def _squares(r: Tensor, s: Tensor, s_max: int, uniform: bool) -> list[Tensor]:
    """The squares ``X_0 = R, …, X_{s_max-1}`` of the forward's squarings again
    (:func:`~._scheme._squarings` one short of the end): ``s_max - 1`` products, none for
    ``s_max <= 1``."""
    if s_max == 0:
        return []
    last, before = _squarings(r, s, s_max - 1, uniform)
    return [*before, last]


def _slots(dtype: torch.dtype) -> int:
    """How many matrices the forward returns: ``A², A⁴, A⁶, W, LU, R`` (+ ``W₁, Z₁`` in double
    precision, where Padé 13 runs)."""
    return 6 if dtype in (torch.float32, torch.complex64) else 8


def _polished(a: Tensor, m: int, s_max: int, projected: bool) -> bool:
    """Whether the forward adds one Newton--Schulz step to ``exp(A)``: for a skew ``A``
    (``projected``, so ``exp(A)`` is orthogonal) off the Taylor path's round-off floor (Padé,
    or more squarings than ``_scheme`` allows T_8), as the orthogonal maps do in eager mode."""
    single = a.dtype in (torch.float32, torch.complex64)
    return projected and (m != _TAYLOR or s_max > _taylor_cap(single))


def _real(a: Tensor) -> torch.dtype:
    return a.real.dtype if a.is_complex() else a.dtype


@torch.library.custom_op("manifoldparam::expm_v2", mutates_args=())
def _expm_v2(
    a: Tensor, max_squarings: int, projected: bool
) -> tuple[Tensor, list[Tensor], Tensor, Tensor, Tensor]:
    mats: list[Tensor | None] = [None] * _slots(a.dtype)
    piv = torch.zeros((*a.shape[:-1],), dtype=torch.int32, device=a.device)
    s = a.new_zeros(a.shape[:-2], dtype=_real(a))
    meta = torch.zeros(3, dtype=torch.int64, device=a.device)
    if a.shape[-1] > 0:
        with autocast_off(a):
            x, saved, (m, s_max, uniform) = _forward(a, _choice(a, max_squarings), skew=projected)
            _, a2, a4, a6, w, w1, z1, lu, pv, r, _, s_used = saved
            polished = _polished(a, m, s_max, projected)
            if polished:  # (the backward does not see it: the eager maps' detached step)
                x = x.mul(1.5).sub_(x @ (x.mH @ x), alpha=0.5)
            if m == _TAYLOR:  # (a4, w, w1 hold P₁, Q₁, Q₂: Q₂ goes where A⁶ would)
                a6, w1 = w1, w1[..., :0, :0]
            extra = (w1, z1) if len(mats) == 8 else ()
            # R itself when there are squarings or a polish (else R is x: the backward has it);
            # the LU factors are column-major: returned transposed (no copy), as the fake says.
            keep_r = s_max > 0 or polished
            for i, t in enumerate((a2, a4, a6, w, lu.mT, r if keep_r else None, *extra)):
                if t is not None and t.shape == a.shape:  # (else unused by this path)
                    mats[i] = t.contiguous()
            if m != _TAYLOR:
                piv.copy_(pv)
            s.copy_(s_used)
            meta.copy_(torch.tensor([m, s_max, int(uniform)]))
    else:
        x = a.clone()
    # What this path does not use: zeros (never read; an op's outputs must be deterministic).
    out = [a.new_zeros(a.shape) if t is None else t for t in mats]
    return _fresh(x, a), out, piv, s, meta


@_expm_v2.register_fake
def _(
    a: Tensor, max_squarings: int, projected: bool
) -> tuple[Tensor, list[Tensor], Tensor, Tensor, Tensor]:
    return (
        torch.empty_like(a),
        [torch.empty_like(a) for _ in range(_slots(a.dtype))],
        torch.empty((*a.shape[:-1],), dtype=torch.int32, device=a.device),
        a.new_empty(a.shape[:-2], dtype=_real(a)),
        torch.empty(3, dtype=torch.int64, device=a.device),
    )


@torch.library.custom_op("manifoldparam::expm_backward_v2", mutates_args=())
def _expm_backward_v2(
    a: Tensor,
    x: Tensor,
    grad: Tensor,
    mats: list[Tensor],
    piv: Tensor,
    s: Tensor,
    meta: Tensor,
    projected: bool,
) -> Tensor:
    if a.shape[-1] == 0:
        return grad.clone()
    m, s_max, uniform = (int(v) for v in meta.tolist())
    with autocast_off(a):
        a2, a4, a6, w, lu_t, r, *extra = mats
        lu = lu_t.mT
        r = r if s_max or _polished(a, m, s_max, projected) else x
        squares = _squares(r, s, s_max, bool(uniform))
        a_s = _scale(a, s, s_max, bool(uniform)) if s_max else a
        empty = a[..., :0, :0]
        if m == _TAYLOR:  # the layout of _scheme._taylor_saved
            saved = (a_s, a2, a4, empty, w, a6, empty, empty, None, r, squares, s)
        else:
            w1, z1 = extra if m == 13 else (empty, empty)
            saved = (a_s, a2, a4, a6, w, w1, z1, lu, piv, r, squares, s)
        ga = _adjoint(grad, saved, m, s_max, bool(uniform), solve_lu=True, projected=projected)
    return _fresh(ga, a, grad, x, *mats)


@_expm_backward_v2.register_fake
def _(
    a: Tensor,
    x: Tensor,
    grad: Tensor,
    mats: list[Tensor],
    piv: Tensor,
    s: Tensor,
    meta: Tensor,
    projected: bool,
) -> Tensor:
    return torch.empty_like(a)


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    a, _, projected = inputs
    x, mats, piv, s, meta = output
    ctx.save_for_backward(a, x, piv, s, meta, *mats)
    ctx.projected = projected


def _backward(ctx, grad: Tensor, *_unused):  # type: ignore[no-untyped-def]
    a, x, piv, s, meta, *mats = ctx.saved_tensors
    ga = torch.ops.manifoldparam.expm_backward_v2(
        a, x, grad.contiguous(), mats, piv, s, meta, ctx.projected
    )
    return ga, None, None


torch.library.register_autograd("manifoldparam::expm_v2", _backward, setup_context=_setup_context)


def expm_op(a: Tensor, max_squarings: int | None = None, projected: bool = False) -> Tensor:
    """``exp(a)`` through the custom op (what the orthogonal maps call under ``torch.compile``).

    Args:
        a: square matrices ``(*batch, n, n)``, float32/float64 (half precision: compute in
            float32 first, as the maps do).
        max_squarings: ``None``: chosen from the norms inside the op; an int: that many masked
            squarings (see :func:`~manifoldparam.linalg.expm`).
        projected: ``a`` is skew by construction and only the skew part of its gradient is
            used (:func:`~manifoldparam.linalg.expm_projected`).

    Returns:
        ``exp(a)``, with the Fréchet-adjoint backward.
    """
    return torch.ops.manifoldparam.expm_v2(
        a, -1 if max_squarings is None else int(max_squarings), bool(projected)
    )[0]
