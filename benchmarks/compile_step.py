"""Benchmark: a constrained model's training step, eager vs ``torch.compile`` (inductor).

Run (CPU, float32, 2 threads; ~2 minutes, most of it compiling)::

    python benchmarks/compile_step.py
    python benchmarks/compile_step.py --rounds 100 --batch 256

The models (float32, Adam, MSE to a fixed random target, one batch):

* ``orthogonal MLP``: ``Linear(64, 256) -> tanh -> orthogonal Linear(256, 256) -> tanh ->
  Linear(256, 10)`` (``mp.orthogonal``: the exponential of a 256x256 skew matrix);
* ``OFT adapter``: ``Linear(1024, 1024)`` with ``mp.orthogonal_adapter`` (32 blocks of 32x32)
  ``-> gelu -> Linear(1024, 10)``.

Each step is ``zero_grad; loss = f(model(x)); backward; step`` with the model called eagerly or
through ``torch.compile(model, fullgraph=True)`` (inductor, default mode). Under compile the
exponential is the custom op ``manifoldparam::expm_v2`` with our Fréchet backward (the test
``tests/test_interop_compile.py`` checks the graphs). Warm-up steps first (compilation
excluded), then rounds interleaved eager/compiled; medians and the ratio compiled/eager.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
from torch import nn

warnings.filterwarnings("ignore")
torch.set_num_threads(2)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import manifoldparam as mp  # noqa: E402


def orthogonal_mlp() -> tuple[nn.Module, int]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.Tanh(), mp.orthogonal(nn.Linear(256, 256)), nn.Tanh(),
        nn.Linear(256, 10),
    )  # fmt: skip
    return model, 64


def oft_adapter() -> tuple[nn.Module, int]:
    torch.manual_seed(0)
    model = nn.Sequential(
        mp.orthogonal_adapter(nn.Linear(1024, 1024), block_size=32), nn.GELU(),
        nn.Linear(1024, 10),
    )  # fmt: skip
    with torch.no_grad():  # away from R = I: a trained adapter's size
        coords = model[0].parametrizations.weight.original
        coords.copy_(0.05 * torch.randn_like(coords))
    return model, 1024


def step_fn(model: nn.Module, call: nn.Module, x: torch.Tensor, y: torch.Tensor):  # type: ignore[no-untyped-def]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = (call(x) - y).square().mean()
        loss.backward()
        opt.step()
        return float(loss)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    print(
        f"torch {torch.__version__}, CPU float32, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f}, batch {args.batch}\n"
    )
    print("| training step | eager ms | compiled ms | compiled / eager |")
    print("|---|---:|---:|---:|")
    for name, build in (("orthogonal MLP", orthogonal_mlp), ("OFT adapter", oft_adapter)):
        g = torch.Generator().manual_seed(1)
        eager_model, n_in = build()
        compiled_model, _ = build()
        x = torch.randn(args.batch, n_in, generator=g)
        y = torch.randn(args.batch, 10, generator=g)
        torch._dynamo.reset()
        steps = {
            "eager": step_fn(eager_model, eager_model, x, y),
            "compiled": step_fn(
                compiled_model, torch.compile(compiled_model, fullgraph=True), x, y
            ),
        }
        for f in steps.values():
            for _ in range(5):
                f()
        times: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(args.rounds):
            for k, f in steps.items():
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
        e, c = (statistics.median(times[k]) for k in ("eager", "compiled"))
        print(f"| {name} | {e * 1e3:.2f} | {c * 1e3:.2f} | {c / e:.2f}x |")


if __name__ == "__main__":
    main()
