"""The forward scheme of :func:`manifoldparam.linalg.expm`: thresholds, the choice of the
degree and the squarings from norms of powers, the Padé and Taylor approximants, the
squarings. The derivation is in :mod:`manifoldparam.linalg.expm`'s docstring."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from manifoldparam._torch import is_functorch_wrapped

# Padé [m/m] coefficients of exp (Higham 2005), normalised by b_0 (same r_m, O(1) numbers).
_B7 = (17297280.0, 8648640.0, 1995840.0, 277200.0, 25200.0, 1512.0, 56.0, 1.0)
_B13 = (
    64764752532480000.0,
    32382376266240000.0,
    7771770303897600.0,
    1187353796428800.0,
    129060195264000.0,
    10559470521600.0,
    670442572800.0,
    33522128640.0,
    1323241920.0,
    40840800.0,
    960960.0,
    16380.0,
    182.0,
    1.0,
)
_C7 = tuple(b / _B7[0] for b in _B7)
_C13 = tuple(b / _B13[0] for b in _B13)
# min(theta_m of the 2009 expm, ell_m of the 2009 Frechet paper, Table 6.1).
# float64 (u = 2^-53): m = 7 without scaling if max(d6, d8) <= 0.783, else m = 13 and 4.25.
_THETA7 = 0.783
_THETA13 = 4.25
# float32 (u = 2^-24): m = 7 always, with ell_7 = 3.249 (computed as in the Frechet paper,
# Sec. 6: largest x with sum_k k|c_k| x^(k-1) <= u for log(e^-x r_7(x)) = sum_k c_k x^k; the
# same computation reproduces its double-precision table) less a small margin.
_THETA7_F32 = 3.2

# Small norms: the degree-8 Taylor polynomial T_8 in three products (Bader, Blanes & Casas,
# "Computing the matrix exponential with an optimized Taylor polynomial approximation",
# Mathematics 7(12), 2019; x3 = 2/3 fixes the one free parameter), no LU and no solve:
#   A4 = A2 (x1 A + x2 A2),  A8 = (x3 A2 + A4)(x4 I + x5 A + x6 A2 + x7 A4),
#   T8 = I + A + y2 A2 + A8.
_SQRT177 = math.sqrt(177.0)
_X3 = 2.0 / 3.0
_X1 = _X3 * (1.0 + _SQRT177) / 88.0
_X2 = _X3 * (1.0 + _SQRT177) / 352.0
_X4 = (-271.0 + 29.0 * _SQRT177) / (315.0 * _X3)
_X5 = (-11.0 + 11.0 * _SQRT177) / (1260.0 * _X3)
_X6 = (-99.0 + 11.0 * _SQRT177) / (5040.0 * _X3)
_X7 = (89.0 - _SQRT177) / (5040.0 * _X3 * _X3)
_Y2 = (857.0 - 58.0 * _SQRT177) / 630.0
# For skew A (expm_skew_blocks and the compiled path): the largest 2^-s ρ at which
# sum_{q >= 9} ρ^q / q! <= u (float32 2^-24, float64 2^-53); T_8 written with P = A² + _C1·A
# (so that A²·P·_X2 is A₄) and _X6Q, Q₂'s A² coefficient once A₄ is written as Q₁ - x₃A².
_THETA = {torch.float32: 0.645, torch.float64: 0.0699}
_C1 = _X1 / _X2
_X6Q = _X6 - _X7 * _X3
# ell_8 (the Frechet-derivative threshold of T_8, computed from the series of
# log(e^-x T_8(x)) as for the Pade thresholds; the forward ones are 0.580 / 0.0499, torch's):
# 0.4451 (u = 2^-24), 0.03796 (u = 2^-53), less a small margin.
_ELL8_F32 = 0.44
_ELL8_F64 = 0.0375
# T_8 is used while it needs at most this many squarings (then it is cheaper than Pade 7
# without squarings: 3 + s products forward and 6 + 2s backward, against 4 + 9 and an LU
# with two solves). float32: at most one, since two squarings of T_8 lose 3-10x more to
# rounding than Pade 7 without squarings (measured, n = 256..1024, skew and general A).
_TAYLOR_MAX_SQUARINGS = 2
_TAYLOR_MAX_SQUARINGS_F32 = 1


def _taylor_cap(single: bool) -> int:
    """T_8's squaring cap (single precision: float32, complex64); past it the orthogonal paths
    add one Newton--Schulz step."""
    return _TAYLOR_MAX_SQUARINGS_F32 if single else _TAYLOR_MAX_SQUARINGS


_TAYLOR = 8  # the value of m that marks the Taylor path


def _norm1(x: Tensor) -> Tensor:
    """1-norm (max column abs sum) of each matrix, in the real dtype; shape ``batch``."""
    return x.abs().sum(-2).amax(-1)


def _skew(a: Tensor) -> Tensor:
    """1.0 for each matrix with ``Aᴴ = -A`` exactly (skew-symmetric/-Hermitian), else 0.0;
    shape ``batch``, the real dtype. (``a - a.mT`` is exactly skew in floating point.)

    Why it matters: the truncation bounds hold in any consistent norm (Al-Mohy & Higham 2009,
    Theorem 4.2). A skew matrix is normal, so in the 2-norm ``‖Aᵏ‖₂ = ρ(A)ᵏ`` and every
    ``d_k = ρ(A)``; its even powers are Hermitian, so ``ρ(A) = ‖A^{2k}‖₂^{1/2k} ≤
    ‖A^{2k}‖₁^{1/2k}``. Hence ``α_p ≤ min(‖A²‖₁^{1/2}, ‖A⁴‖₁^{1/4}, ‖A⁶‖₁^{1/6})``: the
    ``(‖A‖₁‖A²‖₁)^{1/3}`` bound on ``d₃``, loose for skew matrices (``‖A‖₁`` is up to
    ``√n·ρ(A)``), is not needed. A trained orthogonal weight at n = 190 (``‖A‖₁ ≈ 1.5``,
    ``‖A²‖₁^{1/2} ≈ 0.85``, ``ρ ≈ 0.6``) needs one squaring of T_8 in float32 instead of two.
    """
    asym = (a + a.mH).abs().amax((-2, -1))  # the real dtype
    return asym.eq(0).to(asym.dtype)


def _expand(v: Tensor) -> Tensor:
    return v[..., None, None]


def _scale(x: Tensor, s: Tensor, s_max: int, uniform: bool, k: int = 1) -> Tensor:
    """``x · 2^{-k·s}`` for each matrix; a Python scalar when every matrix has ``s = s_max``."""
    if uniform:
        return x * 2.0 ** (-k * s_max)
    return x * _expand(torch.exp2(-k * s)).to(x.dtype)


def _choose(
    a: Tensor,
    a2: Tensor,
    a4: Tensor,
    a6: Tensor,
    max_squarings: int | None,
    head: list[list[float]] | None = None,
) -> tuple[int, Tensor, int, bool, bool, Tensor | None]:
    """(m, s per matrix, s_max, uniform s, overflow, beyond) from the norms of A, A², A⁴, A⁶.

    One host read (of the norms) unless ``max_squarings`` is given; with it, everything stays
    on the device: ``s`` clamped to ``max_squarings``, squarings masked, no overflow fallback,
    and ``beyond`` marks the matrices that needed more squarings (the caller sets them to NaN:
    nothing can be raised without a host read); ``None`` in the host mode.
    ``head``: ``[‖A‖₁, ν₂, skew]`` per matrix, already read on the host (:func:`_head_norms`).
    """
    single = a.dtype in (torch.float32, torch.complex64)
    if max_squarings is None:
        return (*_choose_on_host(a, a2, a4, a6, single, head), None)
    n2, n4, n6 = _norm1(a2), _norm1(a4), _norm1(a6)
    d4 = n4.pow(1 / 4)
    d6 = n6.pow(1 / 6)
    d8 = torch.minimum(d4, (n2 * n6).pow(1 / 8))
    d10 = (n4 * n6).pow(1 / 10)
    eta3 = torch.maximum(d6, d8)
    eta5 = torch.minimum(eta3, torch.maximum(d8, d10))
    # Skew matrices are normal: in the 2-norm every d_k is ρ(A) (see _skew).
    rho = torch.minimum(torch.minimum(n2.pow(1 / 2), d4), d6)
    normal = _skew(a).bool()
    eta3 = torch.where(normal, rho, eta3)
    eta5 = torch.where(normal, rho, eta5)
    # Non-finite (or overflowed) norms: no squarings.
    eta3 = torch.nan_to_num(eta3, nan=0.0, posinf=0.0)
    eta5 = torch.nan_to_num(eta5, nan=0.0, posinf=0.0)
    if single:  # float32: always m = 7 (cheaper than 13 at equal accuracy)
        m, eta, theta = 7, eta3, _THETA7_F32
    else:
        m, eta, theta = 13, eta5, _THETA13
    s = torch.log2(eta / theta).ceil().clamp(min=0.0)  # eta == 0: -inf -> 0
    k = float(max_squarings)
    return m, s.clamp(max=k), int(max_squarings), False, False, s > k


def _nan_max(x: float, y: float) -> float:
    """``torch.maximum`` on floats (NaN propagates)."""
    return x + y if math.isnan(x) or math.isnan(y) else max(x, y)


def _nan_min(x: float, y: float) -> float:
    """``torch.minimum`` on floats (NaN propagates)."""
    return x + y if math.isnan(x) or math.isnan(y) else min(x, y)


def _choose_on_host(
    a: Tensor,
    a2: Tensor,
    a4: Tensor,
    a6: Tensor,
    single: bool,
    head: list[list[float]] | None = None,
) -> tuple[int, Tensor, int, bool, bool]:
    """:func:`_choose` without ``max_squarings``: one host read of the 1-norms of every
    matrix, then the same arithmetic on Python floats (some thirty fewer tensor operations).
    The norms of A and A² are read here unless ``head`` brings them."""
    if head is None:
        head = _head_norms(a, a2)
    tail = torch.stack([_norm1(a4), _norm1(a6)], dim=-1)
    rows = [h + t for h, t in zip(head, tail.reshape(-1, 2).tolist(), strict=True)]
    theta = _THETA7_F32 if single else _THETA13
    s_list: list[float] = []
    overflow = False
    e3_max = 0.0
    for n1, n2, skew, n4, n6 in rows:
        d4 = n4**0.25
        d6 = n6 ** (1 / 6)
        d8 = _nan_min(d4, (n2 * n6) ** 0.125)
        d10 = (n4 * n6) ** 0.1
        eta3 = _nan_max(d6, d8)
        eta5 = _nan_min(eta3, _nan_max(d8, d10))
        # A power overflowed although A is finite: the caller pre-scales A and calls again.
        overflow = overflow or (not math.isfinite(eta3) and math.isfinite(n1))
        if skew:  # normal: in the 2-norm every d_k is ρ(A) (see _skew)
            eta3 = eta5 = _nan_min(_nan_min(n2**0.5, d4), d6)
        # Non-finite input: no squarings (the result is non-finite anyway).
        eta3 = eta3 if math.isfinite(eta3) else 0.0
        eta5 = eta5 if math.isfinite(eta5) else 0.0
        e3_max = max(e3_max, eta3)
        eta = eta3 if single else eta5
        s_list.append(max(math.ceil(math.log2(eta / theta)), 0) if eta > 0 else 0)
    m = 7 if single else 13
    s = torch.tensor(s_list, dtype=tail.dtype, device=a.device).reshape(tail.shape[:-1])
    if not s_list:
        return m, s, 0, True, False
    if overflow:
        return m, s, 0, True, True
    if not single and e3_max <= _THETA7:
        return 7, torch.zeros_like(s), 0, True, False
    smax, smin = max(s_list), min(s_list)
    return m, s, int(smax), smax == smin, False


def _plus_identity(x: Tensor, c: float) -> Tensor:
    x.diagonal(dim1=-2, dim2=-1).add_(c)  # x is a fresh temporary
    return x


def _add_product(c: Tensor, x: Tensor, y: Tensor, alpha: float = 1.0) -> Tensor:
    """``c + alpha·(x @ y)``, in place on ``c`` (a fresh temporary): for single matrices one
    GEMM that accumulates into ``c`` (an elementwise pass fewer). Not under ``torch.func``
    transforms, which have no batching rule for ``addmm_``."""
    if c.dim() == 2 and x.dim() == 2 and y.dim() == 2 and not is_functorch_wrapped(c):
        return c.addmm_(x, y, alpha=alpha)
    if (
        c.dim() == 3
        and x.shape[:1] == y.shape[:1] == c.shape[:1]
        and x.dim() == 3
        and y.dim() == 3
        and not torch.compiler.is_compiling()  # (inductor fuses the add; Dynamo cannot
        and not is_functorch_wrapped(c)  # trace is_functorch_wrapped)
    ):
        # One batched GEMM that accumulates: for many small blocks (OFT's 128 of 32x32) the
        # number of kernels is the time, on a GPU or a loaded CPU.
        return c.baddbmm_(x, y, alpha=alpha)
    return c.add_(x @ y, alpha=alpha)


def _combine(x: Tensor, y: Tensor, z: Tensor, cx: float, cy: float, cz: float) -> Tensor:
    """``cx·x + cy·y + cz·z`` in three kernels, two when ``cx = 1`` (a fresh tensor,
    differentiable)."""
    if cx == 1.0:
        return torch.add(x, y, alpha=cy).add_(z, alpha=cz)
    return (x * cx).add_(y, alpha=cy).add_(z, alpha=cz)


def _pade(a: Tensor, a2: Tensor, a4: Tensor, a6: Tensor, m: int) -> tuple[Tensor, ...]:
    """U, V and the inner polynomials of r_m = (V - U)^{-1}(V + U) at the (scaled) powers."""
    if m == 7:
        c = _C7
        w = _plus_identity(_combine(a6, a4, a2, c[7], c[5], c[3]), c[1])
        v = _plus_identity(_combine(a6, a4, a2, c[6], c[4], c[2]), c[0])
        w1 = z1 = a[..., :0, :0]  # unused; keeps the batch shape (for the vmap rule)
    else:
        c = _C13
        w1 = _combine(a6, a4, a2, c[13], c[11], c[9])
        z1 = _combine(a6, a4, a2, c[12], c[10], c[8])
        w = _plus_identity(_combine(a6, a4, a2, c[7], c[5], c[3]).add_(a6 @ w1), c[1])
        v = _plus_identity(_combine(a6, a4, a2, c[6], c[4], c[2]).add_(a6 @ z1), c[0])
    u = a @ w
    return u, v, w, w1, z1


def _squarings(x: Tensor, s: Tensor, s_max: int, uniform: bool) -> tuple[Tensor, Tensor]:
    """``X ← X²`` ``s`` times (each matrix its own ``s``, masked up to ``s_max``); returns the
    result and the stacked squares ``X_0 .. X_{s_max-1}`` the backward needs."""
    squares = []
    for j in range(s_max):
        squares.append(x)
        xx = x @ x
        x = xx if uniform else torch.where(_expand(s > j), xx, x)
    if len(squares) == 1:  # (no copy: nothing writes to a saved square)
        return x, squares[0].unsqueeze(0)
    sq = torch.stack(squares) if squares else x.new_empty((0, *x.shape))
    return x, sq


def _head_norms(a: Tensor, a2: Tensor, skew: bool = False) -> list[list[float]]:
    """``[‖A‖₁, ν₂, skew]`` of every matrix, read on the host (one read): ``skew`` is 1.0 if
    ``Aᴴ = -A`` (:func:`_skew`), and ``ν₂ = ‖A²‖₁``, or for a skew matrix
    ``min(‖A²‖₁, ‖A²‖_F)``: both bound ``ρ(A)² = ‖A²‖₂`` (A normal), and the Frobenius norm is
    the sharper one when a few eigenvalues dominate (a trained RNN kernel, n = 190: ``‖A²‖₁^½
    = 0.91``, ``‖A²‖_F^½ = 0.74``, ``ρ = 0.60``), at the cost of a pass instead of the product
    ``A⁴``. ``skew=True``: A is skew by construction (:func:`expm_projected`): the test is not
    run, ``‖A‖₁`` is not read (NaN; :func:`_forward` reads it alone on the way to Padé), and
    ``ν₂ = ‖A²‖_F`` alone (one reduction; :func:`_forward` reads ``‖A²‖₁`` if it is needed)."""
    fro = torch.linalg.matrix_norm(a2)
    if skew:
        return [[math.nan, v, 1.0] for v in fro.reshape(-1).tolist()]
    n2 = _norm1(a2)
    sharp = torch.minimum(n2, fro.to(n2.dtype))
    is_skew = _skew(a)
    n2 = torch.where(is_skew.bool(), sharp, n2)
    return torch.stack([_norm1(a), n2, is_skew], dim=-1).reshape(-1, 3).tolist()


def _taylor_choice(
    rows: list[list[float]], single: bool, n4: list[float] | None = None
) -> list[int] | None:
    """Squarings per matrix for T_8, or None when Padé is cheaper (or a norm is not finite).

    From ``rows`` = :func:`_head_norms` (``‖A‖₁``, ``ν₂``, skew per matrix) and, when
    given, ``n4`` = ``‖A⁴‖₁`` per matrix. The tail of T_8 starts at degree 9 (degree 8 for its
    derivative), so it is bounded through ``α₃ = max(d₃, d₄)`` (Al-Mohy & Higham 2009, Lemma
    4.1, p = 3) with ``d₄ = ‖A⁴‖^{1/4} ≤ ‖A²‖^{1/2}`` and ``d₃ ≤ (‖A‖·‖A²‖)^{1/3}``; for skew A,
    ``α₃ = ρ(A) ≤ d₄`` (:func:`_skew`). ``‖A²‖^{1/2}`` can be 1.5x ``ρ(A)`` where ``d₄`` is
    1.2x (a trained RNN kernel, n = 190): :func:`_forward` computes ``A⁴`` (which Padé needs
    anyway) and asks again before it gives up on T_8.
    """
    if not rows:
        return None
    ell = _ELL8_F32 if single else _ELL8_F64
    cap = _taylor_cap(single)
    s_list = []
    for i, (n1, n2, skew) in enumerate(rows):
        d4 = n2**0.5 if n4 is None else min(n2**0.5, n4[i] ** 0.25)
        alpha = d4 if skew else max(d4, (n1 * n2) ** (1 / 3))
        if not math.isfinite(alpha):
            return None
        s8 = max(math.ceil(math.log2(alpha / ell)), 0) if alpha > 0 else 0
        if s8 > cap:
            return None
        s_list.append(s8)
    return s_list


def _taylor8(a: Tensor, a2: Tensor) -> tuple[Tensor, ...]:
    """T_8(A) at the (scaled) A and A², and the intermediates its derivatives need
    (``R, P₁, Q₁, Q₂``; the derivatives do not need ``A₄``, which becomes ``Q₁`` in place)."""
    p1 = (a * _X1).add_(a2, alpha=_X2)
    a4 = a2 @ p1
    q2 = _plus_identity(_combine(a, a2, a4, _X5, _X6, _X7), _X4)
    q1 = a4.add_(a2, alpha=_X3)  # (autograd-safe: no recorded op saved A₄)
    r = _plus_identity(_add_product(torch.add(a, a2, alpha=_Y2), q1, q2), 1.0)
    return r, p1, q1, q2


def _taylor_saved(a: Tensor, a2: Tensor, s: Tensor, s_max: int, uniform: bool) -> tuple:
    """Forward of the Taylor path at the scaled A; saved in the Padé layout (see _forward)."""
    r, p1, q1, q2 = _taylor8(a, a2)
    x, sq = _squarings(r, s, s_max, uniform)
    empty = a[..., :0, :0]
    piv = torch.zeros((*a.shape[:-2], 0), dtype=torch.int32, device=a.device)
    return x, (a, a2, p1, empty, q1, q2, empty, empty, piv, r, sq, s)


def _forward(a: Tensor, max_squarings: int | None, skew: bool = False) -> tuple:
    """Forward pass; returns X and everything the backward needs (``skew``: A is skew by
    construction, see :func:`_head_norms`).

    Saved layout ``(A, A², A⁴, A⁶, W, W₁, Z₁, LU, piv, R, squares, s)`` for Padé (m = 7, 13);
    the Taylor path (m = 8) stores ``(A, A², P₁, -, Q₁, Q₂, -, -, -, R, squares, s)``.
    """
    a2 = a @ a
    head = None
    if max_squarings is None:
        single = a.dtype in (torch.float32, torch.complex64)
        head = _head_norms(a, a2, skew)
        s_list = _taylor_choice(head, single)
        if s_list is None and skew:  # ‖A²‖_F failed: ‖A²‖₁ may be the sharper (flat spectra)
            n2 = _norm1(a2).reshape(-1).tolist()
            head = [[h[0], min(h[1], v), h[2]] for h, v in zip(head, n2, strict=True)]
            s_list = _taylor_choice(head, single)
        if s_list is None:  # the sharper d₄ = ‖A⁴‖^{1/4}, from the A⁴ Padé would compute
            a4 = a2 @ a2
            s_list = _taylor_choice(head, single, _norm1(a4).reshape(-1).tolist())
        if s_list is not None:
            real = a.real.dtype if a.is_complex() else a.dtype
            s_max, uniform = max(s_list), max(s_list) == min(s_list)
            if uniform:  # a fill, not a host-to-device copy (only the backward reads it)
                s8 = a.new_full(a.shape[:-2], float(s_max), dtype=real)
            else:
                s8 = torch.tensor(s_list, dtype=real, device=a.device).reshape(a.shape[:-2])
            if s_max > 0:  # (A² is a temporary of this function: scaled in place)
                a = _scale(a, s8, s_max, uniform)
                a2 = a2.mul_(4.0**-s_max) if uniform else _scale(a2, s8, s_max, uniform, 2)
            x, saved = _taylor_saved(a, a2, s8, s_max, uniform)
            return x, saved, (_TAYLOR, s_max, uniform)
        if skew:  # ‖A‖₁ was not read (the overflow test of _choose_on_host needs it)
            n1 = _norm1(a).reshape(-1).tolist()
            head = [[v, h[1], h[2]] for v, h in zip(n1, head, strict=True)]
    else:
        a4 = a2 @ a2
    a6 = a4 @ a2
    m, s, s_max, uniform, overflow, beyond = _choose(a, a2, a4, a6, max_squarings, head)
    f = None
    if overflow:  # huge ‖A‖ (a power overflowed): pre-scale by the 1-norm, choose again
        s0 = torch.nan_to_num(torch.log2(_norm1(a) / 4.0).ceil().clamp(min=0.0), posinf=0.0)
        a = a * _expand(torch.exp2(-s0)).to(a.dtype)
        a2 = a @ a
        a4 = a2 @ a2
        a6 = a4 @ a2
        m, s1, *_ = _choose(a, a2, a4, a6, max_squarings)
        s = s0 + s1
        smax, smin = torch.stack([s.amax(), s.amin()]).tolist()  # a second read, rare path
        s_max, uniform = int(smax), smax == smin
        f = s1
    elif s_max > 0:
        f = s
    if f is not None:
        f = _expand(torch.exp2(-f)).to(a.dtype)
        f2 = f * f
        a, a2, a4, a6 = a * f, a2 * f2, a4 * (f2 * f2), a6 * (f2 * f2 * f2)
    u, v, w, w1, z1 = _pade(a, a2, a4, a6, m)
    # The _ex variants: no error check, so no device sync (V - U is nonsingular in range).
    lu, piv, _ = torch.linalg.lu_factor_ex(v - u)
    x = torch.linalg.lu_solve(lu, piv, v + u)
    r = x
    x, sq = _squarings(x, s, s_max, uniform)
    if beyond is not None:  # max_squarings too small for these matrices: NaN, not a wrong value
        x = x.masked_fill(_expand(beyond), math.nan)
    return x, (a, a2, a4, a6, w, w1, z1, lu, piv, r, sq, s), (m, s_max, uniform)
