"""Orthogonal fine-tuning (OFT) on scikit-learn's digits, through ``mp.orthogonal_adapter``.

An MLP is pretrained on the digits 0-4. For the digits 5-9 the model is frozen and each hidden
layer gets an orthogonal adapter, ``W = W0·R`` with ``R`` block-diagonal orthogonal (the exact
exponential of skew blocks, starting at ``R = I``); the adapters and the classifier head are
trained. A linear probe (the head alone, same steps) is the baseline. Logged: the loss, the
test accuracy on 5-9, and ``max|RᵀR - I|`` over the adapters' blocks. At the end the adapters
are merged into plain weights (``mp.export``) and the merged model is checked to give the same
outputs. Saves ``examples/out/digits_oft.png``.

    python examples/digits_oft.py --quick     # 300 + 300 steps, a few seconds
    python examples/digits_oft.py             # 1000 + 1000 steps
"""

from __future__ import annotations

import copy
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from _shared import command_line, digits
from torch import nn
from tqdm import tqdm

import manifoldparam as mp


def orthogonality_error(model: nn.Module) -> float:
    """``max|RᵀR - I|`` over every adapter's blocks (R computed by the adapter's map)."""
    worst = 0.0
    for m in model.modules():
        for p in mp.hard.constraints_of(m, "weight") if hasattr(m, "parametrizations") else []:
            if isinstance(p, mp.hard.OrthogonalAdapter):
                r = p.rotation(m.parametrizations.weight.original).detach().double()
                eye = torch.eye(r.shape[-1], dtype=r.dtype)
                worst = max(worst, float((r.mT @ r - eye).abs().max()))
    return worst


def main() -> None:
    args, steps = command_line(__doc__, quick=300, steps=1000)
    x, y, train, test = digits()
    old, new = y < 5, y >= 5
    loss_fn = nn.CrossEntropyLoss()

    # 1. Pretraining on the digits 0-4.
    model = nn.Sequential(
        nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10)
    )
    tr = train[old[train]]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in tqdm(range(steps), desc="pretrain 0-4"):
        opt.zero_grad()
        loss_fn(model(x[tr]), y[tr]).backward()
        opt.step()

    def accuracy(m: nn.Module, idx: torch.Tensor) -> float:
        with torch.no_grad():
            return float((m(x[idx]).argmax(1) == y[idx]).float().mean())

    te_old, te_new, tr_new = test[old[test]], test[new[test]], train[new[train]]
    print(f"pretrained: accuracy on 0-4 {accuracy(model, te_old):.3f}, on 5-9 "
          f"{accuracy(model, te_new):.3f}")  # fmt: skip

    # 2. Fine-tuning on 5-9: the linear probe (head only) and OFT (adapters + head).
    probe = copy.deepcopy(model)
    oft = copy.deepcopy(model)
    for m in (probe, oft):
        m.requires_grad_(False)
        m[4].requires_grad_(True)
    mp.orthogonal_adapter(oft[0], block_size=16)  # 4 blocks of 16 on the 64 pixels
    mp.orthogonal_adapter(oft[2], block_size=32)  # 4 blocks of 32 on the 128 features
    history: dict[str, list[float]] = {}
    for name, m in (("linear probe", probe), ("OFT adapters + head", oft)):
        opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        losses, accs, errs = [], [], []
        bar = tqdm(range(steps), desc=f"fine-tune 5-9: {name}")
        for step in bar:
            opt.zero_grad()
            loss = loss_fn(m(x[tr_new]), y[tr_new])
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if step % 10 == 9 or step == steps - 1:
                accs.append(accuracy(m, te_new))
                errs.append(orthogonality_error(m))
                bar.set_postfix(loss=f"{losses[-1]:.3f}", acc=f"{accs[-1]:.3f}")
        history[name + " loss"], history[name + " acc"] = losses, accs
        history[name + " err"] = errs
        print(f"{name}: accuracy on 5-9 {accs[-1]:.3f}, final loss {losses[-1]:.4f}")
    print(f"OFT: max|RᵀR - I| over training {max(history['OFT adapters + head err']):.2e}")

    # 3. Merge: plain nn.Linear weights W0·R; the same outputs.
    plain = mp.export(oft, requires_grad=False)
    with torch.no_grad():
        diff = float((plain(x[test]) - oft(x[test])).abs().max())
    kinds = sorted({type(m).__name__ for m in plain.modules()})
    print(f"merged export: modules {kinds}, max|plain - adapted| on the test set {diff:.1e}")
    assert diff == 0.0, diff

    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    for name in ("linear probe", "OFT adapters + head"):
        ax[0].plot(history[name + " loss"], label=name)
        ticks = [min(10 * (i + 1), steps) for i in range(len(history[name + " acc"]))]
        ax[1].plot(ticks, history[name + " acc"], label=name)
    errs = history["OFT adapters + head err"]
    ax[2].plot([min(10 * (i + 1), steps) for i in range(len(errs))], errs, color="C1")
    ax[0].set(title="fine-tuning loss (digits 5-9)", xlabel="step", yscale="log")
    ax[1].set(title="test accuracy on 5-9", xlabel="step")
    ax[2].set(title="OFT: max|RᵀR - I| (float32)", xlabel="step", yscale="log")
    ax[2].set_ylim(1e-8, 1e-4)
    ax[0].legend()
    fig.tight_layout()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("digits_oft_quick.png" if args.quick else "digits_oft.png")
    fig.savefig(path, dpi=100)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
