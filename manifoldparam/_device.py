"""Device questions the library asks in several places (one answer each).

* :func:`cuda_capturing`: is the current CUDA stream capturing a graph? A captured graph
  replays its kernels later, so code that reads a value on the host (a sync) cannot run, and
  code that returns a tensor stored earlier would bake it into every replay.
* :func:`value_readable`: can the value of ``t`` be read on the host at all (``float(t)``,
  ``.tolist()``; on an accelerator the read synchronises)? Not for fake or meta tensors (no
  data), nor for a CUDA tensor while a graph is captured.
* :func:`may_read_on_host`: is such a read cheap enough to take by default? On the CPU, and on
  CUDA (one sync) when readable; not on other devices (XLA, MPS, ...), where code that can
  avoid the read should.
* :func:`autocast_off`: a block in which autocast leaves ``t``'s device alone. The maps and
  their hand-written backward passes run in their own precision (``torch.autocast`` would
  otherwise recast products inside them, also in a backward called within an autocast block).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from manifoldparam._torch import FakeTensor

__all__ = ["autocast_off", "cuda_capturing", "may_read_on_host", "value_readable"]


def cuda_capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def value_readable(t: Tensor) -> bool:
    """Whether ``t``'s value can be read on the host: not a fake or meta tensor, and not a CUDA
    tensor during CUDA graph capture."""
    if isinstance(t, FakeTensor) or t.is_meta:
        return False
    return not (t.is_cuda and cuda_capturing())


def may_read_on_host(t: Tensor) -> bool:
    """Whether to read ``t``'s value on the host by default: a CPU tensor, or a CUDA tensor
    outside CUDA graph capture; not a fake or meta tensor, nor one on another device."""
    return (t.is_cpu or t.is_cuda) and value_readable(t)


def autocast_off(t: Tensor) -> contextlib.AbstractContextManager[object]:
    """A block with autocast off for ``t``'s device (a no-op where autocast does not exist,
    such as the meta device)."""
    kind = t.device.type
    if torch.amp.is_autocast_available(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()
