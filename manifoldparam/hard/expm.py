r"""Matrix exponential with a cheap, exact-adjoint backward (scaling and squaring, Padé/Taylor).

Small norms first. If every matrix has :math:`\alpha = \max(\|A^2\|_1^{1/2},
(\|A\|_1\|A^2\|_1)^{1/3}) \le 4\ell_8` (a bound on :math:`\max(d_3, d_4)` from the one product
:math:`A^2`; :math:`\alpha = \min(\|A^2\|_1, \|A^2\|_F)^{1/2} \ge \rho(A)` for skew :math:`A`,
see below; :math:`\ell_8 = 0.445` in float32, :math:`0.038` in float64), the result is the
degree-8 Taylor polynomial
:math:`T_8(2^{-s}A)^{2^s}`, :math:`s \le 2` (:math:`s \le 1` in float32), evaluated in three
products (Bader, Blanes & Casas 2019; the scheme ``torch.linalg.matrix_exp`` also uses): no LU,
no solve, a backward of six products. When that bound fails, :math:`A^4` (which Padé needs
anyway) gives :math:`d_4 = \|A^4\|_1^{1/4}` for a second try. This is the regime
of a trained orthogonal weight near its base point (e.g. ρ(A) ≲ 0.75 at n = 190). Otherwise:

What is computed. :func:`expm` returns :math:`X = r_m(2^{-s}A)^{2^s} \approx \exp(A)` for a
(batched) square matrix :math:`A` of shape ``(*batch, n, n)``, where :math:`r_m = q_m^{-1}p_m`
is the diagonal :math:`[m/m]` Padé approximant (:math:`m \in \{7, 13\}`) and :math:`s \ge 0`
the number of squarings (Higham 2005; Al-Mohy & Higham 2009, "A new scaling and squaring
algorithm for the matrix exponential"). :math:`m` and :math:`s` are chosen from
:math:`d_k = \|A^k\|_1^{1/k}` (:math:`k = 4, 6` exactly and bounds for :math:`k = 8, 10`
from :math:`\|A^2\|_1, \|A^4\|_1, \|A^6\|_1`), not from :math:`\|A\|_1`: the bound is the same
backward-error bound, but :math:`d_k \to \rho(A)` for normal (e.g. skew-symmetric) matrices,
whose :math:`\|A\|_1` can be :math:`\sqrt n` times larger than :math:`\rho(A)`, so the skew
matrices of the orthogonal map get several fewer squarings than with :math:`\|A\|_1`.
The thresholds are the smaller of the forward thresholds :math:`\theta_m` (Al-Mohy & Higham
2009) and the Fréchet-derivative thresholds :math:`\ell_m` (Al-Mohy & Higham, "Computing the
Fréchet derivative of the matrix exponential", SIAM J. Matrix Anal. Appl. 30(4), 2009,
Table 6.1), so that the gradient is as accurate as the value. float64/complex128:
:math:`m = 7` if :math:`\eta_3 = \max(d_6, d_8) \le 0.783`, else :math:`m = 13` with
:math:`s = \lceil \log_2(\eta_5/4.25) \rceil_+`, :math:`\eta_5 = \min(\eta_3, \max(d_8,d_{10}))`.
float32/complex64: always :math:`m = 7` with :math:`s = \lceil \log_2(\eta_3/3.2) \rceil_+`
(:math:`\ell_7 = 3.249` for :math:`u = 2^{-24}`, computed from the series of
:math:`\log(e^{-x} r_7(x))` as in the paper, whose double-precision table the same computation
reproduces). Every matrix of a batch gets its own :math:`s` (the squarings of the others are
masked). If a power overflows (:math:`\|A\| \gtrsim 10^6` in float32), :math:`A` is first
scaled by its 1-norm and the powers recomputed.

Backward. The adjoint of the Fréchet derivative :math:`L_{\exp}(A, \cdot)` with respect to the
trace inner product is :math:`L_{\exp}(A^H, \cdot)`, so the gradient is
:math:`\bar A = L_{\exp}(A^H, \bar X)` (:math:`= L_{\exp}(-A, \bar X)` for skew :math:`A`).
It is computed as the exact reverse-mode derivative of the forward scheme above, which is the
scaling-Padé-squaring algorithm of Al-Mohy & Higham for :math:`L_{r}` (the Fréchet derivative
of the *approximant*, which approximates :math:`L_{\exp}` to the same backward error) applied at
:math:`A^H`: the transposes of the forward intermediates are the intermediates at :math:`A^H`
(for skew :math:`A`, :math:`\pm` themselves; :math:`\exp(-A) = \exp(A)^\top`), the same
:math:`m` and :math:`s` are used, the LU factors of :math:`q_m` are reused for one adjoint
solve, and the squarings are reversed with the saved squares
(:math:`\bar X_j = X_j^H \bar X_{j+1} + \bar X_{j+1} X_j^H`).

Cost (``n×n``, counted in ``n×n`` matrix products "M"): Taylor :math:`(3 + s)M` forward,
:math:`(6 + 2s)M` backward. Padé: forward :math:`6M` (:math:`m=13`) or
:math:`4M` (:math:`m=7`) + one LU + one LU solve + :math:`sM`; backward :math:`13M` (or
:math:`9M`) + one LU solve + :math:`2sM`, i.e. about twice the forward (measured: fwd+bwd
≈ 0.2x of ``torch.linalg.matrix_exp``'s at n = 256 and 1024, float32, 2 CPU threads), with no
:math:`2n\times 2n` block matrix (``torch.linalg.matrix_exp``'s backward exponentiates
``[[Aᴴ, G], [0, Aᴴ]]``: ≈ 8 times the flops of its forward per product, plus the squarings
that the larger norm of the block matrix needs). Memory: the forward keeps
:math:`8 + s` (:math:`m = 7`) or :math:`10 + s` (:math:`m = 13`) ``n×n`` matrices per input
matrix for the backward (peak of a fwd+bwd: less than half of ``matrix_exp``'s).

Skew matrices (the orthogonal map's) are detected, not flagged: a matrix with
:math:`A^H = -A` exactly is normal, so in the 2-norm every :math:`d_k` equals
:math:`\rho(A) \le \min_k \|A^{2k}\|_1^{1/2k}` (its even powers are Hermitian; also
:math:`\rho(A)^2 = \|A^2\|_2 \le \|A^2\|_F`), and the
scaling uses that bound instead of the 1-norm bound :math:`(\|A\|_1\|A^2\|_1)^{1/3}` on
:math:`d_3`, which for skew matrices can be :math:`\sqrt n` times too large. A trained
orthogonal RNN kernel (n = 190, float32) takes :math:`T_8` with one squaring instead of two
(about 12% of a forward+backward), and by :math:`\|A^2\|_F^{1/2}` (0.74 where
:math:`\|A^2\|_1^{1/2} = 0.91`, ρ = 0.60) without the product :math:`A^4`. The products and the
backward are the same (torch exposes no symmetric-product kernel).

Higher derivatives. When the backward runs with ``create_graph=True`` (or under
``torch.func.grad``, which always builds a graph), it recomputes the forward intermediates
from :math:`A` with tracked ops and evaluates the same adjoint with differentiable ops, so
double backward (Hessian-vector products) is exact for the approximant; without
``create_graph`` it uses the saved intermediates.

Host syncs. Choosing the method and :math:`s` needs the norms on the host: one read of
:math:`\|A\|_1, \|A^2\|_1, \|A^2\|_F` (the Taylor test; for :func:`expm_projected`, of
:math:`\|A^2\|_F` alone, then :math:`\|A^2\|_1` in a second read only if that fails); when
that fails, a read of :math:`\|A^4\|_1` (the Taylor test again with :math:`d_4 =
\|A^4\|^{1/4}`, which can be sharper again); when that fails too, a read of the norms of
:math:`A^2, A^4, A^6` (the choice is then scalar arithmetic on the host; nothing else syncs,
the backward and jvp none; one more read only on the overflow path; :func:`expm_projected`
reads :math:`\|A\|_1` apart, only on its way to Padé). :math:`A^4` is computed once, for
both. This
is the same kind of sync as ``torch.linalg.matrix_exp``'s own norm-dependent branching; the
alternative, a fixed maximum number of masked squarings, would cost one product per unused
squaring on every call (and two in the backward). ``max_squarings=k`` selects that sync-free
mode (:math:`m = 13` in float64, :math:`7` in float32, exactly :math:`k` masked squarings,
:math:`s` clamped to :math:`k`: a matrix whose norm needs more, above about
:math:`4\cdot 2^k`, comes out as NaN; no overflow fallback) for CUDA graphs or
``torch.compile(fullgraph=True)``; with ``max_squarings=None`` it is taken automatically
(:data:`SYNC_FREE_SQUARINGS`) while a CUDA graph is being captured, for fake tensors and
off the CPU and CUDA (meta, XLA, MPS).

Forward mode. ``jvp`` is Al-Mohy & Higham's forward scheme for :math:`L_r(A, E)` (the
directional derivative of the same approximant) with the saved intermediates, so
``torch.func.jvp`` / ``jacfwd`` and ``hessian`` (= ``jacfwd(jacrev)``) work; forward-over-forward
(``jacfwd(jacfwd(...))``) does not (PyTorch does not differentiate a custom ``jvp``): it
returns a wrong second derivative, use ``jacrev`` for the inner or outer level. Under
``torch.compile`` a variant without ``jvp`` is used (Dynamo cannot trace a custom ``jvp``).

Transforms. Works with ``torch.func.grad`` / ``vjp`` / ``jvp`` / ``vmap`` (a ``vmap`` rule that
moves the vmapped dim into the batch) and ``torch.compile`` (the norm read is a graph break
unless ``max_squarings`` is given). float16/bfloat16 inputs are computed in float32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from manifoldparam._device import autocast_off, may_read_on_host

__all__ = ["SYNC_FREE_SQUARINGS", "expm", "expm_projected", "expm_skew"]

#: Masked squarings of the sync-free mode taken while a CUDA graph is being captured (with
#: ``max_squarings=None``): enough while the spectral radius of A is below about
#: 4·2^10 = 4096, far beyond what training an orthogonal weight reaches (NaN above).
SYNC_FREE_SQUARINGS = 10

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


_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _add_product(c: Tensor, x: Tensor, y: Tensor, alpha: float = 1.0) -> Tensor:
    """``c + alpha·(x @ y)``, in place on ``c`` (a fresh temporary): for single matrices one
    GEMM that accumulates into ``c`` (an elementwise pass fewer). Not under ``torch.func``
    transforms, which have no batching rule for ``addmm_``."""
    if c.dim() == 2 and x.dim() == 2 and y.dim() == 2 and not _is_wrapped(c):
        return c.addmm_(x, y, alpha=alpha)
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
    cap = _TAYLOR_MAX_SQUARINGS_F32 if single else _TAYLOR_MAX_SQUARINGS
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


def _tail(ga: Tensor, ga2: Tensor, a: Tensor, projected: bool) -> Tensor:
    """The last step of the adjoint, ``A² = A·A``: ``Ā = ga + ga2·Aᴴ + Aᴴ·ga2`` (``ga``, a
    fresh temporary, is updated in place on the projected path).

    ``projected`` (``A`` skew by construction, e.g. ``L - Lᴴ`` made by :func:`expm_skew`,
    whose only use of ``Ā`` is ``P(Ā) = Ā - Āᴴ``, the gradient w.r.t. ``L``): with
    ``Aᴴ = -A`` and ``S = ga2 + ga2ᴴ``, ``P(ga2·Aᴴ + Aᴴ·ga2) = -(S·A + A·S) = -(X - Xᴴ)``
    for ``X = S·A`` (``(SA)ᴴ = -AS``), so ``Y = ga - S·A`` has ``P(Y) = P(Ā)``: one product
    instead of two. ``Y`` is returned as the gradient w.r.t. ``A``; it is not ``Ā`` (only its
    skew part is), which is exact for ``L`` because the subtraction ``L - Lᴴ`` applies ``P``
    in its backward.
    """
    if projected:
        return _add_product(ga, ga2 + ga2.mH, a, alpha=-1.0)
    ah = a.mH
    return ga + ga2 @ ah + ah @ ga2


def _adjoint(
    g: Tensor,
    saved: tuple,
    m: int,
    s_max: int,
    uniform: bool,
    solve_lu: bool,
    projected: bool = False,
) -> Tensor:
    """Reverse-mode derivative of :func:`_forward`: the gradient w.r.t. the input A, or with
    ``projected`` one whose skew part is that gradient (see :func:`_tail`)."""
    a, a2, a4, a6, w, w1, z1, lu, piv, r, sq, s = saved
    # Squarings, reversed: X_{j+1} = X_j X_j.
    for j in range(s_max - 1, -1, -1):
        xj = sq[j].mH
        gj = _add_product(xj @ g, g, xj)
        g = gj if uniform else torch.where(_expand(s > j), gj, g)
    if m == _TAYLOR:  # (a4, w, w1 hold P₁, Q₁, Q₂)
        return _unscale(_adjoint_taylor(g, a, a2, a4, w, w1, projected), s, s_max, uniform)
    # R = Q^{-1} P with Q = V - U, P = V + U.
    if solve_lu:
        gp = torch.linalg.lu_solve(lu, piv, g, adjoint=True)
    else:  # differentiable path: lu holds Q itself
        gp = torch.linalg.solve_ex(lu.mH, g)[0]
    gq = -(gp @ r.mH)
    gu, gv = gp - gq, gp + gq
    # U = A W.
    ga = gu @ w.mH
    gw = a.mH @ gu
    if m == 7:
        c = _C7
        ga6 = c[7] * gw + c[6] * gv
        ga4 = c[5] * gw + c[4] * gv
        ga2 = c[3] * gw + c[2] * gv
    else:
        c = _C13
        # W = A6 W1 + W2, V = A6 Z1 + Z2.
        a6h = a6.mH
        ga6 = gw @ w1.mH + gv @ z1.mH
        gw1 = a6h @ gw
        gz1 = a6h @ gv
        ga6 = ga6 + c[13] * gw1 + c[12] * gz1 + c[7] * gw + c[6] * gv
        ga4 = c[11] * gw1 + c[10] * gz1 + c[5] * gw + c[4] * gv
        ga2 = c[9] * gw1 + c[8] * gz1 + c[3] * gw + c[2] * gv
    # A6 = A4 A2, A4 = A2 A2, A2 = A A.
    a2h = a2.mH
    ga4 = ga4 + ga6 @ a2h
    ga2 = ga2 + a4.mH @ ga6 + ga4 @ a2h + a2h @ ga4
    return _unscale(_tail(ga, ga2, a, projected), s, s_max, uniform)


def _unscale(ga: Tensor, s: Tensor, s_max: int, uniform: bool) -> Tensor:
    """The last step of the adjoint, the scaling ``A_s = 2^{-s} A``: ``ga`` (a fresh temporary)
    times ``2^{-s}``, in place when every matrix has the same ``s``."""
    if s_max == 0:
        return ga
    return ga.mul_(2.0**-s_max) if uniform else _scale(ga, s, s_max, uniform)


def _adjoint_taylor(
    g: Tensor,
    a: Tensor,
    a2: Tensor,
    p1: Tensor,
    q1: Tensor,
    q2: Tensor,
    projected: bool = False,
) -> Tensor:
    """Reverse-mode derivative of :func:`_taylor8` (six products; five with ``projected``)."""
    g_q1 = g @ q2.mH
    g_q2 = q1.mH @ g
    c = _combine(g, g_q2, g_q1, _Y2, _X6, _X3)
    g_a4 = g_q1.add_(g_q2, alpha=_X7)  # (g_q1 is not needed any more)
    ga2 = _add_product(c, g_a4, p1.mH)
    g_p1 = a2.mH @ g_a4
    ga2 = ga2.add_(g_p1, alpha=_X2)
    return _tail(_combine(g, g_q2, g_p1, 1.0, _X5, _X1), ga2, a, projected)


def _recompute(a: Tensor, m: int, s: Tensor, s_max: int, uniform: bool) -> tuple:
    """The forward intermediates with tracked ops (for double backward), same m and s."""
    if s_max > 0:
        a = _scale(a, s, s_max, uniform)
    a2 = a @ a
    if m == _TAYLOR:
        return _taylor_saved(a, a2, s, s_max, uniform)[1]
    a4 = a2 @ a2
    a6 = a4 @ a2
    u, v, w, w1, z1 = _pade(a, a2, a4, a6, m)
    q = v - u
    x = torch.linalg.solve_ex(q, v + u)[0]
    r = x
    x, sq = _squarings(x, s, s_max, uniform)
    return (a, a2, a4, a6, w, w1, z1, q, None, r, sq, s)


def _tangent(e: Tensor, saved: tuple, m: int, s_max: int, uniform: bool) -> Tensor:
    """Forward-mode derivative of :func:`_forward`: L_r(A, E), Al-Mohy & Higham's scheme."""
    a, a2, a4, a6, w, w1, z1, lu, piv, r, sq, s = saved
    if s_max > 0:
        e = _scale(e, s, s_max, uniform)
    if m == _TAYLOR:  # (a2, a4, a6, w, w1) hold (A², P₁, -, Q₁, Q₂)
        p1, q1, q2 = a4, w, w1
        d2 = a @ e + e @ a
        dp1 = (e * _X1).add_(d2, alpha=_X2)
        d4 = d2 @ p1 + a2 @ dp1
        dq1 = (d2 * _X3).add_(d4)
        dq2 = _combine(e, d2, d4, _X5, _X6, _X7)
        lx = (dq1 @ q2).add_(q1 @ dq2).add_(d2, alpha=_Y2).add_(e)
        return _tangent_squarings(lx, sq, s, s_max, uniform)
    m2 = a @ e + e @ a
    m4 = a2 @ m2 + m2 @ a2
    m6 = a4 @ m2 + m4 @ a2
    if m == 7:
        c = _C7
        lw = c[7] * m6 + c[5] * m4 + c[3] * m2
        lv = c[6] * m6 + c[4] * m4 + c[2] * m2
    else:
        c = _C13
        lw1 = c[13] * m6 + c[11] * m4 + c[9] * m2
        lz1 = c[12] * m6 + c[10] * m4 + c[8] * m2
        lw = a6 @ lw1 + m6 @ w1 + (c[7] * m6 + c[5] * m4 + c[3] * m2)
        lv = a6 @ lz1 + m6 @ z1 + (c[6] * m6 + c[4] * m4 + c[2] * m2)
    lu_ = a @ lw + e @ w
    # R = Q^{-1} P: dR = Q^{-1}(dP - dQ R) = Q^{-1}(Lu + Lv + (Lu - Lv) R).
    rhs = lu_ + lv + (lu_ - lv) @ r
    lx = torch.linalg.solve_ex(lu, rhs)[0] if piv is None else torch.linalg.lu_solve(lu, piv, rhs)
    return _tangent_squarings(lx, sq, s, s_max, uniform)


def _tangent_squarings(lx: Tensor, sq: Tensor, s: Tensor, s_max: int, uniform: bool) -> Tensor:
    """Forward-mode derivative of :func:`_squarings`."""
    for j in range(s_max):
        xj = sq[j]
        lj = _add_product(xj @ lx, lx, xj)
        lx = lj if uniform else torch.where(_expand(s > j), lj, lx)
    return lx


class _ExpmNoJvp(torch.autograd.Function):
    """The Function without forward mode (Dynamo cannot trace a custom ``jvp``).

    ``projected``: ``a`` is skew by construction and the caller uses only the skew part of its
    gradient (:func:`expm_projected`); the backward returns a gradient whose skew part is exact
    (see :func:`_tail`).
    """

    @staticmethod
    def forward(a: Tensor, max_squarings: int | None, projected: bool):  # type: ignore[override]
        x, saved, meta = _forward(a, max_squarings, skew=projected)
        # Unscaled, the input itself (saved as the input; an input cannot be returned), and
        # without squarings R is the output itself: placeholders are returned instead.
        saved = list(saved)
        if saved[0] is a:
            saved[0] = a.new_empty((*a.shape[:-2], 0, 0))
        if meta[1] == 0:
            saved[9] = x[..., :0, :0]
        return (x, *saved, meta)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        a, _, projected = inputs
        x, *saved, meta = output
        ctx.meta = meta
        ctx.projected = projected
        # The saved outputs get no gradient: without this, autograd would fill each with zeros.
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*saved)
        if meta[1] == 0:
            saved[9] = x
        # (a: the input, for the differentiable backward; saved[0]: the scaled input)
        ctx.save_for_backward(a, *saved)
        ctx.save_for_forward(a, *saved)

    @staticmethod
    def backward(ctx, g: Tensor, *_unused):  # type: ignore[override]
        if g is None:
            return None, None, None
        with autocast_off(g):  # (a backward called inside an autocast block)
            return _ExpmNoJvp._backward(ctx, g)

    @staticmethod
    def _backward(ctx, g: Tensor):  # type: ignore[no-untyped-def]
        a, *saved = ctx.saved_tensors
        m, s_max, uniform = ctx.meta
        projected = ctx.projected
        s = saved[-1]
        if torch.is_grad_enabled() and (a.requires_grad or g.requires_grad):
            rec = _recompute(a, m, s, s_max, uniform)
            ga = _adjoint(g, rec, m, s_max, uniform, solve_lu=False, projected=projected)
            return ga, None, None
        saved[0] = _scaled_input(a, saved[0])
        return (
            _adjoint(g, saved, m, s_max, uniform, solve_lu=True, projected=projected),
            None,
            None,
        )

    @staticmethod
    def vmap(info, in_dims, a: Tensor, max_squarings: int | None, projected: bool):  # type: ignore[override]
        d = in_dims[0]
        if d is None:
            out = _apply(a, max_squarings, projected)
            return out, tuple(None for _ in out)
        a = a.movedim(d, 0)
        out = _apply(a, max_squarings, projected)
        # The stacked squares have the squaring index first, the batch second.
        dims = [0] * (len(out) - 1) + [None]
        dims[-3] = 1  # (x, a, a2, a4, a6, w, w1, z1, lu, piv, r, sq, s, meta)
        return out, tuple(dims)


class _Expm(_ExpmNoJvp):
    """With forward mode; used outside ``torch.compile``."""

    @staticmethod
    def jvp(ctx, e: Tensor, _max_squarings_t, _projected_t):  # type: ignore[override]
        a, *saved = ctx.saved_tensors
        m, s_max, uniform = ctx.meta
        saved[0] = _scaled_input(a, saved[0])
        with autocast_off(e):
            lx = _tangent(e, saved, m, s_max, uniform)
        return (lx, *([None] * len(saved)), None)


def _scaled_input(a: Tensor, saved: Tensor) -> Tensor:
    """The scaled input ``2^{-s}A`` the forward saved, or ``A`` itself (not scaled: the forward
    returned an empty placeholder instead)."""
    return saved if saved.shape[-1] else a


#: What ``Function.apply`` calls once it has bound default arguments through
#: ``inspect.signature`` (tens of µs per call, for a Function whose arguments are always all
#: passed) and unwrapped dead functorch wrappers.
_base_apply = super(torch.autograd.Function, _Expm).apply
_functorch_active = torch._C._are_functorch_transforms_active


def _apply(a: Tensor, max_squarings: int | None, projected: bool = False) -> tuple:
    if torch.compiler.is_compiling():
        return _ExpmNoJvp.apply(a, max_squarings, projected)
    if _functorch_active() or _is_wrapped(a):
        return _Expm.apply(a, max_squarings, projected)
    return _base_apply(a, max_squarings, projected)


def _check(a: Tensor, max_squarings: int | None) -> None:
    if a.dim() < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"expm needs square matrices (*, n, n), got shape {tuple(a.shape)}")
    if max_squarings is not None and max_squarings < 0:
        raise ValueError("max_squarings must be >= 0")
    if not (a.dtype.is_floating_point or a.dtype.is_complex):
        raise TypeError(f"expm needs a floating or complex tensor, got {a.dtype}")


def expm(a: Tensor, *, max_squarings: int | None = None) -> Tensor:
    r"""Matrix exponential of ``a`` (shape ``(*batch, n, n)``) with a fast exact-adjoint backward.

    Same result as ``torch.linalg.matrix_exp`` (to rounding; see the module docstring for the
    scheme), but its backward is the Al-Mohy--Higham Fréchet scheme at ``aᴴ`` reusing the
    forward's intermediates (≈ 2 forwards instead of ≈ 10), differentiable again under
    ``create_graph=True``, and usable under ``torch.func`` transforms and ``torch.compile``.

    Args:
        a: real or complex square matrices (float16/bfloat16 are computed in float32).
        max_squarings: ``None`` (default): choose the number of squarings from the norms
            (one host read per call; while a CUDA graph is being captured, where no host read
            is possible, :data:`SYNC_FREE_SQUARINGS` instead). An int ``k``: no host read;
            always ``k`` (masked) squarings; a matrix that needs more (``‖a‖ ≳ 4·2^k``) comes
            out as NaN (an error would need a host read).
    """
    return _expm(a, max_squarings, projected=False)[0]


def expm_skew(lower: Tensor, *, max_squarings: int | None = None) -> Tensor:
    r"""``exp(L - Lᴴ)``, the exponential of the skew(-Hermitian) matrix ``A = L - Lᴴ``, with
    the exact gradient w.r.t. ``L`` (``L`` is any square matrix, e.g. a strict lower triangle).

    The same value and derivatives as ``expm(L - L.mH)``, one product cheaper in the backward:
    the gradient w.r.t. ``L`` is :math:`P(\bar A) = \bar A - \bar A^H`, and the last step of
    the adjoint needs only the Hermitian part of its ``A²`` term there (see ``_tail``); the
    skew test of the norm read is skipped.
    """
    _check(lower, max_squarings)
    if lower.dtype in (torch.float16, torch.bfloat16):  # L - Lᴴ in float32, as in expm
        return expm_skew(lower.float(), max_squarings=max_squarings).to(lower.dtype)
    return expm_projected(lower - lower.mH, max_squarings=max_squarings)


def expm_projected(a: Tensor, *, max_squarings: int | None = None) -> Tensor:
    r"""``exp(A)`` for ``A`` skew(-Hermitian) *by construction*, whose gradient the caller uses
    only through its skew part :math:`P(\bar A) = \bar A - \bar A^H`: the backward returns a
    tensor ``Y`` with ``P(Y) = P(Ā)`` (one product fewer), not ``Ā`` itself.

    For a construction of ``A`` from free coordinates whose own backward applies ``P``, such
    as ``A = L - Lᴴ`` (:func:`expm_skew`, ``Orthogonal.skew``). Not a general ``expm``: its
    gradient w.r.t. ``A`` itself is not ``Ā``, and for an ``A`` that is not skew even the value
    is wrong (the Taylor path's scaling uses the bounds ``ρ(A) ≤ ‖A²‖_F^½, ‖A²‖₁^½``, true
    only for normal ``A``; the skew test is skipped).
    """
    return _expm(a, max_squarings, projected=True)[0]


def _expm(a: Tensor, max_squarings: int | None, projected: bool) -> tuple[Tensor, bool]:
    """``(exp(a), taylor)``: ``taylor`` is True when the result is the Taylor path's
    :math:`T_8(2^{-s}A)^{2^s}` in float32/float64 (at most one squaring in float32, two in
    float64), whose round-off is a few ulps: for a skew ``a``, ``max|XᵀX - I|`` is then already
    at the level of a float32 Gram product, so the orthogonal map skips its Newton--Schulz
    correction (it pays after Padé and more squarings, where round-off grows with ``2^s``)."""
    _check(a, max_squarings)
    # The norms are read on the host (CPU; CUDA outside graph capture); elsewhere (capture,
    # fake and meta tensors, XLA, MPS) a fixed number of masked squarings, no sync.
    if max_squarings is None and not may_read_on_host(a):
        max_squarings = SYNC_FREE_SQUARINGS
    if a.dtype in (torch.float16, torch.bfloat16):
        return _expm(a.float(), max_squarings, projected)[0].to(a.dtype), False
    if a.shape[-1] == 0:
        return a.clone(), True
    with autocast_off(a):  # the scheme's products in a's dtype (its thresholds assume it)
        out = _apply(a, max_squarings, projected)
    return out[0], out[-1][0] == _TAYLOR
