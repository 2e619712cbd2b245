r"""Elementwise box constraints through tanh.

Math. With ``low < high`` (scalars or tensors broadcastable to the weight), let
:math:`m = (\mathrm{low} + \mathrm{high})/2` and :math:`h = (\mathrm{high} - \mathrm{low})/2`:

.. math::
    W = m + h \tanh(X), \qquad X = \operatorname{atanh}\big((W - m)/h\big)

(followed by a clamp to the box that only removes round-off: ``m ± h`` can land one ulp
outside it).

Coordinates have the weight's shape (the box has full dimension). The set is the closed box:
in floating point ``tanh`` saturates, so ``W`` can equal a bound (``tanh(10.)`` is exactly
1.0 in float32); ``right_inverse`` clips the ``atanh`` argument one ulp inside ``(-1, 1)`` so a
weight on a bound has finite coordinates. Registration clamps the current weight into the box.
geoopt has no box manifold, so :meth:`Bounded.check` is the membership test.

Example::

    >>> layer = manifoldparam.bounded(nn.Linear(3, 2), "bias", low=-0.5, high=0.5)
    >>> bool(((layer.bias >= -0.5) & (layer.bias <= 0.5)).all())
    True
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from manifoldparam.hard.base import (
    Parametrization,
    max_abs,
    register,
)

__all__ = ["Bounded", "bounded"]


def _as_bound(value: float | Tensor, what: str, owner: str) -> Tensor:
    # Python numbers are kept in float64 until registration casts them to the weight's dtype
    # (a float32 -0.05 would be off by 1e-9 on a float64 weight).
    t = value.detach() if isinstance(value, Tensor) else torch.tensor(value, dtype=torch.float64)
    if t.is_complex() or not (t.is_floating_point() or t.dtype in (torch.int64, torch.int32)):
        raise TypeError(f"{owner}: {what} must be a real number or tensor, got {t.dtype}")
    t = t if t.is_floating_point() else t.double()
    if not bool(torch.isfinite(t).all()):
        raise ValueError(
            f"{owner}: {what} must be finite, got {value}; for a one-sided bound use "
            "manifoldparam.nonnegative (on the weight minus the bound) or a soft constraint."
        )
    return t.clone()


class Bounded(Parametrization):
    """Parametrization onto the box ``low <= W <= high`` (see the module docstring).

    Args:
        shape: shape of the weight.
        low, high: finite bounds, scalars or tensors broadcastable to ``shape``, ``low < high``.
        atol: how far outside the box an assigned value may be; default 0.
    """

    set_name = "inside its bounds"

    def __init__(
        self,
        shape: Sequence[int],
        *,
        low: float | Tensor,
        high: float | Tensor,
        atol: float | None = None,
        owner: str | None = None,
    ) -> None:
        super().__init__(shape, atol=atol, owner=owner)
        lo, hi = _as_bound(low, "low", self.owner), _as_bound(high, "high", self.owner)
        # A number and a CUDA tensor (low=0.0, high=t): both on the tensor's device.
        device = next((t.device for t in (lo, hi) if t.device.type != "cpu"), lo.device)
        lo, hi = lo.to(device), hi.to(device)
        try:
            torch.broadcast_shapes(lo.shape, hi.shape, self.shape)
            lo, hi = torch.broadcast_tensors(lo, hi)
        except RuntimeError:
            raise ValueError(
                f"{self.owner}: low {tuple(lo.shape)} and high {tuple(hi.shape)} must broadcast "
                f"to the weight's shape {tuple(self.shape)}"
            ) from None
        if torch.broadcast_shapes(lo.shape, self.shape) != self.shape:
            raise ValueError(
                f"{self.owner}: bounds of shape {tuple(lo.shape)} would broadcast the weight "
                f"{tuple(self.shape)} to a larger shape; give bounds of the weight's shape"
            )
        bad = ~(lo < hi)
        if bool(bad.any()):
            raise ValueError(
                f"{self.owner}: low must be < high everywhere; {int(bad.sum())} of "
                f"{bad.numel()} entries have low >= high (e.g. low={float(lo[bad][0])}, "
                f"high={float(hi[bad][0])})"
            )
        self.register_buffer("low", lo.contiguous())
        self.register_buffer("high", hi.contiguous())

    @property
    def dim(self) -> int:
        return self.shape.numel()

    def check_state(self, state: MutableMapping[str, Any], prefix: str) -> None:
        """The checkpoint's ``<prefix>low`` / ``<prefix>high`` must equal the declared bounds
        (in the coarser of the two dtypes: a float32 checkpoint of a float64 model holds the
        same bounds rounded); the code declares the constraint, a checkpoint does not change
        it. Accepted entries are replaced by the declared bounds, which so stay exact (also
        under ``load_state_dict(assign=True)``). Bounds this module cannot read (built on the
        meta device, to be filled by ``assign=True``) are taken from the checkpoint."""
        for name in ("low", "high"):
            key = prefix + name
            declared: Tensor = getattr(self, name)
            loaded = self._loaded(state, key, declared, "bound")
            if loaded is None or declared.is_meta:
                continue
            loaded = loaded.detach().to(declared.device)
            coarse = max(loaded.dtype, declared.dtype, key=lambda t: torch.finfo(t).eps)
            differ = loaded.to(coarse) != declared.to(coarse)
            if bool(differ.any()):
                i = int(differ.flatten().nonzero()[0])
                attr = self.owner.rsplit(".", 1)[-1]
                raise RuntimeError(
                    f"{self.owner}: the checkpoint's {key!r} would replace the bound the code "
                    f"declares: {name} is {float(declared.flatten()[i])!r} here, "
                    f"{float(loaded.flatten()[i])!r} in the checkpoint ({int(differ.sum())} of "
                    f"{differ.numel()} entries differ, the first at flat index {i}). To train "
                    "with the checkpoint's bounds, declare them: manifoldparam.bounded(module, "
                    f"{attr!r}, low=..., high=...) with its values; to keep the declared ones, "
                    "set the checkpoint's entry to them before loading."
                )
            state[key] = declared.detach().clone()

    def _map(self, x: Tensor) -> Tensor:
        mid, half = 0.5 * (self.low + self.high), 0.5 * (self.high - self.low)
        # the clamp only removes round-off: mid ± half can land one ulp outside the box
        return torch.clamp(mid + half * torch.tanh(x), min=self.low, max=self.high)

    def _inverse(self, w: Tensor) -> Tensor:
        mid, half = 0.5 * (self.low + self.high), 0.5 * (self.high - self.low)
        one = 1.0 - torch.finfo(w.dtype).eps
        return torch.atanh(((w - mid) / half).clamp(-one, one)).expand(self.shape).contiguous()

    def project(self, w: Tensor) -> Tensor:
        return torch.clamp(w, min=self.low, max=self.high)

    def distance(self, w: Tensor) -> Tensor:
        return max_abs(torch.relu(self.low - w) + torch.relu(w - self.high))

    def _explain(self, w: Tensor, d: float, tol: float) -> str:
        outside = int(((w < self.low - tol) | (w > self.high + tol)).sum())
        return f"{outside} entries lie outside [low, high], up to {d:.3e} beyond a bound"


def bounded(
    module: nn.Module,
    name: str = "weight",
    *,
    low: float | Tensor,
    high: float | Tensor,
    atol: float | None = None,
) -> nn.Module:
    """Constrain ``module.<name>`` elementwise to ``[low, high]`` through tanh. The current
    weight is kept, clamped into the box. Returns ``module``::

        manifoldparam.bounded(physics, "damping", low=0.0, high=2.0)
    """
    return register(module, name, Bounded, low=low, high=high, atol=atol)
