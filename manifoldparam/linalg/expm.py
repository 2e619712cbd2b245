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

import torch
from torch import Tensor

from manifoldparam._device import autocast_off, may_read_on_host
from manifoldparam._torch import functorch_active, is_functorch_wrapped
from manifoldparam.linalg._frechet import _adjoint, _recompute, _tangent
from manifoldparam.linalg._scheme import _TAYLOR, _forward

__all__ = ["SYNC_FREE_SQUARINGS", "expm", "expm_projected", "expm_skew"]

#: Masked squarings of the sync-free mode taken while a CUDA graph is being captured (with
#: ``max_squarings=None``): enough while the spectral radius of A is below about
#: 4·2^10 = 4096, far beyond what training an orthogonal weight reaches (NaN above).
SYNC_FREE_SQUARINGS = 10


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


def _apply(a: Tensor, max_squarings: int | None, projected: bool = False) -> tuple:
    if torch.compiler.is_compiling():
        return _ExpmNoJvp.apply(a, max_squarings, projected)
    if functorch_active() or is_functorch_wrapped(a):
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

    Returns:
        :math:`\exp(a)`, same shape and dtype as ``a``.

    Raises:
        ValueError: ``a`` is not a batch of square matrices, or ``max_squarings < 0``.
        TypeError: ``a`` is not floating or complex.

    Example:
        >>> a = torch.randn(3, 5, 5, dtype=torch.float64, requires_grad=True)
        >>> x = mp.linalg.expm(a)
        >>> bool(torch.allclose(x, torch.linalg.matrix_exp(a)))
        True
        >>> torch.autograd.gradcheck(mp.linalg.expm, (a,))
        True
    """
    return _expm(a, max_squarings, projected=False)[0]


def expm_skew(lower: Tensor, *, max_squarings: int | None = None) -> Tensor:
    r"""``exp(L - Lᴴ)``, the exponential of the skew(-Hermitian) matrix ``A = L - Lᴴ``, with
    the exact gradient w.r.t. ``L`` (``L`` is any square matrix, e.g. a strict lower triangle).

    The same value and derivatives as ``expm(L - L.mH)``, one product cheaper in the backward:
    the gradient w.r.t. ``L`` is :math:`P(\bar A) = \bar A - \bar A^H`, and the last step of
    the adjoint needs only the Hermitian part of its ``A²`` term there (see ``_tail``); the
    skew test of the norm read is skipped.

    Args:
        lower: square matrices ``(*batch, n, n)``, real or complex (only ``L - Lᴴ`` matters).
        max_squarings: as for :func:`expm`.

    Returns:
        The orthogonal (unitary) matrices :math:`\exp(L - L^H)`, same shape and dtype.

    Example:
        >>> lower = torch.randn(4, 4, dtype=torch.float64).tril(-1)   # n(n-1)/2 coordinates
        >>> q = mp.linalg.expm_skew(lower)
        >>> bool(torch.allclose(q.T @ q, torch.eye(4, dtype=torch.float64)))
        True
        >>> bool(torch.linalg.det(q) > 0)                               # SO(n)
        True
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
