r"""The sphere: the whole tensor of a given norm, or each row/column on its own (oblique).

Math. Each constrained vector :math:`w \in \mathbb{R}^n` (the flattened tensor, or each slice
along ``dim``) lies on the sphere :math:`\{w : \|w\| = r\}` of dimension :math:`n-1`. The
map is the exponential of the sphere at a base point :math:`p` (a unit vector, a buffer):

.. math::
    v = H \begin{pmatrix} x \\ 0 \end{pmatrix}, \qquad
    w = r\big(\cos\|v\|\, p + \operatorname{sinc}\|v\|\, v\big),

with :math:`H` the Householder reflection that maps :math:`e_n` to :math:`\pm p`, so its
first :math:`n-1` columns are an orthonormal basis of the tangent space :math:`p^\perp` and
:math:`x \in \mathbb{R}^{n-1}` are minimal coordinates (no norm direction to drift along).
It reaches the whole sphere (:math:`\|v\| = \pi` is :math:`-p`), costs :math:`O(n)` per
vector, and stays on the sphere to round-off for any :math:`x` (cosine and sine are bounded).
Its Jacobian has full rank for :math:`\|v\| < \pi`; :func:`~manifoldparam.rebase` moves the
base to the current value (dynamic trivialization) like the orthogonal map's.

Registration keeps the weight, normalised (a zero vector becomes :math:`r e_1`). With
``dim`` the set is the *oblique manifold* (unit-norm rows for ``dim=-1``, as used for
normalised embeddings and cosine classifiers). geoopt's set: ``Sphere`` (each vector over the
last dim, radius 1).

Example::

    >>> emb = manifoldparam.sphere(nn.Embedding(10, 4), dim=-1)
    >>> torch.allclose(emb.weight.norm(dim=-1), torch.ones(10))
    True
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from manifoldparam.hard.base import LOW_PRECISION, Parametrization, max_abs
from manifoldparam.hard.registration import register

__all__ = ["Sphere", "sphere"]


class Sphere(Parametrization):
    """Parametrization onto the sphere, or onto unit rows/columns (see the module docstring).

    Args:
        shape: shape of the weight.
        radius: the norm :math:`r > 0` of each constrained vector.
        dim: ``None`` (default): the whole tensor is one vector; an int: each slice along
            ``dim`` is a vector on its own (``dim=-1``: the rows of a ``Linear`` weight or the
            vectors of an ``Embedding``).
        atol: tolerance of the membership check on ``max|‖w‖ - r| / r``; default
            ``4·√n·eps(dtype)``.
    """

    set_name = "on the sphere"
    has_base_point = True

    def __init__(
        self,
        shape: Sequence[int],
        *,
        radius: float = 1.0,
        dim: int | None = None,
        atol: float | None = None,
        owner: str | None = None,
    ) -> None:
        super().__init__(shape, atol=atol, owner=owner)
        attr = self.owner.rsplit(".", 1)[-1]
        if isinstance(radius, bool) or not isinstance(radius, int | float):
            raise TypeError(f"{self.owner}: radius must be a number, got {type(radius).__name__}")
        if not (math.isfinite(radius) and radius > 0):
            raise ValueError(
                f"{self.owner}: radius must be finite and > 0, got {radius}; pass e.g. "
                f"manifoldparam.sphere(module, {attr!r}, radius=1.0)."
            )
        if dim is not None:
            if isinstance(dim, bool) or not isinstance(dim, int):
                raise TypeError(f"{self.owner}: dim must be None or an int, got {dim!r}")
            if not -len(self.shape) <= dim < len(self.shape):
                raise ValueError(
                    f"{self.owner}: dim={dim} is out of range for a weight of shape "
                    f"{tuple(self.shape)}; pass dim=None (the whole tensor) or one of "
                    f"{-len(self.shape)}..{len(self.shape) - 1}."
                )
            dim = dim % len(self.shape)
        self.radius = float(radius)
        self.vector_dim = dim
        self.n = self.shape.numel() if dim is None else self.shape[dim]
        self.count = 1 if dim is None else self.shape.numel() // max(self.n, 1)
        if self.n < 2:
            where = "the weight has one entry" if dim is None else f"its dim {dim} has size 1"
            raise ValueError(
                f"{self.owner}: a sphere needs vectors of at least 2 entries ({where}, shape "
                f"{tuple(self.shape)}): its only points are ±radius. Constrain another dim "
                "(dim=...) or the whole tensor (dim=None)."
            )
        base = torch.zeros(self.count, self.n)
        base[:, 0] = 1.0
        self.register_buffer("base", base)

    @property
    def dim(self) -> int:
        """Dimension of the set: ``n - 1`` per vector."""
        return self.count * (self.n - 1)

    @property
    def manifold(self) -> object | None:
        """``geoopt.Sphere()`` where its layout is this one (radius 1, vectors over the last
        dim of the tensor); ``None`` otherwise (geoopt's sphere has no radius, and checks the
        last dim)."""
        import geoopt

        last = self.vector_dim == len(self.shape) - 1 or len(self.shape) == 1
        return geoopt.Sphere() if self.radius == 1.0 and last else None

    def default_atol(self, dtype: torch.dtype) -> float:
        if dtype in LOW_PRECISION:  # rounding each entry moves the norm by <= eps/2 relative
            return 4.0 * torch.finfo(dtype).eps + self.default_atol(torch.float32)
        return 4.0 * math.sqrt(self.n) * torch.finfo(dtype).eps

    # ------------------------------------------------------------ shape plumbing
    def _rows(self, w: Tensor) -> Tensor:
        """The weight as ``(count, n)`` vectors."""
        if self.vector_dim is None:
            return w.reshape(1, self.n)
        return w.movedim(self.vector_dim, -1).reshape(self.count, self.n)

    def _unrows(self, t: Tensor) -> Tensor:
        if self.vector_dim is None:
            return t.reshape(self.shape)
        moved = [s for i, s in enumerate(self.shape) if i != self.vector_dim] + [self.n]
        return t.reshape(moved).movedim(-1, self.vector_dim)

    # ------------------------------------------------------------ the map
    def map(self, x: Tensor) -> Tensor:
        # The base normalised here (no gradient, O(n)): a base rounded to half precision or
        # loaded from a checkpoint still gives a point of the sphere.
        b = self.base.to(x.dtype)
        p = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True)
        # Householder h = p + sign(p_n) e_n (no cancellation: ‖h‖² = 2(1 + |p_n|) >= 2).
        sign = torch.where(p[:, -1:] >= 0, 1.0, -1.0).to(x.dtype)
        h = torch.cat([p[:, :-1], p[:, -1:] + sign], dim=-1)
        hh = 2.0 / (h * h).sum(-1, keepdim=True)
        coef = (h[:, :-1] * x).sum(-1, keepdim=True) * hh
        v = torch.cat([x, torch.zeros_like(x[:, :1])], dim=-1) - coef * h
        r = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
        # sin(r)/r with sin and cos of the same argument (torch.sinc(r/π) rounds r/π·π, which
        # far from the base moves the norm by |r|·eps); its series below eps^¼ (error r⁴/120).
        small = r < torch.finfo(x.dtype).eps ** 0.25
        sinc = torch.where(small, 1.0 - r * r / 6.0, torch.sin(r) / torch.where(small, 1.0, r))
        w = torch.cos(r) * p + sinc * v
        return self._unrows(self.radius * w)

    def inverse(self, w: Tensor) -> Tensor:
        rows = self._rows(w)
        unit = rows / torch.linalg.vector_norm(rows, dim=-1, keepdim=True)
        self.base = unit.detach().to(self.base.dtype).contiguous()
        return w.new_zeros(self.count, self.n - 1)

    def project(self, w: Tensor) -> Tensor:
        """Each vector scaled to norm ``radius``; a zero vector becomes ``radius·e₁``."""
        rows = self._rows(w)
        norm = torch.linalg.vector_norm(rows, dim=-1, keepdim=True)
        e1 = torch.zeros_like(rows)
        e1[:, 0] = 1.0
        unit = torch.where(norm > 0, rows / norm.clamp_min(torch.finfo(w.dtype).tiny), e1)
        return self._unrows(self.radius * unit)

    def distance(self, w: Tensor) -> Tensor:
        """``max |‖w‖ - r| / r`` over the vectors."""
        norm = torch.linalg.vector_norm(self._rows(w), dim=-1)
        return max_abs(norm / self.radius - 1.0)

    def explain(self, w: Tensor, d: float, tol: float) -> str:
        norm = torch.linalg.vector_norm(self._rows(w), dim=-1)
        off = int(((norm / self.radius - 1.0).abs() > tol).sum())
        what = "the tensor's norm" if self.vector_dim is None else f"{off} of {self.count} norms"
        return (
            f"{what} differ from radius {self.radius} by up to {d:.3e} (relative) > "
            f"tolerance {tol:.3e} ({w.dtype})"
        )

    def check_state(self, state: MutableMapping[str, Any], prefix: str) -> None:
        """The checkpoint's base point ``<prefix>base``: of this shape, finite, no zero row
        (the map normalises it, so any nonzero base gives points of the sphere)."""
        key = prefix + "base"
        b = self._loaded(state, key, self.base, "base point")
        if b is None:
            return
        if bool((torch.linalg.vector_norm(b.double(), dim=-1) == 0).any()):
            raise RuntimeError(
                f"{self.owner}: the checkpoint's base point {key!r} has a zero row; it was not "
                "saved from this constraint. Load the checkpoint it belongs to."
            )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, radius={self.radius}, dim={self.vector_dim}"


def sphere(
    module: nn.Module,
    name: str = "weight",
    *,
    radius: float = 1.0,
    dim: int | None = None,
    atol: float | None = None,
) -> nn.Module:
    r"""Constrain ``module.<name>`` to the sphere :math:`\|W\| = r`, or each slice along
    ``dim`` to it (the oblique manifold: unit-norm rows for ``dim=-1``).

    Each vector is :math:`r(\cos\|v\|\,p + \operatorname{sinc}\|v\|\,v)`, the sphere's
    exponential at a base point :math:`p` of a tangent vector :math:`v` written in an
    orthonormal basis of :math:`p^\perp`: :math:`n-1` coordinates per vector of :math:`n`
    entries. The current weight is kept, normalised.

    Args:
        module: the module that holds the attribute.
        name: the attribute to constrain.
        radius: the norm :math:`r > 0` of the tensor (or of each vector).
        dim: ``None``: the whole tensor is one vector; an int: each slice along ``dim``.
        atol: how far (relative) from norm ``r`` an assigned value may be; ``None`` derives
            it from the dtype and size.

    Returns:
        ``module``, whose ``module.<name>`` now has norm ``radius`` (per vector with ``dim``).

    Raises:
        ValueError: ``radius <= 0`` or not finite, ``dim`` out of range, vectors of one entry,
            a NaN/Inf or empty weight, an attribute already parametrized.
        TypeError: a non-floating weight, a non-numeric radius or non-int dim.
        AttributeError: ``module`` has no attribute ``name``.

    Example:
        >>> cls = mp.sphere(nn.Linear(16, 10, bias=False), dim=-1)   # cosine classifier
        >>> torch.allclose(cls.weight.norm(dim=1), torch.ones(10))
        True
        >>> cls.parametrizations.weight.original.numel()   # 10 rows x (16 - 1)
        150
        >>> ball = mp.sphere(nn.Linear(3, 2), "bias", radius=2.0)
        >>> round(float(ball.bias.detach().norm()), 5)
        2.0
    """
    return register(module, name, Sphere, radius=radius, dim=dim, atol=atol)
