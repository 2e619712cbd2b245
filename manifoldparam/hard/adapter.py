r"""Orthogonal fine-tuning (OFT): a frozen weight times a trainable block-diagonal rotation.

Math. For a weight :math:`W_0 \in \mathbb{R}^{m\times n}` (``(out, in)``, frozen: a buffer
stored once) the attribute becomes

.. math::
    W = W_0 R \quad(\texttt{dim=1}, \text{the default}),\qquad
    W = R W_0 \quad(\texttt{dim=0}),\qquad
    R = \operatorname{diag}(e^{A_1}, \dots, e^{A_k}),

each :math:`A_i` a skew-symmetric ``block_size`` × ``block_size`` matrix whose strictly lower
entries are the coordinates: :math:`k\,b(b-1)/2` numbers, exactly the dimension of the
product of :math:`k` copies of :math:`SO(b)` (minimal: no dead direction). ``dim=1`` rotates
the input features (OFT's :math:`W^\top = R^\top W_0^\top` in the paper's ``(in, out)``
layout, and peft's ``OFTConfig`` convention: ``block_size`` divides ``in_features``), which
keeps the angles between the neurons (the rows); ``dim=0`` rotates the outputs. The
coordinates start at 0, so :math:`R = I` and the layer is unchanged until it is trained.

The exponential is exact to round-off (:func:`~manifoldparam.linalg.expm_skew_blocks`: the
degree-8 Taylor polynomial, with as many squarings as a bound on the largest angle asks, one
number for all blocks, batched: a constant number of kernels whatever :math:`k`), so
:math:`R` is orthogonal to round-off at any coordinates, unlike a truncated Cayley--Neumann
series (peft's default), whose :math:`R` drifts off the group as :math:`\|A\|` grows.

The set and its hooks. The attribute's set is :math:`\{W_0 R\}` for the frozen :math:`W_0`,
not a set of matrices defined without it. ``project`` is the nearest point of it in the
Frobenius norm: per block, the special orthogonal Procrustes problem
:math:`\min_{Q \in SO(b)} \|X_i Q - Y_i\|_F`, solved by the polar factor of the block
product :math:`X_i^\top Y_i = U \Sigma V^\top`, :math:`Q = U D V^\top` with
:math:`D = \operatorname{diag}(1, \dots, 1, \det U V^\top)` (:math:`X_i, Y_i`: the columns of
block :math:`i` of :math:`W_0` and of the value). ``distance`` is
:math:`\max|W - \Pi(W)|`. Assignment ``module.weight = W`` of a :math:`W = W_0 R` (within the
tolerance) recovers :math:`R` that way and sets the coordinates to :math:`\log R` (through the
Cayley transform, whose skew matrix has a Hermitian multiple: an ``eigh``, well conditioned;
a block with the eigenvalue :math:`-1` exactly, a rotation by :math:`\pi`, is the one case it
cannot take, and the exponential reaches it only as a limit). :math:`W_0` itself never changes
after registration; the registered weight is :math:`W_0` (coordinates 0).
:func:`~manifoldparam.export` gives the merged plain weight :math:`W_0 R`.

Example::

    >>> layer = mp.orthogonal_adapter(nn.Linear(64, 16), block_size=32)
    >>> layer.parametrizations.weight.original.shape       # 2 blocks of 32·31/2 angles
    torch.Size([2, 496])
    >>> w0 = layer.parametrizations.weight[0].frozen
    >>> bool(torch.equal(layer.weight, w0))                  # R = I at registration
    True
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from manifoldparam._device import may_read_on_host
from manifoldparam._torch import forward_ad_active, is_functorch_wrapped, is_tracing
from manifoldparam.hard.base import LOW_PRECISION, Parametrization, max_abs
from manifoldparam.hard.orthogonal import _exp
from manifoldparam.hard.registration import register
from manifoldparam.linalg.skew_blocks import SkewIndex, expm_skew_blocks, skew_index
from manifoldparam.linalg.stiefel import _newton_schulz_correction

__all__ = ["OrthogonalAdapter", "orthogonal_adapter"]

#: Where the instance keeps whether W₀ was taken (in ``__dict__``: no cache invalidation).
_TAKEN = "_manifoldparam_frozen_taken"


def _divisors(n: int) -> list[int]:
    return [d for d in range(2, n + 1) if n % d == 0]


def _special_polar(m: Tensor) -> Tensor:
    """The nearest matrix of SO(b) to each ``m`` (``(k, b, b)``): ``U D Vᵀ``."""
    u, _, vh = torch.linalg.svd(m)
    sign = torch.linalg.det(u @ vh)
    u = torch.cat([u[..., :-1], u[..., -1:] * sign[..., None, None]], dim=-1)
    return u @ vh


def _log_rotation(r: Tensor) -> Tensor:
    """A real skew ``A`` with ``exp(A) = r`` for rotations ``r`` (``(k, b, b)``) without the
    eigenvalue -1: ``C = (R + I)^{-1}(R - I)`` is skew with eigenvalues ``i·tan(θ/2)``, so
    ``H = -iC`` is Hermitian (``eigh``: unitary eigenvectors, no ill-conditioned ``eig``) and
    ``log R = U diag(2i·atan μ) Uᴴ`` for ``H = U diag(μ) Uᴴ``. Computed in float64."""
    r = r.to(torch.float64)
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
    c = torch.linalg.solve(r + eye, r - eye)
    c = 0.5 * (c - c.mT)
    mu, u = torch.linalg.eigh(-1j * c.to(torch.complex128))
    theta = 2.0 * torch.atan(mu)
    log = (u * (1j * theta).unsqueeze(-2).to(u.dtype)) @ u.mH
    a = log.real
    return 0.5 * (a - a.mT)


class OrthogonalAdapter(Parametrization):
    """``W = W₀·R`` (or ``R·W₀``): a frozen weight and a block-diagonal rotation through the
    exact exponential of skew blocks (see the module docstring).

    Args:
        shape: shape of the (2-D) weight.
        block_size: the size ``b`` of each rotation block; it must divide the rotated dim.
        dim: ``1`` (default) rotates the input features (columns), ``0`` the outputs (rows).
        max_squarings: a fixed number of masked squarings for the exponential (no host read,
            for CUDA graphs); ``None`` (default) chooses from the norms.
        atol: assignment/check tolerance on ``max|W - Π(W)|``; default from the dtype, the
            block size and ``max|W₀|``.
    """

    set_name = "a block rotation of the frozen weight (W₀·R, R block-orthogonal)"

    def __init__(
        self,
        shape: Sequence[int],
        *,
        block_size: int = 32,
        dim: int = 1,
        max_squarings: int | None = None,
        atol: float | None = None,
        owner: str | None = None,
    ) -> None:
        super().__init__(shape, atol=atol, owner=owner)
        if len(self.shape) != 2:
            raise ValueError(
                f"{self.owner}: orthogonal_adapter needs a 2-D weight (out, in); this one has "
                f"shape {tuple(self.shape)}. Register it on a linear layer's weight, or on a "
                "2-D view of the parameter (e.g. a module holding weight.flatten(1))."
            )
        if dim not in (0, 1):
            raise ValueError(f"{self.owner}: dim must be 0 (outputs) or 1 (inputs), got {dim!r}")
        if type(block_size) is not int or block_size < 2:
            raise ValueError(
                f"{self.owner}: block_size must be an int >= 2 (a 1x1 rotation is the identity), "
                f"got {block_size!r}"
            )
        size = self.shape[dim]
        if size % block_size:
            other = self.shape[1 - dim]
            hint = (
                f"; or dim={1 - dim} ({other} is divisible by {block_size})"
                if other % block_size == 0
                else ""
            )
            what = "in_features" if dim == 1 else "out_features"
            raise ValueError(
                f"{self.owner}: block_size={block_size} does not divide the rotated dimension "
                f"({what} = {size}, dim {dim} of shape {tuple(self.shape)}). Pick a block_size "
                f"that divides {size} (one of {_divisors(size)[:8]}){hint}."
            )
        self.block_size = block_size
        self.dim_rotated = dim
        self.blocks = size // block_size
        self.max_squarings = max_squarings
        b = block_size
        take, sign, low, up = skew_index(b)
        self.register_buffer("index", low, persistent=False)
        self.register_buffer("mirror", up, persistent=False)
        self.register_buffer("take", take, persistent=False)
        self.register_buffer("sign", sign, persistent=False)
        self.register_buffer("frozen", torch.zeros(self.shape))

    @property
    def dim(self) -> int:
        return self.blocks * self.block_size * (self.block_size - 1) // 2

    def default_atol(self, dtype: torch.dtype) -> float:
        # R W₀ in floating point: each entry a b-term dot product of |W₀|-sized terms with an R
        # orthogonal to a few ulps; 16·b·eps·max|W₀|, as Orthogonal's 16·n·eps.
        scale = max(float(self.frozen.detach().abs().max()), torch.finfo(torch.float32).tiny)
        if dtype in LOW_PRECISION:
            return 4.0 * torch.finfo(dtype).eps * scale + self.default_atol(torch.float32)
        return 16.0 * self.block_size * torch.finfo(dtype).eps * scale

    # ------------------------------------------------------------ blocks
    def rotation(self, x: Tensor) -> Tensor:
        """The blocks ``R_i = exp(A_i)`` (shape ``(k, b, b)``) for coordinates ``x``.

        Eagerly, and under ``torch.compile`` on the CPU (traced where two squarings at most
        are needed, else the custom op ``manifoldparam::expm_skew_blocks_v1``):
        :func:`~manifoldparam.linalg.expm_skew_blocks`,
        the Taylor polynomial with one number of squarings for all blocks and its exact
        derivative (8 batched products for forward and backward at OFT's usual angles). Under
        ``torch.func`` transforms, forward-mode AD, a fixed ``max_squarings`` or compiled on an
        accelerator: the general exponential (:func:`~manifoldparam.linalg.expm`'s scheme and
        Fréchet backward), which supports them."""
        b = self.block_size
        if self._blockwise(x):  # (orthogonal to round-off at any angle: polished inside)
            index = SkewIndex(self.take, self.sign, self.index, self.mirror)
            return expm_skew_blocks(x, b, index)[0]
        index = self.index.expand(*x.shape[:-1], -1)
        low = x.new_zeros(*x.shape[:-1], b * b).scatter(-1, index, x).unflatten(-1, (b, b))
        e, clean = _exp(low - low.mT, self.max_squarings)
        if not clean:  # Padé or squarings: one Newton--Schulz step (no backward, see its doc)
            e = e + _newton_schulz_correction(e.detach(), 1)
        return e

    def _blockwise(self, x: Tensor) -> bool:
        if self.max_squarings is not None:
            return False
        if torch.compiler.is_compiling():  # the choice of s reads the bound on the host when
            return x.is_cpu  # it runs: not inside a captured CUDA graph
        # (torch.func and forward-mode AD: the general path has their formulas)
        if is_tracing() or is_functorch_wrapped(x) or forward_ad_active():
            return False
        return may_read_on_host(x)

    def apply_rotation(self, r: Tensor, w0: Tensor) -> Tensor:
        """``W₀·R`` (``dim=1``) or ``R·W₀`` (``dim=0``) for blocks ``r``, without building
        the dense ``R``: one batched product. For ``dim=1`` the result is the transpose of a
        contiguous tensor (``W.mT.is_contiguous()``; call ``.contiguous()`` before ``view``)."""
        m, n = self.shape
        k, b = self.blocks, self.block_size
        if self.dim_rotated == 0:
            return (r @ w0.reshape(k, b, n)).reshape(m, n)
        # Wᵀ = diag(R_iᵀ)·W₀ᵀ, computed contiguous, and W its transpose (a view): no copy of
        # the weight to interleave the blocks, and F.linear reads Wᵀ as it is.
        return (r.mT @ w0.mT.reshape(k, b, m)).reshape(n, m).mT

    def _columns(self, w: Tensor) -> Tensor:
        """The blocks of ``w`` as ``(k, rows, b)`` with ``value_i = frozen_i·Q_i``
        (``Q = R`` for ``dim=1``, ``Rᵀ`` for ``dim=0``)."""
        m, n = self.shape
        k, b = self.blocks, self.block_size
        if self.dim_rotated == 0:
            return w.reshape(k, b, n).mT
        return w.reshape(m, k, b).transpose(0, 1)

    def _procrustes(self, w: Tensor) -> Tensor:
        """The rotation blocks of the nearest point :math:`W_0 R` to ``w``."""
        dt = torch.float32 if w.dtype in LOW_PRECISION else w.dtype  # (no half-precision SVD)
        x0 = self._columns(self.frozen.to(dt))
        q = _special_polar(x0.mT @ self._columns(w.to(dt)))
        return q if self.dim_rotated == 1 else q.mT

    # ------------------------------------------------------------ the hooks
    def map(self, x: Tensor) -> Tensor:
        r = self.rotation(x)
        return self.apply_rotation(r, self.frozen.to(r.dtype))

    def inverse(self, w: Tensor) -> Tensor:
        k, b = self.blocks, self.block_size
        if not self.__dict__.get(_TAKEN):
            # Registration: the user's weight becomes W₀, and R = I.
            self.frozen = w.detach().clone().to(self.frozen.dtype).contiguous()
            self.__dict__[_TAKEN] = True
            return w.new_zeros(k, b * (b - 1) // 2)
        a = _log_rotation(self._procrustes(w.detach()))
        return a.reshape(k, b * b)[:, self.index].to(w.dtype)

    def project(self, w: Tensor) -> Tensor:
        """The nearest :math:`W_0 R` to ``w`` (Frobenius): per block the special orthogonal
        Procrustes solution. Before registration (W₀ not taken yet): ``w`` itself."""
        if not self.__dict__.get(_TAKEN):
            return w
        r = self._procrustes(w)
        return self.apply_rotation(r, self.frozen.to(r.dtype)).to(w.dtype)

    def distance(self, w: Tensor) -> Tensor:
        return max_abs(w - self.project(w))

    def explain(self, w: Tensor, d: float, tol: float) -> str:
        side = "W₀·R" if self.dim_rotated == 1 else "R·W₀"
        return (
            f"max|W - Π(W)| = {d:.3e} > tolerance {tol:.3e} ({w.dtype}), Π(W) the nearest {side} "
            f"with R block-orthogonal ({self.blocks} blocks of {self.block_size})"
        )

    def check_state(self, state: MutableMapping[str, Any], prefix: str) -> None:
        """The checkpoint's frozen weight ``<prefix>frozen``: of this shape and finite."""
        self._loaded(state, prefix + "frozen", self.frozen, "frozen weight")

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, block_size={self.block_size}, blocks={self.blocks}, "
            f"dim={self.dim_rotated}"
        )


def orthogonal_adapter(
    module: nn.Module,
    name: str = "weight",
    *,
    block_size: int = 32,
    dim: int = 1,
    max_squarings: int | None = None,
    atol: float | None = None,
) -> nn.Module:
    r"""Orthogonal fine-tuning of ``module.<name>``: :math:`W = W_0 R`, the current weight
    :math:`W_0` frozen and :math:`R` a trainable block-diagonal rotation.

    :math:`R = \operatorname{diag}(e^{A_1}, \dots, e^{A_k})` with skew ``block_size`` ×
    ``block_size`` blocks :math:`A_i` (their strictly lower entries are the coordinates,
    ``parametrizations.<name>.original``, shape ``(k, b(b-1)/2)``), starting at :math:`R = I`.
    ``dim=1`` (default) rotates the input features, ``dim=0`` the outputs (:math:`W = R W_0`).
    :math:`W_0` is the buffer ``parametrizations.<name>.0.frozen`` (in the state_dict, once).
    :func:`~manifoldparam.export` merges :math:`W_0 R` into a plain weight. The coordinates
    require grad even if the weight did not (freeze the model first, then add adapters); the
    module's other parameters keep their ``requires_grad``.

    Args:
        module: the module that holds the attribute (``nn.Linear`` or any 2-D weight).
        name: the attribute.
        block_size: the size of each rotation block; it must divide the rotated dimension.
        dim: ``1`` rotates the columns (input features, OFT/peft's convention), ``0`` the rows.
        max_squarings: see :class:`~manifoldparam.Orthogonal` (``None``: from the norms).
        atol: tolerance of a checked assignment (``None``: from the dtype and ``max|W₀|``).

    Returns:
        ``module``, whose ``module.<name>`` is now :math:`W_0 R`.

    Raises:
        ValueError: ``block_size`` does not divide the rotated dimension (the message names
            the divisors and the other ``dim``), a weight that is not 2-D, NaN/Inf weights.

    Example:
        >>> layer = mp.orthogonal_adapter(nn.Linear(8, 3), block_size=4)
        >>> opt = torch.optim.Adam(layer.parameters(), lr=0.1)
        >>> layer(torch.randn(5, 8)).square().sum().backward(); opt.step()
        >>> w0 = layer.parametrizations.weight[0].frozen
        >>> bool(torch.allclose(w0 @ w0.T, layer.weight @ layer.weight.T, atol=1e-5))
        True
        >>> plain = mp.export(layer)                  # nn.Linear, weight = W₀·R
        >>> type(plain).__name__, bool(torch.equal(plain.weight, layer.weight))
        ('Linear', True)
    """
    register(
        module,
        name,
        OrthogonalAdapter,
        block_size=block_size,
        dim=dim,
        max_squarings=max_squarings,
        atol=atol,
    )
    # The rotation is what is trained: its coordinates require grad even where the model was
    # frozen first (model.requires_grad_(False), the usual fine-tuning order).
    module.parametrizations[name].original.requires_grad_(True)
    return module
