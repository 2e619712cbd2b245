"""Benchmark: fwd+bwd of the sets geotorch also has, manifoldparam vs geotorch side by side.

Run (CPU, 2 threads; about a minute with the defaults)::

    python benchmarks/sets_speed.py               # n = 64, 256
    python benchmarks/sets_speed.py --sizes 128   # one size
    python benchmarks/sets_speed.py --json out.json

What is timed, per set and size n (float32, an ``nn.Linear(n, n)`` weight registered by each
library from the same initial weight): one "fwd+bwd" reads the weight with autograd recording
and runs ``(W * G).sum().backward()`` for a fixed random G (what a training step adds to the
layer's own cost). The methods' rounds are interleaved in one process (each round times
``--reps`` calls of every method, in a rotated order), and the table reports the median over
rounds of the per-call time and of the per-round ratio manifoldparam / geotorch.

The sets (rank r = n/8 for the rank-constrained ones):

* sphere rows: ``mp.sphere(layer, dim=-1)`` vs ``geotorch.sphere(layer, "weight")`` (both:
  each row on the unit sphere);
* symmetric, skew: ``mp.symmetric`` / ``mp.skew`` vs ``geotorch.symmetric`` / ``geotorch.skew``;
* PSD: ``mp.psd`` vs ``geotorch.positive_semidefinite``;
* PSD rank <= r: ``mp.psd(rank=r)`` vs ``geotorch.positive_semidefinite_low_rank``;
* low rank, fixed rank: ``mp.low_rank`` / ``mp.fixed_rank`` vs ``geotorch.low_rank`` /
  ``geotorch.fixed_rank``.

Both libraries' coordinates start at the registered weight (ours: the base point, coordinates
0; geotorch: its own initialisation from the weight), then move by one fixed random step so
that neither map is evaluated at its identity.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

warnings.filterwarnings("ignore")
torch.set_num_threads(2)
sys.path.insert(0, __file__.rsplit("/", 2)[0])  # the repository root, for `manifoldparam`

import geotorch  # noqa: E402

import manifoldparam as mp  # noqa: E402


def sets(n: int) -> dict[str, tuple[Callable[[nn.Module], object], Callable[[nn.Module], object]]]:
    r = max(1, n // 8)
    return {
        "sphere (rows)": (lambda m: mp.sphere(m, dim=-1), lambda m: geotorch.sphere(m, "weight")),
        "symmetric": (mp.symmetric, lambda m: geotorch.symmetric(m, "weight")),
        "skew": (mp.skew, lambda m: geotorch.skew(m, "weight")),
        "PSD": (mp.psd, lambda m: geotorch.positive_semidefinite(m, "weight")),
        f"PSD rank <= {r}": (
            lambda m: mp.psd(m, rank=r),
            lambda m: geotorch.positive_semidefinite_low_rank(m, "weight", r),
        ),
        f"low rank <= {r}": (
            lambda m: mp.low_rank(m, rank=r),
            lambda m: geotorch.low_rank(m, "weight", r),
        ),
        f"fixed rank {r}": (
            lambda m: mp.fixed_rank(m, rank=r),
            lambda m: geotorch.fixed_rank(m, "weight", r),
        ),
    }


def build(constrain: Callable[[nn.Module], object], w0: torch.Tensor, seed: int) -> nn.Module:
    layer = nn.Linear(w0.shape[1], w0.shape[0])
    with torch.no_grad():
        layer.weight.copy_(w0)
    constrain(layer)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return layer


def step(layer: nn.Module, grad: torch.Tensor) -> None:
    layer.zero_grad(set_to_none=True)
    (layer.weight * grad).sum().backward()


def measure(n: int, rounds: int, reps: int) -> list[dict[str, object]]:
    rows = []
    for name, (ours, theirs) in sets(n).items():
        g = torch.Generator().manual_seed(n)
        w0 = torch.randn(n, n, generator=g) / n**0.5
        grad = torch.randn(n, n, generator=g)
        layers = {"manifoldparam": build(ours, w0, 1), "geotorch": build(theirs, w0, 1)}
        for layer in layers.values():  # warm-up
            for _ in range(2):
                step(layer, grad)
        times: dict[str, list[float]] = {k: [] for k in layers}
        ratios = []
        for i in range(rounds):
            order = list(layers) if i % 2 == 0 else list(reversed(layers))
            per: dict[str, float] = {}
            for key in order:
                t0 = time.perf_counter()
                for _ in range(reps):
                    step(layers[key], grad)
                per[key] = (time.perf_counter() - t0) / reps * 1e3
                times[key].append(per[key])
            ratios.append(per["manifoldparam"] / per["geotorch"])
        coords = {
            k: sum(p.numel() for p in layer.parameters() if p.requires_grad) - n  # minus bias
            for k, layer in layers.items()
        }
        rows.append(
            {
                "set": name,
                "n": n,
                "ours_ms": statistics.median(times["manifoldparam"]),
                "geotorch_ms": statistics.median(times["geotorch"]),
                "ratio": statistics.median(ratios),
                "ours_coords": coords["manifoldparam"],
                "geotorch_coords": coords["geotorch"],
            }
        )
        r = rows[-1]
        print(
            f"| {r['set']} | {n} | {r['ours_ms']:.3f} | {r['geotorch_ms']:.3f} | "
            f"**{r['ratio']:.2f}x** | {r['ours_coords']} | {r['geotorch_coords']} |",
            flush=True,
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(
        f"torch {torch.__version__}, geotorch {getattr(geotorch, '__version__', '?')}, "
        f"{torch.get_num_threads()} threads, float32"
    )
    print(
        "| set | n | manifoldparam ms | geotorch ms | ratio | coords (ours) | coords (geotorch) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = [r for n in args.sizes for r in measure(n, args.rounds, args.reps)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
