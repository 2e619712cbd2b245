"""mdmm's README example: mdmm itself against the νPI controller, in one run.

The problem (mdmm's README usage verbatim; model and data as in
``tests/test_soft_mdmm_compat.readme_model``): a 4→8→1 tanh MLP fit by MSE to 32 random
points, ``EqConstraint(mean|W| of each layer, 1)`` (damping 1, mdmm's default), Adamax at
lr 2e-3 (mdmm's default) on the model. Methods: mdmm 0.1.3's ``make_optimizer`` (Adamax
ascends the multipliers), ours with ``dual="pi"`` (dual lr ``--dual-lr``, default gain), and
ours with ``dual="pi"`` plus :func:`manifoldparam.soft.restore_feasibility` after each step
(and :func:`manifoldparam.soft.tangent_gradients` before it; "+ restart": docs/soft.md's
recipe, both gates at 0.05 and the model's optimizer state dropped at the first restored step).
A reference for what is reachable while feasible throughout: projected Adamax (each weight
matrix divided by its mean|W| after every step, and once before the first). Reported: the
loss and the violation ``max |mean|W| - 1|`` at steps 1000/2000/3000, the largest violation
from step 1000 on, and the first step from which it stays <= 1e-3; with ``--optimum`` also
the constrained local optimum next to each method's last point (SLSQP in float64 through
:func:`manifoldparam.interop.scipy_minimize`, started there).

    python benchmarks/soft_readme.py            # 3000 steps
    python benchmarks/soft_readme.py --quick    # 300 steps
    python benchmarks/soft_readme.py --seeds 10 --held-out 5   # draws 0..9 of model and data

With ``--seeds N`` the model's initialisation and the data are drawn with seeds
``--first-seed`` .. ``--first-seed + N - 1`` (seed 0 is the single-draw table's), and mdmm, ours
with the tangent projection and restoration (without and with the restart), and projected
Adamax run on each: one row per draw, then per method the median and largest loss at the last
step, the draws that stay <= 1e-3 from step 1000 on, and the draws where its loss is <=
mdmm's; ``--held-out S`` also summarises the draws below S and from S on apart.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from functools import partial
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's manifoldparam and tests

import manifoldparam as mp  # noqa: E402
from tests.test_soft_mdmm_compat import readme_model  # noqa: E402


def mean_abs(layer: nn.Linear) -> torch.Tensor:
    return layer.weight.abs().mean()


METHODS = (
    "mdmm",
    "ours PI",
    "ours PI + restoration",
    "ours PI + tangent + restoration",
    "ours PI + tangent + restoration + restart",
    "projected Adamax",
)
RESTART = 0.05


def rescale(layers: list[nn.Linear]) -> None:
    with torch.no_grad():
        for m in layers:
            m.weight.div_(mean_abs(m))


def optimum(model: nn.Sequential, inputs: torch.Tensor, targets: torch.Tensor) -> str:
    """SLSQP from the model's current point, in float64: the loss and violation it ends at."""
    model = model.double()
    inputs, targets = inputs.double(), targets.double()
    layers = [m for m in model if hasattr(m, "weight")]
    cons = [mp.EqConstraint(partial(mean_abs, m), 1, dtype=torch.float64) for m in layers]
    mp.interop.scipy_minimize(
        lambda: nn.MSELoss()(model(inputs), targets),
        model,
        method="SLSQP",
        constraints=cons,
        options={"maxiter": 5000, "ftol": 1e-14},
    )
    with torch.no_grad():
        v = max(float((mean_abs(m) - 1).abs()) for m in layers)
        return f"{float(nn.MSELoss()(model(inputs), targets)):.1e} / {v:.0e}"


def run(
    method: str, steps: int, dual_lr: float, slsqp: bool = False, seed: int = 0
) -> tuple[list, str]:
    model, inputs, targets = readme_model(seed)
    layers = [m for m in model if hasattr(m, "weight")]
    if method == "projected Adamax":
        rescale(layers)
        module, opt = None, torch.optim.Adamax(model.parameters(), lr=2e-3)
    elif method == "mdmm":
        import mdmm as lib

        module = lib.MDMM([lib.EqConstraint(partial(mean_abs, m), 1) for m in layers])
        opt = module.make_optimizer(model.parameters(), lr=2e-3)
    else:
        module = mp.MDMM([mp.EqConstraint(partial(mean_abs, m), 1) for m in layers])
        opt = module.make_optimizer(model.parameters(), lr=2e-3, dual="pi", dual_lr=dual_lr)
    weights = [m.weight for m in layers]
    # the restart recipe (docs/soft-controller.md): both gates at 0.05, and the model's
    # optimizer state dropped once, at the first restored step
    within = RESTART if "restart" in method else 0.1
    restarted = False
    out = []
    for _ in range(steps):
        loss = nn.MSELoss()(model(inputs), targets)
        opt.zero_grad()
        (loss if module is None else module(loss).value).backward()
        if "tangent" in method:
            mp.soft.tangent_gradients(module, weights, within=within)
        opt.step()
        if "restoration" in method:
            before = mp.soft.restore_feasibility(module, weights, within=within)
            if "restart" in method and not restarted and before < within:
                restarted = True
                for p in model.parameters():  # not the multipliers' controller state
                    opt.state.pop(p, None)
        elif module is None:
            rescale(layers)
        with torch.no_grad():
            v = max(float((mean_abs(m) - 1).abs()) for m in layers)
        out.append((float(loss.detach()), v))
    return out, optimum(model, inputs, targets) if slsqp else ""


DRAW_METHODS = (
    "mdmm",
    "ours PI + tangent + restoration",
    "ours PI + tangent + restoration + restart",
    "projected Adamax",
)


def stays_from(hist: list, steps: int) -> int | str:
    """The first step from which the violation stays <= 1e-3 ("never": not at the last)."""
    above = [t for t, (_, v) in enumerate(hist) if v > 1e-3]
    return "never" if above and above[-1] == steps - 1 else (above[-1] + 2 if above else 1)


def draws(args: argparse.Namespace, steps: int, from_step: int) -> None:
    """One row per draw of model and data, then a summary per method."""
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    methods = DRAW_METHODS
    head = " | ".join(f"{m}: loss at {steps} / <= 1e-3 from" for m in methods)
    print(f"| draw | {head} |")
    print("|---" * (len(methods) + 1) + "|")
    final: dict[str, list[float]] = {m: [] for m in methods}
    held: dict[str, list[bool]] = {m: [] for m in methods}
    for seed in seeds:
        cells = []
        for method in methods:
            hist, _ = run(method, steps, args.dual_lr, seed=seed)
            final[method].append(hist[-1][0])
            held[method].append(max(v for _, v in hist[from_step - 1 :]) <= 1e-3)
            cells.append(f"{hist[-1][0]:.4f} / {stays_from(hist, steps)}")
        print(f"| {seed} | {' | '.join(cells)} |", flush=True)
    print()
    print(
        f"| method | draws | median loss at {steps} | max loss at {steps} "
        f"| draws <= 1e-3 from {from_step} on | draws with loss <= mdmm's |"
    )
    print("|---|---|---|---|---|---|")
    # with --held-out S: the draws below S (where a variant was chosen) and those from S on
    split = args.held_out if args.held_out is not None else seeds[-1] + 1
    parts = [("all", list(seeds))]
    if args.held_out is not None:
        parts += [("chosen on", [s for s in seeds if s < split])]
        parts += [("held out", [s for s in seeds if s >= split])]
    for method in methods:
        for label, part in parts:
            idx = [seeds.index(s) for s in part]
            losses = [final[method][i] for i in idx]
            wins = sum(final[method][i] <= final["mdmm"][i] for i in idx)
            n = len(idx)
            print(
                f"| {method} | {label} {part[0]}–{part[-1]} | {statistics.median(losses):.4f} "
                f"| {max(losses):.4f} | {sum(held[method][i] for i in idx)} / {n} "
                f"| {'—' if method == 'mdmm' else f'{wins} / {n}'} |"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--dual-lr", type=float, default=1e-2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--optimum", action="store_true", help="SLSQP from each last point")
    ap.add_argument("--seeds", type=int, default=0, help="this many draws of model and data")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--held-out", type=int, help="summarise the draws below / from this apart")
    args = ap.parse_args()
    steps = 300 if args.quick else args.steps
    marks = [s for s in (1000, 2000, 3000) if s <= steps] or [steps]
    from_step = min(1000, steps // 3)
    torch.set_num_threads(1)
    if args.seeds:
        draws(args, steps, from_step)
        return
    head = " | ".join(f"loss / violation at {s}" for s in marks)
    opt_head = f" SLSQP from step {steps}: loss / violation |" if args.optimum else ""
    print(f"| method | {head} | max violation from {from_step} | stays <= 1e-3 from |{opt_head}")
    print("|---" * (len(marks) + 3 + args.optimum) + "|")
    for method in METHODS:
        hist, opt_cell = run(method, steps, args.dual_lr, args.optimum)
        cells = " | ".join(f"{hist[s - 1][0]:.4f} / {hist[s - 1][1]:.1e}" for s in marks)
        worst = max(v for _, v in hist[from_step - 1 :])
        stays = stays_from(hist, steps)
        tail = f" {opt_cell} |" if args.optimum else ""
        print(f"| {method} | {cells} | {worst:.1e} | {stays} |{tail}", flush=True)


if __name__ == "__main__":
    main()
