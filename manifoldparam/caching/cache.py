"""Evaluation of a hard constraint's map, with caching (filled in by the caching work)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from manifoldparam.hard.base import Parametrization

__all__ = ["evaluate"]


def evaluate(p: Parametrization, x: Tensor) -> Tensor:
    """``p._map(x)``: the single entry point through which every constrained value is made."""
    return p._map(x)
