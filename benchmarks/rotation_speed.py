"""Benchmark: rotations, Grassmannian frames and unitary weights, ours vs the peers that have
the set: forward+backward of the constrained weight, side by side in one run.

Run (CPU, 2 threads, about a minute; under ``flock /tmp/cpu.lock`` on a shared machine)::

    python benchmarks/rotation_speed.py
    python benchmarks/rotation_speed.py --rounds 30

What is timed, per task (float32 / complex64): reading the constrained weight with autograd
on and ``(W * G).sum().backward()`` for a fixed random ``G`` (one training step's work on the
weight). Rounds are interleaved across methods; the table reports medians and the ratio to
manifoldparam's time (> 1: slower than ours).

* SO(3) batch, ``(N, 3, 3)``: ``mp.rotation`` (Rodrigues, 3 coordinates per matrix);
  ``mp.rotation(method="expm")`` (the SO(n) path); ``torch.nn.utils.parametrizations
  .orthogonal`` (``matrix_exp``; O(3) coordinates, the determinant's sign kept from the
  initial weight); ``geotorch.orthogonal``; roma's ``rotvec_to_rotmat`` on an ``(N, 3)``
  tensor (a bare function, no parametrization).
* Grassmannian ``Gr(n, k)``: ``mp.grassmannian`` vs ``geotorch.grassmannian`` on an n×k weight.
* Unitary ``n×n`` complex64: ``mp.unitary`` vs torch's orthogonal (``matrix_exp``; torch's is
  unitary for complex weights). geotorch and geoopt have no complex sets.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

warnings.filterwarnings("ignore")
torch.set_num_threads(2)

import manifoldparam as mp  # noqa: E402


def holder(*shape: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    m = nn.Module()
    m.weight = nn.Parameter(torch.randn(*shape, dtype=dtype))
    return m


def step_fn(m: nn.Module, grad: torch.Tensor) -> Callable[[], None]:
    params = list(m.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        w = m.weight
        (w * grad).real.sum().backward()

    return step


def roma_step(n: int, grad: torch.Tensor) -> Callable[[], None] | None:
    try:
        import roma
    except ImportError:
        return None
    omega = nn.Parameter(torch.randn(n, 3))

    def step() -> None:
        omega.grad = None
        (roma.rotvec_to_rotmat(omega) * grad).sum().backward()

    return step


def tasks(n_so3: int, grass: list[tuple[int, int]], unitary_n: int) -> dict:
    import geotorch
    from torch.nn.utils.parametrizations import orthogonal as torch_orthogonal

    out: dict[str, dict[str, Callable[[], None]]] = {}
    g = torch.randn(n_so3, 3, 3)
    so3 = {
        "manifoldparam rotation (Rodrigues)": step_fn(mp.rotation(holder(n_so3, 3, 3)), g),
        "manifoldparam rotation (expm)": step_fn(
            mp.rotation(holder(n_so3, 3, 3), method="expm"), g
        ),
        "torch orthogonal (matrix_exp)": step_fn(torch_orthogonal(holder(n_so3, 3, 3)), g),
        "geotorch orthogonal": step_fn(geotorch.orthogonal(holder(n_so3, 3, 3), "weight"), g),
    }
    r = roma_step(n_so3, g)
    if r is not None:
        so3["roma rotvec_to_rotmat (bare)"] = r
    out[f"SO(3), N = {n_so3} matrices"] = so3
    for n, k in grass:
        g = torch.randn(n, k)
        out[f"Gr({n}, {k})"] = {
            "manifoldparam grassmannian": step_fn(mp.grassmannian(holder(n, k)), g),
            "geotorch grassmannian": step_fn(geotorch.grassmannian(holder(n, k), "weight"), g),
        }
    n = unitary_n
    g = torch.randn(n, n, dtype=torch.complex64)
    c64 = torch.complex64
    out[f"U({n}) complex64"] = {
        "manifoldparam unitary": step_fn(mp.unitary(holder(n, n, dtype=c64)), g),
        "torch orthogonal (matrix_exp)": step_fn(torch_orthogonal(holder(n, n, dtype=c64)), g),
    }
    return out


def measure(fns: dict[str, Callable[[], None]], rounds: int, repeat: int) -> dict[str, float]:
    for f in fns.values():  # warm-up
        for _ in range(3):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, f in fns.items():  # interleaved
            t0 = time.perf_counter()
            for _ in range(repeat):
                f()
            times[name].append((time.perf_counter() - t0) / repeat)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--so3", type=int, default=4096)
    ap.add_argument("--unitary", type=int, default=64)
    args = ap.parse_args()
    load = os.getloadavg()[0]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load:.2f}"
        f" at start, {args.rounds} interleaved rounds, medians; fwd+bwd of the weight\n"
    )
    print("| task | method | fwd+bwd (µs) | vs manifoldparam |")
    print("|---|---|---:|---:|")
    for task, fns in tasks(args.so3, [(64, 8), (256, 16)], args.unitary).items():
        res = measure(fns, args.rounds, repeat=5)
        ours = next(v for k, v in res.items() if k.startswith("manifoldparam"))
        for name, t in res.items():
            print(f"| {task} | {name} | {t * 1e6:,.0f} | {t / ours:.2f}x |")


if __name__ == "__main__":
    main()
