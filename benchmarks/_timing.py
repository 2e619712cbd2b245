"""What the benchmark scripts share: a timestamp that waits for the device, and medians of
interleaved rounds."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def now(device: torch.device) -> float:
    """``time.perf_counter()`` after the device's queued work has finished (on a GPU, kernels
    run asynchronously: without the synchronisation a timestamp measures only the launches)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def interleaved(
    fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 3
) -> dict[str, float]:
    """Median seconds of each function over ``rounds`` rounds that call every function once in
    turn (a drift of the machine's speed hits all of them alike), after ``warmup`` calls each."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}
