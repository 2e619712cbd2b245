r"""The matrix exponential as a ``torch.library`` custom op, for ``torch.compile``.

``torch.ops.manifoldparam.expm_v1(a, max_squarings, projected)`` is :func:`~.expm.expm`
(``projected=False``) or :func:`~.expm.expm_projected` (``projected=True``) as one opaque
node: Dynamo and AOTAutograd do not trace into it, inductor calls it as an external kernel,
and its gradient is our Fréchet adjoint (:func:`~._frechet._adjoint`, about two forwards)
through ``register_autograd``, instead of ``torch.linalg.matrix_exp`` and its backward (the
exponential of a :math:`2n\times 2n` block matrix, about ten forwards). Inside the op the
tensors are real, so the degree and the squarings are chosen from the norms read on the host,
as in eager mode (``max_squarings = -1``), with no graph break.

The backward is a second op, ``expm_backward_v1(a, grad, max_squarings, projected)``: the
graph cannot carry the forward's intermediates (their number depends on the path the norms
chose), so it recomputes them from ``a`` (one forward) and applies the adjoint: about three
forwards in all instead of two in eager mode, still far below ``matrix_exp``'s. No double
backward (a compiled backward has none; see :mod:`manifoldparam.interop.compile`).

The names carry a version (``_v1``): compile caches key on op names, so a change of the
op's semantics gets a new name.
"""

from __future__ import annotations

import torch
from torch import Tensor

from manifoldparam._device import autocast_off, may_read_on_host
from manifoldparam.linalg._frechet import _adjoint
from manifoldparam.linalg._scheme import _forward
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


@torch.library.custom_op("manifoldparam::expm_v1", mutates_args=())
def _expm_v1(a: Tensor, max_squarings: int, projected: bool) -> Tensor:
    if a.shape[-1] == 0:
        return a.clone()
    with autocast_off(a):
        x = _forward(a, _squarings(a, max_squarings), skew=projected)[0]
    return _fresh(x, a)


@_expm_v1.register_fake
def _(a: Tensor, max_squarings: int, projected: bool) -> Tensor:
    return torch.empty_like(a)


@torch.library.custom_op("manifoldparam::expm_backward_v1", mutates_args=())
def _expm_backward_v1(a: Tensor, grad: Tensor, max_squarings: int, projected: bool) -> Tensor:
    if a.shape[-1] == 0:
        return grad.clone()
    with autocast_off(a):
        _, saved, (m, s_max, uniform) = _forward(a, _squarings(a, max_squarings), skew=projected)
        ga = _adjoint(grad, saved, m, s_max, uniform, solve_lu=True, projected=projected)
    return _fresh(ga, a, grad)


@_expm_backward_v1.register_fake
def _(a: Tensor, grad: Tensor, max_squarings: int, projected: bool) -> Tensor:
    return torch.empty_like(a)


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    a, max_squarings, projected = inputs
    ctx.save_for_backward(a)
    ctx.max_squarings = max_squarings
    ctx.projected = projected


def _backward(ctx, grad: Tensor):  # type: ignore[no-untyped-def]
    (a,) = ctx.saved_tensors
    ga = torch.ops.manifoldparam.expm_backward_v1(
        a, grad.contiguous(), ctx.max_squarings, ctx.projected
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
    )
