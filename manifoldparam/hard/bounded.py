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
    LOW_PRECISION,
    Parametrization,
    max_abs,
)
from manifoldparam.hard.registration import register

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


def _wider(dtype: torch.dtype) -> str:
    if dtype in LOW_PRECISION:
        return "keep this weight in float32 and train under torch.autocast"
    return "use a float64 weight"


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

    def _center(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(low, high, mid, half)`` in ``dtype`` (the compute dtype: half-precision bounds are
        widened first). Halved before they are combined: ``high - low`` overflows for bounds
        beyond ``max/2`` (``±4e4`` in float16)."""
        lo, hi = self.low.to(dtype), self.high.to(dtype)
        return lo, hi, 0.5 * lo + 0.5 * hi, 0.5 * hi - 0.5 * lo

    def map(self, x: Tensor) -> Tensor:
        lo, hi, mid, half = self._center(x.dtype)
        # the clamp only removes round-off: mid ± half can land one ulp outside the box
        return torch.clamp(mid + half * torch.tanh(x), min=lo, max=hi)

    def inverse(self, w: Tensor) -> Tensor:
        _, _, mid, half = self._center(w.dtype)
        one = 1.0 - torch.finfo(w.dtype).eps
        return torch.atanh(((w - mid) / half).clamp(-one, one)).expand(self.shape).contiguous()

    def validate(self, weight: Tensor) -> None:
        """The bounds must stay finite and ordered in the weight's dtype, which registration
        rounds them to: ``low=0.999, high=1.0`` are both 1.0 in bfloat16, ``1 + 1e-8`` is 1.0
        in float32 and ``1e5`` is Inf in float16."""
        super().validate(weight)
        dtype = weight.dtype
        lo, hi = self.low.to(dtype), self.high.to(dtype)
        if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise ValueError(
                f"{self.owner}: the bounds overflow {dtype} (largest finite "
                f"{torch.finfo(dtype).max:.6g}); give bounds within range, or {_wider(dtype)}."
            )
        bad = ~(lo < hi)
        if bool(bad.any()):
            i = int(bad.flatten().nonzero()[0])
            raise ValueError(
                f"{self.owner}: in {dtype}, low and high collapse: {int(bad.sum())} of "
                f"{bad.numel()} entries round to low >= high (e.g. "
                f"low={float(self.low.flatten()[i])} and high={float(self.high.flatten()[i])} "
                "both become "
                f"{float(lo.flatten()[i])}); widen the box, or {_wider(dtype)}."
            )

    def project(self, w: Tensor) -> Tensor:
        lo, hi = self.low.to(w.dtype), self.high.to(w.dtype)
        return torch.clamp(w, min=lo, max=hi)

    def distance(self, w: Tensor) -> Tensor:
        lo, hi = self.low.to(w.dtype), self.high.to(w.dtype)
        return max_abs(torch.relu(lo - w) + torch.relu(w - hi))

    def membership_failure(self, w: Tensor) -> str | None:
        # Bounds that collapsed after registration (``module.half()``): a point, not a box.
        if bool((self.low >= self.high).any()):
            return (
                f"low >= high in {self.low.dtype} (the bounds collapsed in a conversion of "
                "the module); keep this weight in float32"
            )
        return None

    def explain(self, w: Tensor, d: float, tol: float) -> str:
        lo, hi = self.low.to(w.dtype), self.high.to(w.dtype)
        outside = int(((w < lo - tol) | (w > hi + tol)).sum())
        return f"{outside} entries lie outside [low, high], up to {d:.3e} beyond a bound"


def bounded(
    module: nn.Module,
    name: str = "weight",
    *,
    low: float | Tensor,
    high: float | Tensor,
    atol: float | None = None,
) -> nn.Module:
    r"""Constrain ``module.<name>`` elementwise to the box ``[low, high]``, through tanh.

    With :math:`m = (\mathrm{low} + \mathrm{high})/2` and
    :math:`h = (\mathrm{high} - \mathrm{low})/2`, the weight is :math:`W = m + h \tanh(X)`
    for unconstrained coordinates :math:`X` of the weight's shape. The current weight is kept,
    clamped into the box.

    Args:
        module: the module that holds the attribute.
        name: the attribute to constrain (a parameter or buffer of ``module``).
        low: the lower bound, a finite number or a tensor broadcastable to the weight.
        high: the upper bound, likewise, with ``low < high`` everywhere (also after rounding
            to the weight's dtype).
        atol: how far outside the box an assigned value may be; default 0.

    Returns:
        ``module``, whose ``module.<name>`` now lies in the box.

    Raises:
        ValueError: ``low >= high`` somewhere (or after rounding), infinite bounds, bounds
            that do not broadcast to the weight, a NaN/Inf or empty weight, an attribute
            already parametrized.
        TypeError: a non-floating weight or non-real bounds.
        AttributeError: ``module`` has no attribute ``name``.

    Example:
        >>> layer = mp.bounded(nn.Linear(3, 2), "bias", low=-0.5, high=0.5)
        >>> bool(((layer.bias >= -0.5) & (layer.bias <= 0.5)).all())
        True
        >>> layer.parametrizations.bias.original.shape   # X: one coordinate per entry
        torch.Size([2])
    """
    return register(module, name, Bounded, low=low, high=high, atol=atol)
