r"""Rotations: :math:`SO(3)` through Rodrigues' formula, :math:`SO(n)` through the exponential.

Math. A rotation is an orthogonal matrix with determinant :math:`+1`. For 3×3 matrices the
coordinates are a rotation vector :math:`\omega \in \mathbb{R}^3` per matrix (3 numbers: the
dimension of :math:`SO(3)`) and the map is the closed-form exponential (Rodrigues)

.. math::
    R = \exp(\hat\omega) = \cos\theta\, I + \frac{\sin\theta}{\theta}\,\hat\omega
        + \frac{1 - \cos\theta}{\theta^2}\,\omega\omega^\top,\qquad \theta = \|\omega\|,

with :math:`\hat\omega` the skew matrix of the cross product. Both coefficients are
evaluated without cancellation: :math:`(1-\cos\theta)/\theta^2 = \tfrac12(\sin(\theta/2)/
(\theta/2))^2`, and for :math:`\theta^2 < 1/4` by their Taylor series to :math:`\theta^{14}`
(error below float64's round-off there), which also keeps the *derivative* exact: the closed
forms' autograd derivative loses :math:`\approx 3/\theta^2` ulps to cancellation near 0. The
result is orthogonal to float round-off for any :math:`\omega` (no squaring, no correction
step): float32 :math:`\max|R^\top R - I|` is a few ulps (``tests/test_rotation.py``).
The map is a local diffeomorphism for :math:`\theta < 2\pi` and onto :math:`SO(3)` on the
ball :math:`\theta \le \pi`; assignment takes the logarithm (:func:`so3_log`), which returns
:math:`\theta \le \pi`, accurate near :math:`\theta = \pi` too (the axis then comes from the
symmetric part :math:`(R + R^\top)/2 - \cos\theta I = (1-\cos\theta)uu^\top`, not from
:math:`R - R^\top \approx 0`). There is no base point: the weight is a function of the
coordinates alone.

For :math:`n \ne 3` (or ``method="expm"``/``"cayley"``) the map is the orthogonal one
(:class:`~manifoldparam.Orthogonal`: :math:`R = B\exp(A)`, :math:`n(n-1)/2` coordinates per
matrix), whose base :math:`B` registration and assignment set to a rotation, so the
determinant stays :math:`+1` (the exponential of a skew matrix has determinant 1).
Registration moves the weight to the nearest rotation (Frobenius): :math:`U\,\mathrm{diag}(1,
\dots, 1, \det UV^\top)\,V^\top` from the SVD :math:`W = U\Sigma V^\top`. A weight with more
than two dims is a batch of rotations over its last two dims.

Example::

    >>> poses = nn.Module()
    >>> poses.weight = nn.Parameter(torch.randn(5, 3, 3))
    >>> R = mp.rotation(poses).weight                  # five 3x3 rotations
    >>> bool(torch.allclose(R @ R.mT, torch.eye(3), atol=1e-6))
    True
    >>> bool((torch.linalg.det(R) > 0).all())
    True
    >>> poses.parametrizations.weight.original.shape   # a rotation vector each
    torch.Size([5, 3])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from manifoldparam.hard.base import LOW_PRECISION, Parametrization, max_abs
from manifoldparam.hard.orthogonal import Orthogonal
from manifoldparam.hard.registration import register

__all__ = ["SO3", "Rotation", "rotation", "so3_exp", "so3_log"]

Method = Literal["auto", "rodrigues", "expm", "cayley"]

# Taylor coefficients of sin(t)/t and (1 - cos t)/t² in t², up to t¹⁴: below t² = 1/4 the
# first omitted term is under 0.25⁸/17! ≈ 4e-20 (relative), below float64's round-off.
_SINC = [(-1) ** k / math.factorial(2 * k + 1) for k in range(8)]
_COSC = [(-1) ** k / math.factorial(2 * k + 2) for k in range(8)]
_SERIES_BELOW = 0.25


def _horner(coefficients: list[float], t2: Tensor) -> Tensor:
    out = torch.full_like(t2, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        out = out * t2 + c
    return out


def hat(omega: Tensor) -> Tensor:
    """The skew matrix of the cross product, ``hat(ω) @ v = ω × v``, for ``ω`` of shape
    ``(..., 3)``."""
    w1, w2, w3 = omega.unbind(-1)
    z = torch.zeros_like(w1)
    return torch.stack([z, -w3, w2, w3, z, -w1, -w2, w1, z], dim=-1).unflatten(-1, (3, 3))


def so3_exp(omega: Tensor) -> Tensor:
    r"""Rodrigues' formula: the rotation :math:`\exp(\hat\omega)` of each rotation vector.

    Args:
        omega: rotation vectors, shape ``(..., 3)`` (axis times angle, radians).

    Returns:
        Rotations of shape ``(..., 3, 3)``, orthogonal to the dtype's round-off for any
        ``omega``; differentiable everywhere (also at ``omega = 0``), with exact derivatives.

    Example:
        >>> R = so3_exp(torch.tensor([0.0, 0.0, math.pi / 2]))
        >>> R.round(decimals=6) + 0.0    # 90° about z
        tensor([[ 0., -1.,  0.],
                [ 1.,  0.,  0.],
                [ 0.,  0.,  1.]])
    """
    t2 = (omega * omega).sum(-1)[..., None, None]
    small = t2 < _SERIES_BELOW
    # Each branch sees only inputs where it is finite (a where's unused branch still carries
    # its gradient: an inf there would turn into NaN).
    ts = torch.where(small, t2, torch.zeros_like(t2))
    t = torch.where(small, torch.ones_like(t2), t2).sqrt()
    half = 0.5 * t
    sinc_half = torch.sin(half) / half
    a = torch.where(small, _horner(_SINC, ts), torch.sin(t) / t)
    b = torch.where(small, _horner(_COSC, ts), 0.5 * sinc_half * sinc_half)
    c = torch.where(small, 1.0 - b * ts, torch.cos(t))
    eye = torch.eye(3, dtype=omega.dtype, device=omega.device)
    outer = omega.unsqueeze(-1) * omega.unsqueeze(-2)
    return c * eye + a * hat(omega) + b * outer


@torch.no_grad()
def so3_log(rotation: Tensor) -> Tensor:
    r"""The rotation vector :math:`\omega` (:math:`\|\omega\| \le \pi`) with
    :math:`\exp(\hat\omega) = R`, for each rotation of shape ``(..., 3, 3)``.

    The angle is :math:`\theta = \operatorname{atan2}(\|v\|/2, (\operatorname{tr}R - 1)/2)`,
    :math:`v = \operatorname{vee}(R - R^\top) = 2\sin\theta\,u`, accurate at every angle. For
    :math:`\theta < \pi/2`, :math:`\omega = \theta v/(2\sin\theta)` (a series near 0); above,
    the axis is read from the symmetric part (its largest column), signed by :math:`v`, so
    :math:`\omega` stays accurate as :math:`\theta \to \pi`, where :math:`v \to 0`. At
    :math:`\theta = \pi` both :math:`\pm\pi u` are logarithms; either is returned. Not
    differentiable (used for assignment).

    Example:
        >>> omega = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
        >>> R = so3_exp(omega)
        >>> bool(torch.allclose(so3_log(R), omega))
        True
    """
    r = rotation
    v = torch.stack(
        [r[..., 2, 1] - r[..., 1, 2], r[..., 0, 2] - r[..., 2, 0], r[..., 1, 0] - r[..., 0, 1]],
        dim=-1,
    )
    cos = 0.5 * (r.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0)
    sin = 0.5 * torch.linalg.vector_norm(v, dim=-1)
    theta = torch.atan2(sin, cos)
    # Below π/2: θ/(2 sin θ)·v; θ/sin θ = 1 + θ²/6 + 7θ⁴/360 below θ = 1e-3 (error < 1e-19).
    t2 = theta * theta
    tiny = theta < 1e-3
    factor = torch.where(
        tiny,
        0.5 * (1.0 + t2 / 6.0 + 7.0 * t2 * t2 / 360.0),
        0.5 * theta / torch.where(tiny, torch.ones_like(sin), sin),
    )
    near_identity = factor.unsqueeze(-1) * v
    # Above: (R + Rᵀ)/2 - cos θ·I = (1 - cos θ)·uuᵀ; its largest column is ∝ u (1 - cos θ >= 1).
    eye = torch.eye(3, dtype=r.dtype, device=r.device)
    sym = 0.5 * (r + r.mT) - cos[..., None, None] * eye
    j = sym.diagonal(dim1=-2, dim2=-1).argmax(-1)
    col = torch.take_along_dim(sym, j[..., None, None].expand(*j.shape, 3, 1), dim=-1)[..., 0]
    axis = col / torch.linalg.vector_norm(col, dim=-1, keepdim=True).clamp_min(1e-300)
    sign = torch.where((axis * v).sum(-1, keepdim=True) < 0, -1.0, 1.0).to(r.dtype)
    near_pi = (sign * theta.unsqueeze(-1)) * axis
    return torch.where((theta < 0.5 * math.pi).unsqueeze(-1), near_identity, near_pi)


def nearest_rotation(w: Tensor) -> Tensor:
    """The rotation nearest to each square matrix of ``w`` in the Frobenius norm:
    ``U diag(1, .., 1, det(UVᵀ)) Vᵀ`` from the SVD ``W = UΣVᵀ`` (Umeyama's sign fix)."""
    u, _, vh = torch.linalg.svd(w)
    sign = torch.where(torch.linalg.det(u @ vh) < 0, -1.0, 1.0).to(w.dtype)
    flip = torch.ones(*w.shape[:-1], dtype=w.dtype, device=w.device)
    flip[..., -1] = sign
    return (u * flip.unsqueeze(-2)) @ vh


def _reflections(w: Tensor, owner_n: int) -> str | None:
    det = torch.linalg.det(w.double())
    bad = int((det < 0).sum())
    if bad:
        return (
            f"{bad} of {det.numel()} {owner_n}x{owner_n} matrices have determinant -1 "
            "(reflections, not rotations; the nearest rotation flips the sign of the singular "
            "vector of the smallest singular value)"
        )
    return None


def _check_square(shape: torch.Size, owner: str, three: bool) -> None:
    if len(shape) < 2 or shape[-1] != shape[-2]:
        raise ValueError(
            f"{owner}: rotation needs square matrices (a tensor of shape (..., n, n)); this one "
            f"has shape {tuple(shape)}. For orthonormal rows or columns of a rectangular weight "
            "use manifoldparam.orthogonal(module, name)."
        )
    if three and shape[-1] != 3:
        raise ValueError(
            f"{owner}: SO3 (Rodrigues) needs 3x3 matrices (shape (..., 3, 3)); this weight has "
            f"shape {tuple(shape)}. For n x n rotations use manifoldparam.rotation(module, name) "
            "(method='expm')."
        )


class SO3(Parametrization):
    """Parametrization onto 3×3 rotations by Rodrigues' formula (see the module docstring).

    Args:
        shape: shape of the weight, ``(*batch, 3, 3)``.
        atol: tolerance of the membership check on ``max|RᵀR - I|`` (and ``det R > 0``);
            default ``48·eps(dtype)``.
    """

    set_name = "a rotation (SO(3))"

    def __init__(
        self, shape: Sequence[int], *, atol: float | None = None, owner: str | None = None
    ) -> None:
        super().__init__(shape, atol=atol, owner=owner)
        _check_square(self.shape, self.owner, three=True)
        self.batch_shape = self.shape[:-2]

    @property
    def dim(self) -> int:
        """Three per matrix: the dimension of SO(3)."""
        return 3 * self.batch_shape.numel()

    @property
    def manifold(self) -> object:
        import geoopt  # (SO(3) lies in geoopt's Stiefel manifold: it has no SO(n))

        return geoopt.Stiefel()

    def default_atol(self, dtype: torch.dtype) -> float:
        if dtype in LOW_PRECISION:  # rounded to half: about eps(dtype), as Orthogonal's
            return 4.0 * torch.finfo(dtype).eps + self.default_atol(torch.float32)
        return 48.0 * torch.finfo(dtype).eps

    def map(self, x: Tensor) -> Tensor:
        return so3_exp(x.reshape(*self.batch_shape, 3))

    def inverse(self, w: Tensor) -> Tensor:
        return so3_log(w)

    def project(self, w: Tensor) -> Tensor:
        """The nearest rotation (SVD with the determinant's sign fixed)."""
        return nearest_rotation(w)

    def distance(self, w: Tensor) -> Tensor:
        return max_abs(w.mT @ w - torch.eye(3, dtype=w.dtype, device=w.device))

    def membership_failure(self, w: Tensor) -> str | None:
        return _reflections(w, 3)

    def explain(self, w: Tensor, d: float, tol: float) -> str:
        return f"max|RᵀR - I| = {d:.3e} > tolerance {tol:.3e} ({w.dtype})"


class Rotation(Orthogonal):
    """Parametrization onto :math:`SO(n)` (each ``n×n`` matrix over the last two dims): the
    orthogonal exponential (or Cayley) map at a base of determinant +1.

    Args:
        shape: shape of the weight, ``(*batch, n, n)``.
        map: ``"expm"`` (default) or ``"cayley"``, as for :class:`~manifoldparam.Orthogonal`.
        atol: tolerance on ``max|RᵀR - I|`` (and ``det R > 0``); default ``16·n·eps(dtype)``.
        **options: ``newton_schulz``, ``max_squarings`` of :class:`~manifoldparam.Orthogonal`.
    """

    set_name = "a rotation (SO(n))"

    def __init__(
        self,
        shape: Sequence[int],
        *,
        map: Literal["expm", "cayley"] = "expm",
        atol: float | None = None,
        owner: str | None = None,
        **options: int | None,
    ) -> None:
        size = torch.Size(shape)
        _check_square(size, owner or f"<{type(self).__name__}>", three=False)
        super().__init__(size, map=map, batched=len(size) > 2, atol=atol, owner=owner, **options)

    def project(self, w: Tensor) -> Tensor:
        """The nearest rotation (SVD with the determinant's sign fixed)."""
        return nearest_rotation(w)

    def membership_failure(self, w: Tensor) -> str | None:
        return _reflections(w, self.n)


def rotation(
    module: nn.Module,
    name: str = "weight",
    *,
    method: Method = "auto",
    atol: float | None = None,
) -> nn.Module:
    r"""Constrain each ``n×n`` matrix of ``module.<name>`` to be a rotation (orthogonal,
    :math:`\det = +1`).

    3×3 matrices use Rodrigues' closed form (:class:`SO3`: three coordinates, a rotation
    vector, per matrix; no base point); other sizes the orthogonal exponential at a rotation
    base (:class:`Rotation`: :math:`n(n-1)/2` coordinates per matrix). The current weight is
    kept, moved to the nearest rotation (SVD, with the determinant's sign fixed).

    Args:
        module: the module that holds the attribute.
        name: the attribute to constrain, of shape ``(..., n, n)``.
        method: ``"auto"`` (Rodrigues for n = 3, else ``"expm"``), ``"rodrigues"`` (n = 3
            only), ``"expm"`` or ``"cayley"`` (the maps of :func:`~manifoldparam.orthogonal`).
        atol: how far from the set an assigned value may be; ``None`` derives it from the
            dtype and size.

    Returns:
        ``module``, whose ``module.<name>`` is now a rotation (or a batch of them).

    Raises:
        ValueError: a weight that is not square (``(..., n, n)``), ``"rodrigues"`` for
            n ≠ 3, an unknown ``method``, and the checks every constraint shares.

    Example:
        >>> layer = mp.rotation(nn.Linear(3, 3, bias=False))
        >>> R = layer.weight
        >>> bool(torch.allclose(R.T @ R, torch.eye(3), atol=1e-6)), float(torch.det(R)) > 0
        (True, True)
        >>> layer.parametrizations.weight.original.numel()   # a rotation vector
        3
    """
    weight = getattr(module, name, None)
    n = weight.shape[-1] if isinstance(weight, Tensor) and weight.dim() >= 2 else None
    if method not in ("auto", "rodrigues", "expm", "cayley"):
        raise ValueError(f"method must be 'auto', 'rodrigues', 'expm' or 'cayley', got {method!r}")
    if method == "rodrigues" or (method == "auto" and n == 3):
        return register(module, name, SO3, atol=atol)
    return register(module, name, Rotation, map="expm" if method == "auto" else method, atol=atol)
