"""What the benchmark scripts share: a timestamp that waits for the device."""

from __future__ import annotations

import time

import torch


def now(device: torch.device) -> float:
    """``time.perf_counter()`` after the device's queued work has finished (on a GPU, kernels
    run asynchronously: without the synchronisation a timestamp measures only the launches)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
