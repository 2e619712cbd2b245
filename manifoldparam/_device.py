"""Two device questions the library asks in several places (one answer each).

* :func:`cuda_capturing`: is the current CUDA stream capturing a graph? A captured graph
  replays its kernels later, so code that reads a value on the host (a sync) cannot run, and
  code that returns a tensor stored earlier would bake it into every replay.
* :func:`may_read_on_host`: may the value of ``t`` be read on the host now (``float(t)``,
  ``.tolist()``)? On the CPU always; on CUDA except during capture; never for fake tensors
  (no data), meta tensors or other devices (XLA, MPS), where such a read is impossible or
  forces a sync the caller did not ask for.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

__all__ = ["cuda_capturing", "may_read_on_host"]


def cuda_capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def may_read_on_host(t: Tensor) -> bool:
    """Whether ``t``'s value may be read on the host: a CPU tensor, or a CUDA tensor outside
    CUDA graph capture; not a fake tensor, a meta tensor or one on another device."""
    if isinstance(t, FakeTensor):
        return False
    if t.is_cpu:
        return True
    return t.is_cuda and not cuda_capturing()
