"""An MLP on scikit-learn's digits with per-layer soft constraints and one hard constraint.

As in mdmm's MNIST demo, each soft-constrained layer has ``mean|W| == 1`` (an equality
multiplier per layer, declared on the attribute: no lambda); the middle layer is orthogonal
by construction (a hard constraint on the same model). Adam ascends the multipliers through
``maximize=True``; once the violation is below 0.1 a Gauss–Newton restoration step after
each step keeps it near rounding. Saves ``examples/out/digits_constrained.png`` (loss and
constraint values over training) and prints the model's constraint report.

    python examples/digits_constrained.py --quick     # 800 steps, ≈ 15 s
    python examples/digits_constrained.py             # 1500 steps, ≈ 1 min
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from _shared import command_line, digits
from torch import nn
from tqdm import tqdm

import manifoldparam as mp
from manifoldparam.soft import MDMM, constrain, mean_abs, restore_feasibility, soft_constraints


def main() -> None:
    args, steps = command_line(__doc__, quick=800, steps=1500)
    x, y, train, test = digits()

    model = nn.Sequential(
        nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10)
    )
    mp.orthogonal(model[2], "weight")  # hard: W2 orthogonal, always
    for i in (0, 4):  # soft: mean|W| == 1 on the other layers
        constrain(model[i], "weight", mean_abs, eq=1.0, damping=10.0)
    mdmm = MDMM(soft_constraints(model))
    opt = mdmm.make_optimizer(model.parameters(), optimizer=torch.optim.Adam, lr=1e-2, dual_lr=2e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    loss_fn = nn.CrossEntropyLoss()

    losses, values = [], []
    bar = tqdm(range(steps), desc="digits")
    for step in bar:
        idx = train[torch.randint(len(train), (128,))]
        loss = loss_fn(model(x[idx]), y[idx])
        out = mdmm(loss)
        opt.zero_grad()
        out.value.backward()
        opt.step()
        sched.step()
        restore_feasibility(mdmm)
        losses.append(loss.detach())
        values.append(torch.stack([v.detach() for v in out.fn_values]))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", viol=f"{mdmm.violation().item():.1e}")

    with torch.no_grad():
        acc = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    print(f"test accuracy {acc:.3f}")
    print(mp.constraint_report(model))

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    vals = torch.stack(values)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.semilogy(torch.stack(losses).numpy())
    a1.set(title="training loss", xlabel="step")
    for j, i in enumerate((0, 4)):
        a2.plot(vals[:, j].numpy(), label=f"mean|W| layer {i}")
    a2.axhline(1.0, color="k", lw=0.5)
    a2.set(title="constraint values (target 1)", xlabel="step", ylim=(0, 1.5))
    a2.legend()
    fig.tight_layout()
    path = out_dir / "digits_constrained.png"
    fig.savefig(path, dpi=100)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
