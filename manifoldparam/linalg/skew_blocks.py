r"""Many small rotations from their coordinates: :math:`R_i = \exp(A_i)`, :math:`A_i` real skew,
in a few batched kernels (orthogonal fine-tuning's 128 blocks of 32×32).

Math. The coordinates ``x`` (shape ``(k, n(n-1)/2)``) are the strictly lower entries of
:math:`A_i`, the upper ones are :math:`-x`. The exponential is the degree-8 Taylor polynomial
in three products (:mod:`._scheme`'s :math:`T_8`, Bader, Blanes & Casas 2019) at
:math:`2^{-s}A`, squared :math:`s` times, one :math:`s` for the whole batch; the backward is
the exact derivative of that computation (``5 + 2s`` products), so value and gradient belong to
the same function.

The choice of :math:`s`. For skew :math:`A` (normal, eigenvalues :math:`\pm i\omega_j`),
:math:`\|e^A - T_8(A)\|_2 = \max_j |e^{i\omega_j} - T_8(i\omega_j)| \le \sum_{q\ge 9}
\rho^q/q!` with :math:`\rho = \rho(A)`; :math:`s` makes the bound at :math:`2^{-s}\rho` at most
the unit round-off (:math:`2^{-s}\rho \le 0.645` in float32, :math:`0.0699` in float64). The
derivative of the same remainder is at most :math:`\rho^8/8!` (float32: 7.6e-7 relative), the
gap between this gradient and the Fréchet derivative of :math:`\exp` itself. :math:`\rho` is
bounded above without an eigensolver, from traces of :math:`M = -A^2 = A^\top A` (positive
semi-definite, each eigenvalue :math:`\omega_j^2` at least twice, so :math:`2\rho^{2p} \le
t_p = \operatorname{tr} M^p`): :math:`\rho \le \min((t_2/2)^{1/4}, (t_3/2)^{1/6})`, with
:math:`t_2 = \|A^2\|_F^2` after the first product and :math:`t_3 = -\operatorname{tr}(A^6)`
from :math:`\langle A^2, Q_1\rangle` after the second (the odd powers of a skew matrix have
no trace), and :math:`\rho \le \|A\|_1 \le (n-1)\max|x|` where the traces overflow or are
NaN (the maximum over the finite coordinates: a block with NaN comes out NaN, the others
exact). The
bounds are monotone in the traces, so the batch's largest traces bound every block: two
floats read on the host per call (a sync on a GPU; ``max|x|`` too where the traces
overflow), and the second product redone once when :math:`s > 0`. At a trained adapter's size
(entries ~0.05 at n = 32: :math:`\rho \approx 0.58`, bound 0.62) this gives :math:`s = 0`,
8 products for the forward and backward together. After more than one squaring in float32
(two in float64) the result gets one Newton--Schulz step, which the backward does not see.

Under ``torch.compile`` the choice of :math:`s` is made in the graph (``torch.cond`` on the
same bound, :mod:`._traced`): for :math:`s \le 2` the polynomial and its exact derivative are
traced, so that inductor fuses their elementwise work, and beyond it the same forward and
backward run as the custom ops ``manifoldparam::expm_skew_blocks_v1`` and
``expm_skew_blocks_backward_v1`` (for every :math:`s` on an accelerator, under
``torch.compile(dynamic=True)`` and ``torch.export(strict=True)``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from manifoldparam._device import autocast_off
from manifoldparam.linalg._scheme import (
    _C1,
    _THETA,
    _X1,
    _X2,
    _X3,
    _X4,
    _X5,
    _X6Q,
    _X7,
    _Y2,
    _taylor_cap,
)
from manifoldparam.linalg._traced import traced_exp, traced_ok

__all__ = ["SkewIndex", "expm_skew_blocks", "rho_bound", "skew_index"]


def rho_bound(t2: float, t3: float) -> float:
    """An upper bound of ``ρ(A)`` for a real skew ``A`` from ``t_p = tr((AᵀA)^p)``, p = 2, 3
    (see the module doc); monotone in both, so the largest ``t_p`` of a batch bounds every
    matrix of it (NaN in, NaN out)."""
    if math.isnan(t2) or math.isnan(t3):
        return math.nan
    return min(math.sqrt(max(t2, 0.0) / 2), (max(t3, 0.0) / 2) ** (1 / 3)) ** 0.5


def _squarings(rho: float, dtype: torch.dtype) -> int:
    if not math.isfinite(rho) or rho <= 0.0:
        return 0  # (non-finite coordinates: the result is non-finite, and detected downstream)
    return max(math.ceil(math.log2(rho / _THETA[dtype])), 0)


class SkewIndex(NamedTuple):
    """Where the coordinates of an ``n``×``n`` skew block go (flat, row-major): entry ``j`` of
    ``A`` is ``sign[j]·x[take[j]]``; ``low``/``up`` are the strictly lower entries and their
    mirrors, in ``torch.tril_indices(n, n, -1)`` order."""

    take: Tensor
    sign: Tensor
    low: Tensor
    up: Tensor


def skew_index(n: int, device: torch.device | str | None = None) -> SkewIndex:
    """The :class:`SkewIndex` of an ``n``×``n`` block (built once by the caller and kept)."""
    ii, jj = torch.tril_indices(n, n, offset=-1, device=device)
    low, up = ii * n + jj, jj * n + ii
    coordinate = torch.arange(low.numel(), device=device)
    take = torch.zeros(n * n, dtype=torch.long, device=device)
    take[low] = take[up] = coordinate
    sign = torch.zeros(n * n, device=device)
    sign[low], sign[up] = 1.0, -1.0
    return SkewIndex(take, sign, low, up)


# Why the buffers are reused below: on the CPU a fresh tensor of half a megabyte or more is a
# fresh mmap, and its first touch page-faults (about 100 µs for 128 blocks of 32x32, more than a
# batched product), so each block of work writes into a buffer that is already touched.
def _forward(x: Tensor, index: SkewIndex) -> tuple[Tensor, tuple[Tensor, ...], list[Tensor], int]:
    """``(R, (A, A², P, Q₁, Q₂), squares, s)`` for coordinates ``x`` of shape ``(k, p)``."""
    k = x.shape[0]
    n = math.isqrt(index.take.numel())
    a = x.index_select(1, index.take).mul_(index.sign.to(x.dtype)).view(k, n, n)
    a2 = torch.bmm(a, a)
    p = torch.add(a2, a, alpha=_C1)
    q1 = torch.baddbmm(a2, a2, p, beta=_X3, alpha=_X2)  # x₃A² + A₄
    # ρ from t₂ = ‖A²‖²_F and t₃ = -tr(A⁶) = (x₃t₂ - ⟨A², Q₁⟩)/x₂ (tr A⁵ = 0); the
    # product A²∘Q₁ is written where R goes.
    r = torch.mul(a2, q1)
    t2 = torch.linalg.vector_norm(a2.view(k, -1), dim=-1).square_()
    t3 = t2.mul(_X3).sub_(r.view(k, -1).sum(-1)).div_(_X2)
    t2_max, t3_max = torch.stack([t2.amax(), t3.amax()]).tolist()
    rho = rho_bound(t2_max, t3_max)
    finite = math.isfinite(rho)
    if not finite:  # a power overflowed (or x is not finite): ρ <= ‖A‖₁ <= (n-1)·max|x|
        # over the finite coordinates: a block with NaN or inf comes out NaN whatever s is, and
        # must not leave the finite blocks at s = 0
        rho = (n - 1) * float(x.abs().nan_to_num(nan=0.0, posinf=0.0).amax())
    s = _squarings(rho, x.dtype)
    if s > 0:  # scale, and redo the second product in place
        a.mul_(2.0**-s)
        if finite:
            a2.mul_(4.0**-s)
        else:
            torch.bmm(a, a, out=a2)
        torch.add(a2, a, alpha=_C1, out=p)
        torch.baddbmm(a2, a2, p, beta=_X3, alpha=_X2, out=q1)
    # T₈ = I + A + y₂A² + Q₁Q₂, Q₂ = x₄I + x₅A + x₆A² + x₇A₄ (A₄ = Q₁ - x₃A²).
    q2 = (a * _X5).add_(a2, alpha=_X6Q).add_(q1, alpha=_X7)
    q2.diagonal(dim1=-2, dim2=-1).add_(_X4)
    torch.add(a, a2, alpha=_Y2, out=r).baddbmm_(q1, q2)
    r.diagonal(dim1=-2, dim2=-1).add_(1.0)
    squares = _squares(r, s)
    if s:
        r = torch.bmm(squares[-1], squares[-1])
    if s > _taylor_cap(x.dtype != torch.float64):
        # Past T_8's squaring cap (_scheme) round-off grew like 2^s: one Newton--Schulz step
        # R(3I - RᵀR)/2, as a correction the backward does not see (its differential at an
        # orthogonal R is the identity on the tangent space: the gradient is unchanged).
        r = torch.baddbmm(r, r, torch.bmm(r.mT, r), beta=1.5, alpha=-0.5)
    return r, (a, a2, p, q1, q2), squares, s


def _squares(r0: Tensor, s: int) -> list[Tensor]:
    """``R₀, R₀², …`` (``s`` of them): the squares the squarings start from."""
    squares = [r0][:s]
    for _ in range(s - 1):
        squares.append(torch.bmm(squares[-1], squares[-1]))
    return squares


def _backward(
    g: Tensor, saved: tuple[Tensor, ...], squares: list[Tensor], s: int, index: SkewIndex
) -> Tensor:
    """The gradient w.r.t. the coordinates: the exact derivative of :func:`_forward`."""
    a, a2, p, q1, q2 = saved
    low, up = index.low, index.up
    g = g.contiguous()  # (a transposed gradient would give ga its strides)
    for xj in reversed(squares):  # X_{j+1} = X_j X_j
        xt = xj.mT
        g = torch.bmm(xt, g).baddbmm_(g, xt)
    gq2 = torch.bmm(q1.mT, g)
    gq1 = torch.bmm(g, q2.mT).add_(gq2, alpha=_X7)
    gp = torch.bmm(a2.mT, gq1)  # (the gradient w.r.t. P, over x₂)
    ga = torch.add(g, gq2, alpha=_X5).add_(gp, alpha=_X1)
    # ga2 in gp's buffer: x₂(gp + gq1·Pᵀ) + x₃gq1 + x₆'gq2 + y₂g.
    ga2 = gp.baddbmm_(gq1, p.mT, beta=_X2, alpha=_X2)
    ga2.add_(gq1, alpha=_X3).add_(gq2, alpha=_X6Q).add_(g, alpha=_Y2)
    # A² = A·A with A skew: the skew part of ga + ga2·Aᵀ + Aᵀ·ga2 is that of ga - S·A,
    # S = ga2 + ga2ᵀ (see _frechet._tail; the coordinates see only the skew part); S is
    # written in gq1's buffer.
    ga.baddbmm_(torch.add(ga2, ga2.mT, out=gq1), a, alpha=-1.0)
    flat = ga.view(ga.shape[0], -1)
    k, m = flat.shape[0], low.numel()
    mirror = torch.index_select(flat, 1, up, out=gq2.view(-1)[: k * m].view(k, m))
    gx = flat.index_select(1, low).sub_(mirror)
    if s:
        gx.mul_(2.0**-s)
    return gx


class _ExpSkewBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, index: SkewIndex) -> tuple[Tensor, int]:  # type: ignore[override]
        r, saved, squares, s = _forward(x, index)
        ctx.save_for_backward(*saved, *index, *squares)
        ctx.s = s
        return r, s

    @staticmethod
    def backward(ctx, g: Tensor, _s: None):  # type: ignore[override]
        a, a2, p, q1, q2, take, sign, low, up, *squares = ctx.saved_tensors
        index = SkewIndex(take, sign, low, up)
        with autocast_off(g):  # (a backward called inside an autocast block)
            return _backward(g, (a, a2, p, q1, q2), squares, ctx.s, index), None


# Under torch.compile: the same forward and backward as custom ops (opaque to Dynamo, which
# cannot trace the host read of the bound). The forward returns its intermediates; the
# squares past R₀ (large angles only) are recomputed by the backward.
@torch.library.custom_op("manifoldparam::expm_skew_blocks_v1", mutates_args=())
def _skew_blocks_op(
    x: Tensor, take: Tensor, sign: Tensor, low: Tensor, up: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    with autocast_off(x):
        r, saved, squares, s = _forward(x, SkewIndex(take, sign, low, up))
    r0 = squares[0] if squares else torch.zeros_like(r)  # (s = 0: R₀ is R, not returned twice)
    return r, *saved, r0, torch.tensor(s, dtype=torch.int64, device=x.device)


@_skew_blocks_op.register_fake
def _(
    x: Tensor, take: Tensor, sign: Tensor, low: Tensor, up: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    n = take.shape[0]
    shape = (x.shape[0], math.isqrt(n), math.isqrt(n))
    mats = [x.new_empty(shape) for _ in range(7)]
    return (*mats, torch.empty((), dtype=torch.int64, device=x.device))


@torch.library.custom_op("manifoldparam::expm_skew_blocks_backward_v1", mutates_args=())
def _skew_blocks_backward_op(
    g: Tensor, mats: list[Tensor], s: Tensor, take: Tensor, sign: Tensor, low: Tensor, up: Tensor
) -> Tensor:
    a, a2, p, q1, q2, r0 = mats
    steps = int(s)
    with autocast_off(g):  # (the squares too: a backward called inside an autocast block)
        index = SkewIndex(take, sign, low, up)
        return _backward(g, (a, a2, p, q1, q2), _squares(r0, steps), steps, index)


@_skew_blocks_backward_op.register_fake
def _(
    g: Tensor, mats: list[Tensor], s: Tensor, take: Tensor, sign: Tensor, low: Tensor, up: Tensor
) -> Tensor:
    return g.new_empty((g.shape[0], low.shape[0]))


def _op_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    _, *index = inputs
    _, *mats, s = output
    ctx.save_for_backward(*mats, s, *index)


def _op_backward(ctx, g: Tensor, *_unused):  # type: ignore[no-untyped-def]
    a, a2, p, q1, q2, r0, s, take, sign, low, up = ctx.saved_tensors
    gx = torch.ops.manifoldparam.expm_skew_blocks_backward_v1(
        g.contiguous(), [a, a2, p, q1, q2, r0], s, take, sign, low, up
    )
    return gx, None, None, None, None


torch.library.register_autograd(
    "manifoldparam::expm_skew_blocks_v1", _op_backward, setup_context=_op_setup
)


def expm_skew_blocks(x: Tensor, n: int, index: SkewIndex | None = None) -> tuple[Tensor, int]:
    """``(R, s)``: the rotations ``R_i = exp(A_i)``, shape ``(*batch, n, n)``, for the
    coordinates ``x`` (shape ``(*batch, n(n-1)/2)``: the strictly lower entries of ``A_i`` in
    ``torch.tril_indices(n, n, -1)`` order, the upper ones their negatives), and the number of
    squarings used.

    Args:
        x: real coordinates, float32 or float64 (float16/bfloat16 are computed in float32 and
            cast back); any number of batch dimensions.
        n: the block size (``n >= 2``).
        index: :func:`skew_index` ``(n, x.device)``, kept by a caller that calls often.

    Returns:
        The rotations (orthogonal, ``det = 1``) and ``s``, the squarings of the whole batch.

    Example:
        >>> x = 0.02 * torch.randn(128, 32 * 31 // 2)            # angles up to about 0.25
        >>> r, s = mp.linalg.expm_skew_blocks(x, 32)
        >>> r.shape, s
        (torch.Size([128, 32, 32]), 0)
        >>> float((r.mT @ r - torch.eye(32)).abs().max()) < 1e-6
        True
    """
    if x.dtype in (torch.float16, torch.bfloat16):
        r, s = expm_skew_blocks(x.float(), n, index)
        return r.to(x.dtype), s
    if x.shape[-1] != n * (n - 1) // 2 or n < 2:
        raise ValueError(
            f"expm_skew_blocks: a {n}x{n} skew block has {n * (n - 1) // 2} coordinates; "
            f"got x of shape {tuple(x.shape)}"
        )
    if index is None:
        index = skew_index(n, x.device)
    flat = x.reshape(-1, x.shape[-1])
    if torch.compiler.is_compiling():  # (s is not known at trace time: reported as -1)
        if traced_ok(flat):  # (s chosen in the graph: linalg/_traced.py)
            r = traced_exp(flat, *index)
        else:  # (autocast off inside)
            r = torch.ops.manifoldparam.expm_skew_blocks_v1(flat, *index)[0]
        return r.reshape(*x.shape[:-1], n, n), -1
    with autocast_off(x):
        r, s = _ExpSkewBlocks.apply(flat, index)
    return r.reshape(*x.shape[:-1], n, n), s
