r"""The matrix exponential as a ``torch.library`` custom op, for ``torch.compile``.

``torch.ops.manifoldparam.expm_v1(a, max_squarings, projected)`` is :func:`~.expm.expm`
(``projected=False``) or :func:`~.expm.expm_projected` (``projected=True``) as one opaque
node: Dynamo and AOTAutograd do not trace into it, inductor calls it as an external kernel,
and its gradient is our Fréchet adjoint (:func:`~._frechet._adjoint`, about two forwards)
through ``register_autograd``, instead of ``torch.linalg.matrix_exp`` and its backward (the
exponential of a :math:`2n\times 2n` block matrix, about ten forwards). Inside the op the
tensors are real, so the degree and the squarings are chosen from the norms read on the host,
as in eager mode (``max_squarings = -1``), with no graph break.

The forward also returns what the backward needs, in a fixed layout the fake kernel can
describe: on the Taylor path (a trained orthogonal weight near its base, OFT's blocks) the
scaled ``A``, ``A²``, ``P₁``, ``Q₁``, ``Q₂`` and the squares, in a workspace of
``5 + 2`` matrices, the per-matrix squarings ``s`` and the path ``(m, s_max, uniform)``. The
backward, a second op ``expm_backward_v1``, applies the adjoint to them as eager mode does
(about two forwards in all); on the Padé path, whose intermediates vary in number, it
recomputes them from ``a`` first (about three forwards), still far below ``matrix_exp``'s.
No double backward (a compiled backward has none; see ``manifoldparam.interop.compile``).

The names carry a version (``_v1``): compile caches key on op names, so a change of the
op's semantics gets a new name.
"""

from __future__ import annotations

import torch
from torch import Tensor

from manifoldparam._device import autocast_off, may_read_on_host
from manifoldparam.linalg._frechet import _adjoint
from manifoldparam.linalg._scheme import _TAYLOR, _TAYLOR_MAX_SQUARINGS, _forward
from manifoldparam.linalg.expm import SYNC_FREE_SQUARINGS

__all__ = ["expm_op"]


def _squarings(a: Tensor, max_squarings: int) -> int | None:
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


#: Slots of the workspace the forward returns: the Taylor path's A, A², P₁, Q₁, Q₂ and up to
#: two squares (see ``_scheme._taylor_saved``).
_SLOTS = 5 + _TAYLOR_MAX_SQUARINGS


def _real(a: Tensor) -> torch.dtype:
    return a.real.dtype if a.is_complex() else a.dtype


@torch.library.custom_op("manifoldparam::expm_v1", mutates_args=())
def _expm_v1(
    a: Tensor, max_squarings: int, projected: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    ws = a.new_empty((_SLOTS, *a.shape))
    s = a.new_zeros(a.shape[:-2], dtype=_real(a))
    meta = torch.zeros(3, dtype=torch.int64, device=a.device)
    if a.shape[-1] == 0:
        ws.zero_()
        return a.clone(), ws, s, meta
    used = 0  # (the unused slots are zeroed: an op's outputs are deterministic)
    with autocast_off(a):
        x, saved, (m, s_max, uniform) = _forward(a, _squarings(a, max_squarings), skew=projected)
        if m == _TAYLOR:  # what the backward needs, in fixed slots (no recomputation)
            a_s, a2, p1, _, q1, q2, *_, sq, s_used = saved
            for used, t in enumerate((a_s, a2, p1, q1, q2, *sq), start=1):
                ws[used - 1].copy_(t)
            s.copy_(s_used)
        ws[used:].zero_()
        meta.copy_(torch.tensor([m, s_max, int(uniform)]))
    return _fresh(x, a), ws, s, meta


@_expm_v1.register_fake
def _(a: Tensor, max_squarings: int, projected: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return (
        torch.empty_like(a),
        a.new_empty((_SLOTS, *a.shape)),
        a.new_empty(a.shape[:-2], dtype=_real(a)),
        torch.empty(3, dtype=torch.int64, device=a.device),
    )


@torch.library.custom_op("manifoldparam::expm_backward_v1", mutates_args=())
def _expm_backward_v1(
    a: Tensor,
    grad: Tensor,
    ws: Tensor,
    s: Tensor,
    meta: Tensor,
    max_squarings: int,
    projected: bool,
) -> Tensor:
    if a.shape[-1] == 0:
        return grad.clone()
    m, s_max, uniform = (int(v) for v in meta.tolist())
    with autocast_off(a):
        if m == _TAYLOR:
            empty = a[..., :0, :0]
            sq = ws[5 : 5 + s_max]
            saved = (ws[0], ws[1], ws[2], empty, ws[3], ws[4], empty, empty, None, None, sq, s)
            ga = _adjoint(grad, saved, m, s_max, bool(uniform), solve_lu=True, projected=projected)
        else:  # Padé: recompute the intermediates (their number depends on the path)
            _, saved, (m, s_max, uni) = _forward(a, _squarings(a, max_squarings), skew=projected)
            ga = _adjoint(grad, saved, m, s_max, uni, solve_lu=True, projected=projected)
    return _fresh(ga, a, grad, ws)


@_expm_backward_v1.register_fake
def _(
    a: Tensor,
    grad: Tensor,
    ws: Tensor,
    s: Tensor,
    meta: Tensor,
    max_squarings: int,
    projected: bool,
) -> Tensor:
    return torch.empty_like(a)


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    a, max_squarings, projected = inputs
    _, ws, s, meta = output
    ctx.save_for_backward(a, ws, s, meta)
    ctx.max_squarings = max_squarings
    ctx.projected = projected


def _backward(ctx, grad: Tensor, *_unused):  # type: ignore[no-untyped-def]
    a, ws, s, meta = ctx.saved_tensors
    ga = torch.ops.manifoldparam.expm_backward_v1(
        a, grad.contiguous(), ws, s, meta, ctx.max_squarings, ctx.projected
    )
    return ga, None, None


torch.library.register_autograd("manifoldparam::expm_v1", _backward, setup_context=_setup_context)


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
    return torch.ops.manifoldparam.expm_v1(
        a, -1 if max_squarings is None else int(max_squarings), bool(projected)
    )[0]
