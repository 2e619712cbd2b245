"""The copying-memory task: an orthogonal RNN with a cached kernel against an LSTM.

Input: 10 symbols from {1..8}, then L blanks (0), the marker 9, then 9 blanks. Target: L+10
blanks, then the 10 symbols. Cross-entropy over all L+20 positions, 9 classes. A model that
remembers nothing scores the baseline ``10·log(8)/(L+20)`` (0.1733 at L=100).

The orthogonal RNN (expRNN's model) is ``h_t = modReLU(W h_{t-1} + U x_t)`` with ``W``
constrained by :func:`manifoldparam.orthogonal` and ``modReLU(z) = sign(z)·relu(|z|+b)``.
Its kernel is read at every time step; inside :func:`manifoldparam.cached` it is computed once
per forward (``--cache auto`` uses :func:`manifoldparam.auto_cache` instead; ``--cache none``
recomputes the matrix exponential at every step). The LSTM has about as many parameters.

    python examples/copy_task.py --quick     # the same task, 400 iterations: ~2 min, 2 cores
    python examples/copy_task.py             # L=100, hidden 128, 1500 iterations (~7-20 min)
    python examples/copy_task.py --device cpu   # (default: cuda when there is a GPU)
    python examples/copy_task.py --quick --amp bf16   # forward and loss under torch.autocast

Writes ``examples/out/copy_task[_quick].png`` (both loss curves against the baseline) and a
``.json`` with the curves and final figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path

import torch
from torch import Tensor, nn

import manifoldparam as mp
from manifoldparam.caching import auto_cache, cached

N_SYMBOLS = 8  # symbols 1..8; 0 is blank, 9 the marker
N_CLASSES = 9  # targets: blank or a symbol
N_INPUTS = 10
AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def baseline(length: int) -> float:
    """Cross-entropy of the memoryless strategy: blanks, then uniform over the 8 symbols."""
    return 10 * math.log(N_SYMBOLS) / (length + 20)


def copy_batch(batch: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(x, y)`` of shape ``(L+20, batch)``: integer inputs in 0..9 and targets in 0..8."""
    symbols = torch.randint(1, N_SYMBOLS + 1, (10, batch), generator=generator)
    blanks = torch.zeros(length, batch, dtype=torch.long)
    marker = torch.full((1, batch), 9, dtype=torch.long)
    tail = torch.zeros(9, batch, dtype=torch.long)
    x = torch.cat([symbols, blanks, marker, tail])
    y = torch.cat([torch.zeros(length + 10, batch, dtype=torch.long), symbols])
    return x, y


class ModReLU(nn.Module):
    """``sign(z)·relu(|z| + b)`` with a learned bias per unit."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.empty(n).uniform_(-0.01, 0.01))

    def forward(self, z: Tensor) -> Tensor:
        return torch.sign(z) * torch.relu(z.abs() + self.bias)


def henaff_rotation(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Block-diagonal 2x2 rotations with angles uniform in [-π, π] (expRNN's copy-task init)."""
    a = torch.zeros(n, n)
    s = (torch.rand(n // 2, generator=generator) * 2 - 1) * math.pi
    idx = torch.arange(0, n - 1, 2)
    a[idx, idx + 1] = s
    a[idx + 1, idx] = -s
    return torch.linalg.matrix_exp(a)


class OrthogonalRNN(nn.Module):
    """expRNN's cell: orthogonal recurrent kernel, modReLU, one-hot inputs, linear read-out."""

    def __init__(self, hidden: int, map: str = "expm") -> None:
        super().__init__()
        self.hidden = hidden
        self.inp = nn.Linear(N_INPUTS, hidden)
        nn.init.kaiming_normal_(self.inp.weight, nonlinearity="relu")
        rec = nn.Linear(hidden, hidden, bias=False)
        with torch.no_grad():
            rec.weight.copy_(henaff_rotation(hidden))
        self.rec = mp.orthogonal(rec, map=map)
        self.act = ModReLU(hidden)
        self.out = nn.Linear(hidden, N_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(T, batch)`` integers -> logits ``(T, batch, 9)``."""
        # one-hot @ Uᵀ for all steps at once (embedding: its backward is a fast scatter-add)
        u = nn.functional.embedding(x, self.inp.weight.T) + self.inp.bias
        h = u.new_zeros(x.shape[1], self.hidden)
        hs = []
        # unbind, not u[t]: u[t]'s backward writes a zero-filled (T, batch, n) tensor per step
        for u_t in u.unbind(0):
            h = self.act(self.rec(h) + u_t)  # reads the constrained kernel at every step
            hs.append(h)
        return self.out(torch.stack(hs))

    def orthogonal_parameters(self) -> list[nn.Parameter]:
        return [self.rec.parametrizations.weight.original]


class LSTM(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(N_INPUTS, hidden)
        self.out = nn.Linear(hidden, N_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.lstm(nn.functional.one_hot(x, N_INPUTS).float())
        return self.out(h)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def lstm_hidden_for(n_target: int) -> int:
    """The LSTM width whose parameter count is closest to ``n_target``."""
    return min(range(4, 512), key=lambda h: abs(n_params(LSTM(h)) - n_target))


def optimizer_for(model: nn.Module, lr: float, lr_orth: float) -> torch.optim.Optimizer:
    """RMSprop; the orthogonal coordinates at ``lr_orth`` (expRNN uses lr/10)."""
    orth = model.orthogonal_parameters() if isinstance(model, OrthogonalRNN) else []
    ids = {id(p) for p in orth}
    rest = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": rest, "lr": lr}]
    if orth:
        groups.append({"params": orth, "lr": lr_orth})
    return torch.optim.RMSprop(groups, lr=lr)


def train(
    name: str,
    model: nn.Module,
    args: argparse.Namespace,
    cache: str = "none",
) -> dict[str, object]:
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(args.seed + 1)  # the same batches for both models
    model.to(args.device)
    opt = optimizer_for(model, args.lr, args.lr_orth)
    loss_fn = nn.CrossEntropyLoss()
    if cache == "auto":
        auto_cache(model)
    amp = AMP[getattr(args, "amp", "none")]
    device_type = torch.device(args.device).type
    # float16 needs loss scaling (its gradients underflow); bfloat16 has float32's range.
    scaler = torch.amp.GradScaler(device_type, enabled=amp is torch.float16)
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(args.iters), desc=f"{name:>14}", unit="it", dynamic_ncols=True)
    for _ in bar:
        x, y = (t.to(args.device) for t in copy_batch(args.batch, args.length, gen))
        ctx = cached() if cache == "cached" else contextlib.nullcontext()
        with ctx:
            # torch's recipe: forward and loss under autocast, backward and step outside
            with torch.autocast(device_type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = model(x)
                loss = loss_fn(logits.reshape(-1, N_CLASSES).float(), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}", base=f"{baseline(args.length):.4f}")
    seconds = time.perf_counter() - start
    out: dict[str, object] = {"losses": losses, "seconds": seconds, "params": n_params(model)}
    if isinstance(model, OrthogonalRNN):
        out["orthogonality_error"] = orthogonality_error(model)
    return out


def orthogonality_error(model: OrthogonalRNN) -> float:
    """``max|WᵀW - I|`` of the recurrent kernel, in float64."""
    w = model.rec.weight.detach().double()
    return float((w.mT @ w - torch.eye(w.shape[-1], dtype=w.dtype, device=w.device)).abs().max())


def first_below(losses: list[float], level: float, window: int = 20) -> int | None:
    """First iteration from which the running mean over ``window`` stays below ``level``."""
    for i in range(len(losses) - window + 1):
        if sum(losses[i : i + window]) / window < level:
            return i + window
    return None


def plot(results: dict[str, dict[str, object]], length: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        losses = r["losses"]
        assert isinstance(losses, list)
        ax.plot(range(1, len(losses) + 1), losses, label=f"{name} ({r['params']} params)", lw=1)
    ax.axhline(baseline(length), color="k", ls="--", lw=1, label=f"baseline {baseline(length):.4f}")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy")
    ax.set_title(f"copying memory, L={length}")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="400 iterations: the ~2-minute demo")
    parser.add_argument("--length", "-L", type=int, default=None, help="blanks (default 100)")
    parser.add_argument("--hidden", type=int, default=None, help="orthogonal RNN width (128)")
    parser.add_argument("--lstm-hidden", type=int, default=None, help="default: same #params")
    parser.add_argument("--iters", type=int, default=None, help="iterations (default 1500)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lr-orth", type=float, default=None, help="default lr/10")
    parser.add_argument("--cache", choices=["cached", "auto", "none"], default="cached")
    parser.add_argument("--models", default="orthogonal,lstm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--amp", choices=sorted(AMP), default="none", help="autocast dtype")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    quick = {"iters": 400} if args.quick else {}  # the same task, fewer iterations
    full = {"length": 100, "hidden": 128, "iters": 1500}
    for k, v in full.items():
        if getattr(args, k) is None:
            setattr(args, k, quick.get(k, v))
    if args.lr_orth is None:
        args.lr_orth = args.lr / 10
    if args.threads:
        torch.set_num_threads(args.threads)
    out = (
        args.out or Path(__file__).parent / "out" / f"copy_task{'_quick' if args.quick else ''}.png"
    )

    torch.manual_seed(args.seed)
    results: dict[str, dict[str, object]] = {}
    models = args.models.split(",")
    orth = OrthogonalRNN(args.hidden)
    lstm_h = args.lstm_hidden or lstm_hidden_for(n_params(orth))
    base = baseline(args.length)
    print(
        f"copy task L={args.length}, batch {args.batch}, {args.iters} iterations; "
        f"baseline {base:.4f}; orthogonal RNN n={args.hidden} ({n_params(orth)} params), "
        f"LSTM n={lstm_h} ({n_params(LSTM(lstm_h))} params); kernel cache: {args.cache}; "
        f"device: {args.device}; autocast: {args.amp}"
    )
    if "orthogonal" in models:
        results["orthogonal RNN"] = train("orthogonal RNN", orth, args, cache=args.cache)
    if "lstm" in models:
        torch.manual_seed(args.seed)
        results["LSTM"] = train("LSTM", LSTM(lstm_h), args)

    summary: dict[str, object] = {"args": {k: str(v) for k, v in vars(args).items()}}
    summary["baseline"] = base
    for name, r in results.items():
        losses = r["losses"]
        assert isinstance(losses, list)
        tail = losses[-20:]
        r["final_mean20"] = sum(tail) / len(tail)
        r["first_below_1pct"] = first_below(losses, 0.01 * base)
        print(
            f"{name:>14}: final loss (mean of last 20) {r['final_mean20']:.5f} = "
            f"{100 * r['final_mean20'] / base:.2f}% of baseline; below 1% of baseline from "
            f"iteration {r['first_below_1pct']}; {r['seconds']:.0f} s"
            + (
                f"; max|WᵀW - I| {r['orthogonality_error']:.1e}"
                if "orthogonality_error" in r
                else ""
            )
        )
    summary["results"] = results
    plot(results, args.length, out)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print(f"saved {out}")
    return summary


if __name__ == "__main__":
    main()
