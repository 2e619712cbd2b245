"""The copy task's orthogonal RNN in float32 and under torch.autocast, side by side.

Same seed, same batches, same iterations; the kernel cached once per step. Reports the final
loss (mean of the last 20 iterations) against the memoryless baseline, the first iteration
from which it stays below 1% of it, the kernel's orthogonality error ``max|WᵀW - I|`` after
training, and the wall time (on a CPU without native bfloat16 products, autocast is slower:
this benchmark is about the loss and the set, not speed; on a GPU it is both).

    python benchmarks/mixed_precision.py                      # bf16 vs float32, 400 iterations
    python benchmarks/mixed_precision.py --amp bf16,fp16 --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import copy_task


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--amp", default="bf16", help="autocast dtypes to compare with float32")
    parser.add_argument("--iters", type=int, default=400)
    parser.add_argument("--length", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "amp.json")
    args = parser.parse_args(argv)
    rows = []
    base = copy_task.baseline(args.length)
    for amp in ["none", *args.amp.split(",")]:
        run = argparse.Namespace(
            seed=0,
            batch=128,
            lr=1e-3,
            lr_orth=1e-4,
            iters=args.iters,
            length=args.length,
            device=args.device,
            amp=amp,
        )
        torch.manual_seed(0)
        model = copy_task.OrthogonalRNN(args.hidden)
        r = copy_task.train(f"autocast {amp}", model, run, cache="cached")
        losses = r["losses"]
        assert isinstance(losses, list)
        final = sum(losses[-20:]) / 20
        rows.append(
            {
                "autocast": amp,
                "final_loss": final,
                "pct_of_baseline": 100 * final / base,
                "below_1pct_from": copy_task.first_below(losses, 0.01 * base),
                "orthogonality_error": r["orthogonality_error"],
                "seconds": r["seconds"],
                "losses": losses,
            }
        )
    print(
        f"\ncopy task L={args.length}, hidden {args.hidden}, {args.iters} iterations, "
        f"{args.device}, torch {torch.__version__}; baseline {base:.4f}"
    )
    print("| autocast | final loss | % of baseline | < 1% from it. | max|WᵀW - I| | s |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['autocast']} | {row['final_loss']:.5f} | {row['pct_of_baseline']:.2f}% | "
            f"{row['below_1pct_from']} | {row['orthogonality_error']:.1e} | {row['seconds']:.0f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
