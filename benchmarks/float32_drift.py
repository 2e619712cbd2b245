"""float32 orthogonality drift after 1000 Adam steps, ours against the peers, in one run.

    python benchmarks/float32_drift.py [--n 256] [--steps 1000] [--device cuda]

Each method trains an orthogonal n×n float32 weight with Adam (lr 1e-2) toward a fixed
non-orthogonal target (mean squared error), from the same start. Reported: ‖WᵀW − I‖_F of the
final weight (recomputed from the final coordinates, as the next step would see it), the
final loss, and the median step time relative to torch's `orthogonal(matrix_exp)` (on a GPU,
each step is timed after `torch.cuda.synchronize()`).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from _timing import now
from torch import nn

import manifoldparam as mp


def methods() -> dict[str, Callable[[nn.Linear], nn.Module]]:
    out: dict[str, Callable[[nn.Linear], nn.Module]] = {
        "manifoldparam orthogonal (expm, default)": lambda m: mp.orthogonal(m),
        "manifoldparam orthogonal (cayley)": lambda m: mp.orthogonal(m, map="cayley"),
        "manifoldparam orthogonal (expm, no Newton-Schulz)": lambda m: mp.orthogonal(
            m, newton_schulz=0
        ),
        "torch orthogonal(matrix_exp)": lambda m: nn.utils.parametrizations.orthogonal(
            m, orthogonal_map="matrix_exp"
        ),
        "torch orthogonal(cayley)": lambda m: nn.utils.parametrizations.orthogonal(
            m, orthogonal_map="cayley"
        ),
    }
    try:
        import geotorch

        def _geotorch(m: nn.Linear) -> nn.Module:
            geotorch.orthogonal(m, "weight")
            return m

        out["geotorch orthogonal (expm)"] = _geotorch
    except ImportError:  # pragma: no cover - optional peer
        print("geotorch not installed: pip install geotorch")
    return out


def run(make: Callable[[nn.Linear], nn.Module], n: int, steps: int, target: torch.Tensor):
    torch.manual_seed(0)
    dev = target.device
    layer = nn.Linear(n, n, bias=False)
    nn.init.orthogonal_(layer.weight)
    layer.to(dev)
    start = layer.weight.detach().clone()
    make(layer)
    try:
        layer.weight = start  # the same starting point for every method
    except Exception:  # geotorch samples its own start; fall back to it
        pass
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    times = []
    for _ in range(steps):
        t0 = now(dev)
        opt.zero_grad(set_to_none=True)
        loss = (layer.weight - target).pow(2).mean()
        loss.backward()
        opt.step()
        times.append(now(dev) - t0)
    with torch.no_grad():
        w = layer.weight
        err = float(torch.linalg.matrix_norm(w.T @ w - torch.eye(n, device=dev)))
        final = float((w - target).pow(2).mean())
    return err, final, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--device", default="cpu", help="e.g. cuda (default cpu)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(123)
    target = torch.randn(args.n, args.n) / args.n**0.5 * 2.0  # not orthogonal
    target = target.to(args.device)
    rows = []
    for name, make in methods().items():
        err, loss, step = run(make, args.n, args.steps, target)
        rows.append((name, err, loss, step))
        print(f"{name:<52} ‖WᵀW−I‖_F {err:.2e}  loss {loss:.4f}  step {step * 1e3:.2f} ms")
    ref = next(r[3] for r in rows if r[0] == "torch orthogonal(matrix_exp)")
    where = torch.cuda.get_device_name() if target.is_cuda else "CPU, 2 threads"
    print(f"\nn={args.n}, {args.steps} Adam steps (lr 1e-2), float32, {where}\n")
    print("| method | ‖WᵀW − I‖_F | final loss | step time (median) | vs torch matrix_exp |")
    print("|---|---:|---:|---:|---:|")
    for name, err, loss, step in rows:
        print(f"| {name} | {err:.1e} | {loss:.4f} | {step * 1e3:.2f} ms | {step / ref:.2f}x |")


if __name__ == "__main__":
    main()
