"""Benchmark: a constrained model's training step, eager vs ``torch.compile`` (inductor), next to
the same layers without the constraint.

Run (CPU, float32, 2 threads; ~4 minutes, most of it compiling)::

    python benchmarks/compile_step.py
    python benchmarks/compile_step.py --rounds 200 --batch 512

The models (float32, Adam, MSE to a fixed random target, one batch):

* ``orthogonal MLP``: ``Linear(64, 256) -> tanh -> orthogonal Linear(256, 256) -> tanh ->
  Linear(256, 10)`` (``mp.orthogonal``: the exponential of a 256x256 skew matrix);
* ``OFT adapter``: ``Linear(1024, 1024)`` with ``mp.orthogonal_adapter`` (32 blocks of 32x32)
  ``-> gelu -> Linear(1024, 10)``;
* each with its ``unconstrained`` twin (the same layers, no parametrization): torch.compile's
  own cost at these shapes.

Each step is ``zero_grad; loss = f(model(x)); backward; step``. Eager, Adam runs in each of its
three implementations (for-loop, ``foreach``, ``fused``) and the fastest is the baseline.
``compiled model``: ``torch.compile(model, fullgraph=True)`` (inductor, default mode), the
optimizer eager as in the baseline; ``compiled model + Adam``: the optimizer step compiled too
(``torch.compile(opt.step)``, PyTorch's recipe for a compiled optimizer). Under compile the
exponentials are our custom ops (``tests/test_interop_compile.py`` checks the graphs). Warm-up
steps first (compilation excluded), then rounds interleaved over all configurations; medians,
and ratios to the eager baseline.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable

import torch
from torch import nn

warnings.filterwarnings("ignore")
torch.set_num_threads(2)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from _timing import interleaved  # noqa: E402

import manifoldparam as mp  # noqa: E402

ADAMS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def orthogonal_mlp(constrained: bool = True) -> tuple[nn.Module, int]:
    torch.manual_seed(0)
    middle = nn.Linear(256, 256)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.Tanh(), mp.orthogonal(middle) if constrained else middle,
        nn.Tanh(), nn.Linear(256, 10),
    )  # fmt: skip
    return model, 64


def oft_adapter(constrained: bool = True) -> tuple[nn.Module, int]:
    torch.manual_seed(0)
    first = nn.Linear(1024, 1024)
    if constrained:
        mp.orthogonal_adapter(first, block_size=32)
        with torch.no_grad():  # away from R = I: a trained adapter's size
            coords = first.parametrizations.weight.original
            coords.copy_(0.05 * torch.randn_like(coords))
    return nn.Sequential(first, nn.GELU(), nn.Linear(1024, 10)), 1024


def step_fn(
    model: nn.Module, call: nn.Module, x: torch.Tensor, y: torch.Tensor,
    adam: dict[str, bool], compile_optimizer: bool = False,
) -> Callable[[], float]:  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, **adam)
    update = torch.compile(opt.step) if compile_optimizer else opt.step

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = (call(x) - y).square().mean()
        loss.backward()
        update()
        return float(loss)

    return step


def measure(
    build: Callable[[bool], tuple[nn.Module, int]], constrained: bool, batch: int, rounds: int
) -> dict[str, float]:
    """Median seconds per step of each configuration (interleaved rounds)."""
    g = torch.Generator().manual_seed(1)
    _, n_in = build(constrained)
    x = torch.randn(batch, n_in, generator=g)
    y = torch.randn(batch, 10, generator=g)
    torch._dynamo.reset()
    steps: dict[str, Callable[[], float]] = {}
    for name, adam in ADAMS.items():
        model, _ = build(constrained)
        steps[f"eager {name}"] = step_fn(model, model, x, y, adam)
        model, _ = build(constrained)
        steps[f"compiled {name}"] = step_fn(model, torch.compile(model, fullgraph=True), x, y, adam)
    model, _ = build(constrained)
    call = torch.compile(model, fullgraph=True)
    steps["compiled all"] = step_fn(model, call, x, y, {}, compile_optimizer=True)
    return interleaved(steps, rounds, warmup=5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    print(
        f"torch {torch.__version__}, CPU float32, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f}, batch {args.batch}\n"
    )
    print(
        "| training step | eager ms (fastest Adam) | compiled model / eager "
        "| compiled model + Adam / eager |"
    )
    print("|---|---:|---:|---:|")
    for name, build in (("orthogonal MLP", orthogonal_mlp), ("OFT adapter", oft_adapter)):
        for constrained in (True, False):
            t = measure(build, constrained, args.batch, args.rounds)
            best = min(ADAMS, key=lambda a: t[f"eager {a}"])
            e = t[f"eager {best}"]
            row = name if constrained else f"{name}, unconstrained"
            print(
                f"| {row} | {e * 1e3:.2f} ({best}) | {t[f'compiled {best}'] / e:.3f}x "
                f"| {t['compiled all'] / e:.3f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
