r"""Orthogonal and Stiefel weights through the matrix exponential (or the Cayley map).

Math. Write the weight as a tall matrix :math:`W \in \mathbb{R}^{n\times k}`, :math:`k \le n`
(a wide weight is handled as its transpose; a weight with more than two dims is the matrix
``(out, in*kh*kw)``, or a batch of matrices over its last two dims with ``batched=True``).
The set is the Stiefel manifold :math:`\{W : W^\top W = I_k\}` (for :math:`k=n` the orthogonal
group, of which training keeps the connected component: the sign of :math:`\det W`).
The map is

.. math::
    W = \operatorname{NS}\big(B \, \phi(A)\, E_k\big),\qquad
    A = \begin{pmatrix} S & -C^\top \\ C & 0 \end{pmatrix},

with :math:`B \in O(n)` a fixed base point (a buffer), :math:`E_k` the first :math:`k`
columns of :math:`I_n`, :math:`\phi = \exp` (default) or the Cayley map
:math:`(I - A/2)^{-1}(I + A/2)`, and :math:`A` skew-symmetric with the lower-right
:math:`(n-k)\times(n-k)` block zero. Its free entries (:math:`S` skew :math:`k\times k`,
:math:`C \in \mathbb{R}^{(n-k)\times k}`) are the coordinates: exactly
:math:`nk - k(k+1)/2 = \dim \mathrm{St}(n,k)` numbers, so no direction is dead.
:math:`\operatorname{NS}(W) = W(3I - W^\top W)/2` is one Newton--Schulz step: the identity
on the manifold to first order (its differential fixes every tangent vector, so gradients are
unchanged, and the backward skips it: see :func:`_newton_schulz_correction`), it squares the
float round-off of the exponential away
(float32 :math:`\max|W^\top W - I|` stays at a few ulps even for huge :math:`\|A\|`).
By default it runs only where that round-off exceeds what the step itself leaves (the
rounding of the float32 Gram product :math:`W^\top W`): after the Cayley map, Padé, or more
than one squaring. Near the base point (:math:`\rho(A) \lesssim 0.9`: the degree-8 Taylor
path, at most one squaring in float32) the exponential is already that accurate and the step
(two products, ≈ 10% of a forward+backward at n = 190) is skipped: measured in float32 over
skew :math:`A`, n = 64..1024, :math:`\max|W^\top W - I| \le 1.9\cdot10^{-6}` without it
and :math:`0.8\cdot10^{-6}` with it (the gap grows slowly with n: 1.6e-6 against 0.3e-6 at
n = 2048) (:math:`\|W^\top W - I\|_F` 4.8e-6 / 2.7e-6 at n = 256;
``torch.linalg.matrix_exp``: 4.8e-6 max, 1.9e-5 Frobenius).

For :math:`n \ge 3k, n \ge 256` the same map runs in :math:`O(nk^2 + k^3)`, :math:`B` kept as
:math:`n\times k` columns and the Householder factors of their complement (``tall=``).

Assignment ``module.weight = Q`` (``Q`` orthogonal within tolerance) sets :math:`B` to ``Q``
completed to an orthogonal matrix (and made orthogonal to working precision: two
Newton--Schulz steps in float64, :math:`O(\delta^4)` from :math:`\max|Q^\top Q - I| = \delta`)
and the coordinates to zero, so the weight equals ``Q`` up to that correction.
:func:`rebase` does the same with the current weight (dynamic trivialization).

Example::

    >>> layer = manifoldparam.orthogonal(nn.Linear(64, 32))
    >>> w = layer.weight                       # 32x64, orthonormal rows
    >>> torch.allclose(w @ w.T, torch.eye(32), atol=1e-5)
    True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import MutableMapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from manifoldparam._device import may_read_on_host
from manifoldparam._torch import is_functorch_wrapped, is_tracing
from manifoldparam.hard import _stiefel_tall as tall_path
from manifoldparam.hard.base import (
    LOW_PRECISION,
    NonFiniteError,
    Parametrization,
    compute_dtype,
    max_abs,
)
from manifoldparam.hard.registration import register
from manifoldparam.linalg._traced import traced_exp, traced_ok
from manifoldparam.linalg.expm import _expm
from manifoldparam.linalg.op import expm_op
from manifoldparam.linalg.stiefel import _cayley, _newton_schulz_correction, polar

__all__ = ["Orthogonal", "orthogonal"]

Map = Literal["expm", "cayley"]
_MAPS = ("expm", "cayley")


#: Where ``Orthogonal._exact_base`` keeps its verdict (in the instance ``__dict__``).
_VERDICT = "_manifoldparam_base_verdict"
#: Whether ``Orthogonal._warn_drift`` has warned (in the instance ``__dict__``).
_WARNED = "_manifoldparam_drift_warned"
#: Newton--Schulz steps ``Orthogonal._settle`` tries before the polar factor (from δ < 1/2,
#: five steps reach float64 round-off).
_MAX_SETTLE_STEPS = 6


def _host_checked(t: Tensor) -> bool:
    """Whether ``t`` can be measured on the host at no extra cost: eager mode, on a device whose
    norms the exponential already read (the CPU; CUDA outside graph capture)."""
    return (
        may_read_on_host(t)
        and not torch.compiler.is_compiling()
        and not is_tracing()
        and not is_functorch_wrapped(t)
    )


def _exp(a: Tensor, max_squarings: int | None) -> tuple[Tensor, bool]:
    """``(exp(A), taylor)`` for A = L - Lᵀ (made by ``Orthogonal.skew``), through
    :func:`~manifoldparam.linalg.expm.expm_projected` (a backward at about 2 forwards);
    ``taylor``: its round-off is already at the Newton--Schulz floor (see ``_expm``).

    In eager mode the degree and the number of squarings are chosen from norms read on the
    host: free on the CPU, one synchronisation per evaluation on a GPU (as
    ``torch.linalg.matrix_exp`` does there; once per step with a cache; the backward reads
    nothing). While a CUDA graph is being captured, where no host read is possible, and
    whenever ``max_squarings`` is given, a fixed, masked number of squarings is used instead
    (``expm.SYNC_FREE_SQUARINGS`` while capturing), so nothing syncs; it costs that many
    products in the forward and twice as many in the backward, used or not. Under
    ``torch.compile`` on the CPU the squarings are chosen inside the graph
    (:mod:`manifoldparam.linalg._traced`: T_8 traced where the skew bound allows at most two,
    so inductor fuses it), else the custom op :mod:`manifoldparam.linalg.op` (same scheme and
    backward as eagerly); both add the Newton--Schulz step off the Taylor floor themselves, so
    ``taylor`` is True. Under ``torch.jit.trace`` (no Functions with non-tensor outputs):
    ``torch.linalg.matrix_exp``."""
    if torch.compiler.is_compiling():  # (both polish what is off the Taylor floor)
        n = a.shape[-1]
        if max_squarings is None and n > 0 and traced_ok(a):  # squarings chosen in the graph
            return traced_exp(a.reshape(-1, n, n)).reshape(a.shape), True
        return expm_op(a, max_squarings, projected=True), True
    if is_tracing():
        return torch.linalg.matrix_exp(a), False
    return _expm(a, max_squarings, projected=True)


def _orthogonalize(b: Tensor, steps: int = 2) -> Tensor:
    """``b`` (nearly orthogonal, square) made orthogonal to working precision: Newton--Schulz
    steps in float64 (each maps ``max|BᵀB - I| = δ`` to about ``3δ²/4``), rounded back to
    ``b``'s dtype. Without it, the map's output would keep the base's own error when the
    Newton--Schulz correction is skipped (a float32 ``Q`` is accepted within ``16·n·eps``)."""
    y = b.to(torch.promote_types(b.dtype, torch.float64))
    return (y + _newton_schulz_correction(y, steps)).to(b.dtype)


class Orthogonal(Parametrization):
    """Parametrization onto orthogonal / Stiefel matrices (see the module docstring).

    Args:
        shape: shape of the weight.
        map: ``"expm"`` (matrix exponential; reaches the whole connected component) or
            ``"cayley"`` (cheaper; reaches all but the matrices with eigenvalue -1).
        batched: for a weight with more than two dims, constrain each matrix over the last two
            dims (torch/geotorch's convention) instead of the flattened ``(out, rest)`` matrix.
        newton_schulz: Newton--Schulz correction steps after the map. ``None`` (default): one
            step, skipped where the exponential's round-off is already at its floor (the
            Taylor path, see the module docstring); an int: always that many (0: never).
        max_squarings: for ``map="expm"``, a fixed number of masked squarings (no host read of
            norms: no device sync, for CUDA graphs and ``torch.compile(fullgraph=True)``);
            ``None`` (default) reads the norms on the host in eager mode (one sync per
            evaluation on a GPU) and a fixed number while a CUDA graph is being captured.
        tall: ``None`` (default): the tall path (the same map in :math:`O(nk^2 + k^3)`, an ``n×k``
            base) when ``n >= 3k`` and ``n >= 256``; ``True`` / ``False`` force either.
        atol: assignment/check tolerance on ``max|WᵀW - I|``; default ``16·n·eps(dtype)``.
    """

    set_name = "orthogonal (orthonormal columns/rows)"
    has_base_point = True
    # The base check's memo (a plain tuple in __dict__) is not module state for TorchScript.
    __jit_ignored_attributes__ = (_VERDICT, _WARNED)

    def __init__(
        self,
        shape: Sequence[int],
        *,
        map: Map = "expm",
        batched: bool = False,
        newton_schulz: int | None = None,
        max_squarings: int | None = None,
        tall: bool | None = None,
        atol: float | None = None,
        owner: str | None = None,
    ) -> None:
        super().__init__(shape, atol=atol, owner=owner)
        if map not in _MAPS:
            raise ValueError(f"map must be one of {_MAPS}, got {map!r}")
        if len(self.shape) < 2:
            raise ValueError(
                f"{self.owner}: orthogonal needs a matrix (a tensor of at least 2 dims); this one "
                f"has shape {tuple(self.shape)}. A vector has no orthogonality to keep: for a "
                "unit-norm vector, constrain its norm (manifoldparam.constrain(module, name, "
                "torch.linalg.vector_norm, eq=1.0)), or register on a (1, n) matrix parameter."
            )
        if batched and len(self.shape) < 3:
            raise ValueError(
                "batched=True needs a weight with at least 3 dims (a batch of matrices)"
            )
        self.method = map
        self.batched = batched
        ns = newton_schulz
        if ns is not None and (type(ns) is bool or not isinstance(ns, int) or ns < 0):
            raise ValueError(f"newton_schulz must be None (automatic) or an int >= 0, got {ns!r}")
        self.newton_schulz = ns
        self.max_squarings = max_squarings
        if batched:
            self.batch_shape = self.shape[:-2]
            rows, cols = self.shape[-2], self.shape[-1]
        else:
            self.batch_shape = torch.Size()
            rows = self.shape[0]
            cols = math.prod(self.shape[1:]) if len(self.shape) > 1 else 1
        self.transposed = rows < cols
        self.n, self.k = max(rows, cols), min(rows, cols)
        n, k = self.n, self.k
        if tall_path.setup(self, tall):  # (the tall path's buffers)
            return
        # Flat indices (i*n + j) of the free entries of A: i > j and j < k.
        ii, jj = torch.tril_indices(n, n, offset=-1)
        keep = jj < k
        self.register_buffer("index", (ii[keep] * n + jj[keep]).contiguous(), persistent=False)
        self.register_buffer("base", torch.eye(n).expand(*self.batch_shape, n, n).clone())

    @property
    def matrix_dim(self) -> int:
        """Dimension of the set per matrix: ``nk - k(k+1)/2``."""
        return self.n * self.k - self.k * (self.k + 1) // 2

    @property
    def dim(self) -> int:
        return self.batch_shape.numel() * self.matrix_dim

    @property
    def manifold(self) -> object:
        import geoopt

        return geoopt.Stiefel()

    def default_atol(self, dtype: torch.dtype) -> float:
        if dtype in LOW_PRECISION:
            # A float32-orthogonal matrix rounded to half: max|WᵀW - I| <= about eps(dtype)
            # (|Σᵢ wᵢvᵢ(δᵢ + δ'ᵢ)| <= 2u·Σᵢ|wᵢvᵢ| <= eps), whatever n; 4x headroom.
            return 4.0 * torch.finfo(dtype).eps + self.default_atol(torch.float32)
        return 16.0 * max(self.n, 1) * torch.finfo(dtype).eps

    # ------------------------------------------------------------ shape plumbing
    def _to_tall(self, w: Tensor) -> Tensor:
        """The weight as a batch of tall n×k matrices."""
        if self.batched:
            t = w
        else:
            t = w.reshape(self.shape[0], -1)
        return t.mT if self.transposed else t

    def _from_tall(self, t: Tensor) -> Tensor:
        if self.transposed:
            t = t.mT
        return t.reshape(self.shape)

    def skew(self, x: Tensor) -> Tensor:
        """The skew-symmetric matrix ``A = L - Lᵀ`` of the coordinates ``x`` (shape
        ``(*batch, dim)``), ``L`` strictly lower triangular.

        ``L`` is a scatter (its backward a gather: ``index_copy`` and a gather-built ``A`` cost
        2-4x more in one direction), and the subtraction's backward applies
        ``P(Ā) = Ā - Āᵀ``, which :func:`~manifoldparam.linalg.expm.expm_projected` relies on.
        """
        n = self.n
        index = self.index.expand(*x.shape[:-1], -1)
        low = x.new_zeros(*x.shape[:-1], n * n).scatter(-1, index, x).unflatten(-1, (n, n))
        return low - low.mT

    # ------------------------------------------------------------ the map
    def map(self, x: Tensor) -> Tensor:
        clean = False  # round-off already at the floor one Newton--Schulz step reaches
        if self.tall:  # the same map in O(nk²): the base is n×k (_stiefel_tall)
            t = tall_path.tall_map(self, x)
        else:
            if self.method == "expm":
                e, clean = _exp(self.skew(x), self.max_squarings)
                if self.k < self.n:  # (a full slice would still cost a copy in the backward)
                    e = e[..., : self.k]
            else:
                e = _cayley(self.skew(x), self.k)
            t = self.base.to(e.dtype) @ e  # (a half-precision base: computed in float32)
        steps = self.newton_schulz
        if steps is None:
            if clean and self._exact_base():
                return self._from_tall(t)
            if self.method == "expm" and self.max_squarings is None and _host_checked(t):
                return self._from_tall(self._settle(t, x))
            steps = 1
        if steps > 0:
            t = t + _newton_schulz_correction(t.detach(), steps)
        return self._from_tall(t)

    def _settle(self, t: Tensor, x: Tensor) -> Tensor:
        """``t = B·exp(A)`` put on the set within the tolerance, where the
        norms are read on the host anyway (eager expm): one Newton--Schulz step when
        ``δ = max|yᵀy - I|`` is small (the usual case: the same two products as before, plus the
        read of δ); more steps while they converge (``δ < 1/2``, each maps δ to about ``3δ²/4``);
        else the polar factor (an SVD in float64). The exponential's round-off grows with
        ``2^s·‖A‖``: from coordinates of norm ≈ 1e4 (float32) one step no longer suffices, and
        beyond ≈ 1e6 the result is far from orthogonal. Those cases warn once, with the fix
        (:func:`rebase`); the gradient is that of ``t`` (the correction is a constant)."""
        y = t.detach()
        # Stop where the step just taken leaves ¾δ² below a Gram product's round-off, √k·eps.
        enough = math.sqrt(self.k) * torch.finfo(y.dtype).eps
        # What needs no word: a Padé/squaring round-off, or the base's own error (measured by
        # _exact_base: a base stored in half precision, or converted from a lower one).
        self._exact_base()
        memo = self.__dict__.get(_VERDICT)
        base_error = memo[2] if memo is not None else torch.finfo(self.base.dtype).eps
        expected = max(math.sqrt(torch.finfo(y.dtype).eps), 4 * base_error)
        eye = torch.eye(self.k, dtype=y.dtype, device=y.device)
        d = y.new_zeros(())
        first: float | None = None
        for _ in range(_MAX_SETTLE_STEPS):
            z = y + d
            gram = z.mT @ z
            delta = float(max_abs(gram - eye))
            if not math.isfinite(delta) or delta >= 0.5:
                break
            # NS(z) - z = z/2 - z(zᵀz)/2, with the Gram product already made
            d = d + torch.matmul(z, gram).mul_(-0.5).add_(z, alpha=0.5)
            first = delta if first is None else first
            if delta * delta <= enough:
                if first > expected:
                    self._warn_drift(first, "Newton--Schulz steps")
                return t + d
        if not bool(torch.isfinite(y).all()):  # (read already: name it on every device)
            raise NonFiniteError(self._why_not_finite(x, y))
        self._warn_drift(delta if first is None else first, "the polar factor")
        u, _, vh = torch.linalg.svd(y.double(), full_matrices=False)
        # The polar factor itself (t + (polar - t) would cancel for a huge t); t - t.detach()
        # is exactly 0 and carries t's gradient.
        return (u @ vh).to(y.dtype) + (t - y)

    def _warn_drift(self, delta: float, how: str) -> None:
        if self.__dict__.get(_WARNED):
            return
        self.__dict__[_WARNED] = True  # (straight into __dict__: no cache invalidation)
        warnings.warn(
            f"{self.owner}: the orthogonal coordinates are far from the base point, where the "
            f"exponential loses accuracy (max|WᵀW - I| = {delta:.2e} before correction); the "
            f"weight was put back on the set with {how}. Call manifoldparam.rebase(model, "
            "optimizer) from time to time (or lower the learning rate) to keep the map "
            "accurate and its gradient exact. (Shown once per weight.)",
            RuntimeWarning,
            stacklevel=2,
        )

    def _exact_base(self) -> bool:
        """Whether the base is orthogonal to working precision (``max|BᵀB - I|`` in float64 at
        most ``2·eps(dtype) + √n·eps(float64)``), so that skipping the Newton--Schulz step on
        the Taylor path leaves no error of the base in the weight. True for every base this
        class sets (:func:`_orthogonalize`); not for one converted from a lower precision
        (``module.double()`` after registration), nor one loaded from an older checkpoint.
        Checked once per base: the verdict is kept with the tensor's ``id``, version, address,
        dtype and shape (one float64 product per change of the base, none per step; no
        reference, weak or strong: a tensor substituted by ``functional_call`` is not kept
        alive, and ``torch.utils.swap_tensors`` refuses weakly referenced tensors). Like the
        cache, it cannot see writes through ``.data``, after which
        :func:`~manifoldparam.invalidate` drops it (:meth:`forget`). False (the step runs)
        for a batched base under ``torch.func`` transforms and for inference tensors, which
        keep no version counter. Compiled, the last verdict is read as it is (set at registration
        and assignment, dropped by every change of the base but a write through ``.data``;
        none: the step runs), since the key cannot be traced."""
        if torch.compiler.is_compiling():
            memo = self.__dict__.get(_VERDICT)
            return memo is not None and memo[1]
        b = self.base
        if is_functorch_wrapped(b) or b.is_inference():
            return False
        key = (id(b), b._version, b.data_ptr(), b.dtype, b.shape)
        memo = self.__dict__.get(_VERDICT)
        if memo is not None and memo[0] == key:
            return memo[1]
        d = b.detach().to(torch.float64)
        eye = torch.eye(d.shape[-1], dtype=d.dtype, device=d.device)
        # (in the dtype the map runs in: a half-precision base is never exact in float32)
        eps = torch.finfo(compute_dtype(b.dtype)).eps
        tol = 2 * eps + math.sqrt(self.n) * torch.finfo(torch.float64).eps
        error = float(max_abs(d.mT @ d - eye))
        exact = error <= tol
        # Straight into __dict__: an attribute assignment would drop the value cache.
        self.__dict__[_VERDICT] = (key, exact, error)
        return exact

    def forget(self) -> None:
        self.__dict__.pop(_VERDICT, None)

    def check_state(self, state: MutableMapping[str, Any], prefix: str) -> None:
        """The checkpoint's base point ``<prefix>base``: of this base's shape, finite, and
        orthogonal (``max|BᵀB - I|``, in float64) within the tolerance of the coarser of its
        dtype and this base's, float32 at the finest: a base set in float32 keeps float32
        round-off after ``module.double()`` (see :meth:`_exact_base`), and it is still a base
        of this set. A base off the set would put the weight off it (by up to ‖B‖²)."""
        key = prefix + "base"
        tall_path.check_shape(self, state, key)
        b = self._loaded(state, key, self.base, "base point")
        if b is None:
            return
        d = b.detach().to(torch.float64)
        eye = torch.eye(d.shape[-1], dtype=d.dtype, device=d.device)
        error = float(max_abs(d.mT @ d - eye))
        coarse = max(b.dtype, self.base.dtype, torch.float32, key=lambda t: torch.finfo(t).eps)
        tol = max(self.tolerance(coarse), self.default_atol(coarse))
        if error > tol:
            raise RuntimeError(
                f"{self.owner}: the checkpoint's base point {key!r} is not orthogonal: "
                f"max|BᵀB - I| = {error:.3e} > tolerance {tol:.3e} ({b.dtype}, "
                f"{d.shape[-2]}x{d.shape[-1]}); loaded, the weight would be off the set. It was "
                "not saved from this constraint (bases are set by registration, assignment and "
                "manifoldparam.rebase): load the checkpoint it belongs to, or load the "
                "weight's value instead (manifoldparam.interop.load_plain_state_dict with the "
                f"'{self.owner.rsplit('.', 1)[-1]}' key projects it onto the set)."
            )
        tall_path.check_frame(self, state, prefix, tol)

    def inverse(self, w: Tensor) -> Tensor:
        t = self._to_tall(w)
        if self.tall:  # base n×k and its complement's Householder factors, O(nk²)
            tall_path.set_frame(self, t)
            return w.new_zeros(*self.batch_shape, self.matrix_dim)
        if self.k < self.n:
            q, _ = torch.linalg.qr(t, mode="complete")
            t = torch.cat([t, q[..., self.k :]], dim=-1)
        self.base = _orthogonalize(t.detach()).to(self.base.dtype).contiguous()
        self._exact_base()  # (the verdict a compiled map reads; see _exact_base)
        return w.new_zeros(*self.batch_shape, self.matrix_dim)

    def project(self, w: Tensor) -> Tensor:
        """The polar factor ``U Vᵀ`` of (each matrix of) ``w``: the nearest orthogonal one."""
        if self.tall:  # (through a thin QR: O(nk²), the SVD of the n×k matrix is slower)
            return self._from_tall(polar(self._to_tall(w)))
        u, _, vh = torch.linalg.svd(self._to_tall(w), full_matrices=False)
        return self._from_tall(u @ vh)

    def distance(self, w: Tensor) -> Tensor:
        t = self._to_tall(w)
        eye = torch.eye(self.k, dtype=t.dtype, device=t.device)
        return max_abs(t.mT @ t - eye)

    def explain(self, w: Tensor, d: float, tol: float) -> str:
        kind = "rows" if self.transposed else "columns"
        return (
            f"max|WᵀW - I| over its {kind} is {d:.3e} > tolerance {tol:.3e} "
            f"({w.dtype}, {self.n}x{self.k})"
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, map={self.method}, matrix={self.n}x{self.k}"
            f"{' (transposed)' if self.transposed else ''}, batched={self.batched}"
            f"{', tall' if self.tall else ''}"
        )


def orthogonal(
    module: nn.Module,
    name: str = "weight",
    *,
    map: Map = "expm",
    batched: bool = False,
    newton_schulz: int | None = None,
    max_squarings: int | None = None,
    tall: bool | None = None,
    atol: float | None = None,
) -> nn.Module:
    """Constrain ``module.<name>`` to be orthogonal (square) or to have orthonormal columns
    (tall) or rows (wide). The current weight is kept, moved to its polar factor.

    Returns ``module``. See :class:`Orthogonal` for the arguments and the math::

        rnn_cell = manifoldparam.orthogonal(nn.Linear(128, 128, bias=False))
        conv = manifoldparam.orthogonal(nn.Conv2d(16, 32, 3))   # (32, 144): orthonormal rows
    """
    return register(
        module,
        name,
        Orthogonal,
        map=map,
        batched=batched,
        newton_schulz=newton_schulz,
        max_squarings=max_squarings,
        tall=tall,
        atol=atol,
    )
