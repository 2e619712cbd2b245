r"""Elementwise nonnegativity (the closed orthant) through a positive map.

Math. ``W = g(X)`` elementwise with

* ``"softplus"`` (default): :math:`g(x) = \log(1 + e^x)`, :math:`g^{-1}(y) = y + \log(1 - e^{-y})`;
  gradients never vanish for moderate :math:`x` and it grows linearly, like the weights it
  replaces;
* ``"exp"``: :math:`g(x) = e^x`, :math:`g^{-1}(y) = \log y` (multiplicative updates);
* ``"square"``: :math:`g(x) = x^2`, :math:`g^{-1}(y) = \sqrt{y}` (reaches 0 exactly, but the
  gradient vanishes there).

Coordinates have the weight's shape. ``softplus`` and ``exp`` never return a negative number
(they underflow to 0 at worst); a zero weight entry is mapped to the smallest normal number's
pre-image so its coordinates stay finite. Registration clamps the current weight at 0.

Example::

    >>> layer = manifoldparam.nonnegative(nn.Linear(4, 3))
    >>> bool((layer.weight >= 0).all())
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from manifoldparam.hard.base import (
    Parametrization,
    max_abs,
)
from manifoldparam.hard.registration import register
from manifoldparam.hard.spd import softplus_inverse

__all__ = ["Nonnegative", "nonnegative"]

PositiveMap = Literal["softplus", "exp", "square"]
_MAPS = ("softplus", "exp", "square")


class Nonnegative(Parametrization):
    """Parametrization onto ``W >= 0`` (see the module docstring).

    Args:
        shape: shape of the weight.
        map: ``"softplus"`` (default), ``"exp"`` or ``"square"``.
        atol: how negative an assigned entry may be; default 0.
    """

    set_name = "nonnegative"

    def __init__(
        self,
        shape: Sequence[int],
        *,
        map: PositiveMap = "softplus",
        atol: float | None = None,
        owner: str | None = None,
    ) -> None:
        super().__init__(shape, atol=atol, owner=owner)
        if map not in _MAPS:
            raise ValueError(f"{self.owner}: map must be one of {_MAPS}, got {map!r}")
        self.method = map

    @property
    def dim(self) -> int:
        return self.shape.numel()

    def map(self, x: Tensor) -> Tensor:
        if self.method == "softplus":
            return F.softplus(x)
        if self.method == "exp":
            return torch.exp(x)
        return x * x

    def inverse(self, w: Tensor) -> Tensor:
        w = w.clamp_min(0.0)
        if self.method == "softplus":
            return softplus_inverse(w)
        if self.method == "exp":
            return torch.log(w.clamp_min(torch.finfo(w.dtype).tiny))
        return torch.sqrt(w)

    def project(self, w: Tensor) -> Tensor:
        return w.clamp_min(0.0)

    def distance(self, w: Tensor) -> Tensor:
        return max_abs(torch.relu(-w))

    def explain(self, w: Tensor, d: float, tol: float) -> str:
        return f"{int((w < -tol).sum())} entries are negative, the lowest {-d:.3e}"

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, map={self.method}"


def nonnegative(
    module: nn.Module,
    name: str = "weight",
    *,
    map: PositiveMap = "softplus",
    atol: float | None = None,
) -> nn.Module:
    r"""Constrain ``module.<name>`` to be elementwise nonnegative, :math:`W = g(X) \ge 0`.

    :math:`g` is :math:`\log(1 + e^x)` (``"softplus"``, the default), :math:`e^x` (``"exp"``,
    multiplicative updates) or :math:`x^2` (``"square"``, reaches 0 exactly but its gradient
    vanishes there), applied to coordinates :math:`X` of the weight's shape. The current
    weight is kept, clamped at 0.

    Args:
        module: the module that holds the attribute.
        name: the attribute to constrain.
        map: ``"softplus"``, ``"exp"`` or ``"square"``.
        atol: how negative an assigned entry may be; default 0.

    Returns:
        ``module``, whose ``module.<name>`` is now nonnegative.

    Raises:
        ValueError: an unknown ``map``, a NaN/Inf or empty weight, an attribute already
            parametrized.
        TypeError: a non-floating weight.
        AttributeError: ``module`` has no attribute ``name``.

    Example:
        >>> nmf = mp.nonnegative(nn.Linear(64, 10, bias=False))
        >>> bool((nmf.weight >= 0).all())
        True
        >>> nmf.weight = torch.rand(10, 64)          # a nonnegative value: accepted
        >>> nmf.parametrizations.weight[0].method
        'softplus'
    """
    return register(module, name, Nonnegative, map=map, atol=atol)
