"""Value helpers of the hard constraints: the precision policy's dtypes, a cheap finiteness
test, a sync-free maximum."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from manifoldparam._device import value_readable
from manifoldparam._torch import dispatch_depth, is_functorch_wrapped, is_tracing

__all__ = ["LOW_PRECISION", "compute_dtype", "max_abs"]

#: Dtypes the maps are not computed in (no SVD, eigh, LU or Cholesky kernels; too few bits for
#: the exponential): computed in float32, rounded back.
LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a map is computed in for a tensor of ``dtype``: float32 for half precision."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def _eager_readable(t: object) -> bool:
    """Whether a finiteness check of ``t`` costs nothing extra: a real CPU tensor (the read is
    free there), in eager mode (not traced, compiled, under a torch.func transform or a dispatch
    mode such as fake tensors)."""
    return (
        isinstance(t, Tensor)
        and t.is_cpu
        and not torch.compiler.is_compiling()
        and not is_tracing()
        and dispatch_depth() == 0
        and not is_functorch_wrapped(t)
        and value_readable(t)
    )


def _all_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite. A sum is finite if every entry is, unless it
    overflows: one reduction and one read (20-40x cheaper than ``isfinite(t).all()``: 3 µs at
    190x190 on one CPU thread), with the exact test only when the sum is not finite."""
    t = torch.view_as_real(t) if t.is_complex() else t  # (real and imaginary parts)
    if math.isfinite(float(t.detach().sum(dtype=compute_dtype(t.dtype)))):
        return True
    return bool(torch.isfinite(t).all())


def max_abs(t: Tensor) -> Tensor:
    """``max|t|`` as a 0-dim tensor (0 for an empty tensor), without a host sync."""
    return t.abs().amax() if t.numel() else t.new_zeros(())
