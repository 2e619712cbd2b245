"""Benchmark: orthogonal fine-tuning, ``manifoldparam.orthogonal_adapter`` vs peft's OFT layer.

Run (CPU, float32, 2 threads; ~3-6 minutes on a loaded machine)::

    python benchmarks/oft_peft.py                  # everything below
    python benchmarks/oft_peft.py --steps 200      # a shorter training run

One process, the peers side by side:

* **rotation fwd+bwd**: the 128 blocks of 32x32 alone, from the coordinates to ``R`` and the
  gradient back (``(R * G).sum().backward()``, G fixed): ours ``OrthogonalAdapter.rotation``
  (``mp.linalg.expm_skew_blocks``: Taylor with one number of squarings for the batch, and its
  exact derivative), peft's ``OFTRotationModule._cayley_batch`` (its default,
  the 5-term Cayley--Neumann series). Coordinates ~ N(0, 0.05²) (a trained adapter's size).
* **layer fwd+bwd**: ``nn.Linear(4096, 256)`` (128 blocks on the 4096 input features), a
  batch of 64: ours merges ``W = W0 R`` and runs the linear layer; peft rotates the input
  (``x R``) and runs the base layer. Peak memory: the bytes autograd saves for the backward in
  one step (distinct storages; parameters and buffers, such as W0, excluded).
* **kernels**: aten ops the CPU profiler records for one rotation fwd+bwd with 8, 32 and 128
  blocks (constant in the block count: the blocks are batched, no per-block loop).
* **orthogonality through training**: both adapters on the same frozen layer, 1000 Adam steps
  at lr 1e-2 fitting a teacher ``W0 R*`` (R* a random block rotation), a fresh batch per step;
  ``max |RᵀR - I|`` over the blocks, every 10 steps (max over the run, and at the end), and the
  final loss. Ours is measured on the ``R`` its map computes; peft's on ``_cayley_batch``'s.

Rounds of the timing are interleaved (ours, peft, ours, peft, ...); medians and the ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
from torch import nn

warnings.filterwarnings("ignore")
torch.set_num_threads(2)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from _timing import interleaved  # noqa: E402

import manifoldparam as mp  # noqa: E402

BLOCK = 32


def peft_layer(base: nn.Linear, block: int = BLOCK) -> nn.Module:
    """peft's OFT on ``base`` (its defaults: Cayley--Neumann, 5 terms), through get_peft_model."""
    from peft import OFTConfig, get_peft_model

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = base

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    model = get_peft_model(Net(), OFTConfig(target_modules=["proj"], oft_block_size=block, r=0))
    return model.base_model.model.proj


def peft_rotation(layer: nn.Module) -> nn.Module:
    return layer.oft_R["default"]


def ours_layer(base: nn.Linear, block: int = BLOCK) -> nn.Linear:
    return mp.orthogonal_adapter(base, block_size=block)


def ours_param(layer: nn.Module) -> mp.hard.OrthogonalAdapter:
    return layer.parametrizations.weight[0]


def orth_error(r: torch.Tensor) -> float:
    eye = torch.eye(r.shape[-1], dtype=torch.float64)
    r = r.detach().double()
    return float((r.mT @ r - eye).abs().max())


def aten_ops(fn) -> int:  # type: ignore[no-untyped-def]
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def saved_bytes(fn, model: nn.Module) -> int:  # type: ignore[no-untyped-def]
    """Bytes autograd saves for the backward during one ``fn()`` (distinct storages), the
    module's own parameters and buffers (W0, the frozen weight) excluded: the activation
    memory a training step holds between its forward and backward."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def rotation_fns(blocks: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    p = BLOCK * (BLOCK - 1) // 2
    ours = ours_param(ours_layer(nn.Linear(blocks * BLOCK, 8)))
    peft = peft_rotation(peft_layer(nn.Linear(blocks * BLOCK, 8)))
    x0 = 0.05 * torch.randn(blocks, p, generator=g)
    xo = x0.clone().requires_grad_()
    with torch.no_grad():
        peft.weight.copy_(x0)
    grad = torch.randn(blocks, BLOCK, BLOCK, generator=g)

    def f_ours() -> None:
        xo.grad = None
        (ours.rotation(xo) * grad).sum().backward()

    def f_peft() -> None:
        peft.weight.grad = None
        r = peft._cayley_batch(peft.weight, BLOCK, peft.use_cayley_neumann, 5)
        (r * grad).sum().backward()

    return {"ours (exact expm)": f_ours, "peft OFT (Cayley-Neumann)": f_peft}


def layer_fns(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = nn.Linear(128 * BLOCK, 256)
    ours = ours_layer(_copy(base))
    peft = peft_layer(_copy(base))
    x0 = 0.05 * torch.randn(ours_param(ours).dim, generator=g).reshape(128, -1)
    with torch.no_grad():
        ours.parametrizations.weight.original.copy_(x0)
        peft_rotation(peft).weight.copy_(x0)
    x = torch.randn(64, 128 * BLOCK, generator=g)

    def f_ours() -> None:
        ours.zero_grad()
        ours(x).square().mean().backward()

    def f_peft() -> None:
        peft.zero_grad()
        peft(x).square().mean().backward()

    fns = {"ours (exact expm)": f_ours, "peft OFT (Cayley-Neumann)": f_peft}
    return fns, {"ours (exact expm)": ours, "peft OFT (Cayley-Neumann)": peft}


def _copy(base: nn.Linear) -> nn.Linear:
    out = nn.Linear(base.in_features, base.out_features)
    out.load_state_dict(base.state_dict())
    out.requires_grad_(False)  # frozen: the adapters' coordinates are the trainable ones
    return out


def training(steps: int, lr: float, seed: int = 0) -> dict[str, dict[str, float]]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n_in, n_out, blocks = 128 * BLOCK, 64, 128
    base = nn.Linear(n_in, n_out)
    teacher_r = torch.linalg.matrix_exp(  # a random block rotation, angles of order 1
        (lambda a: a - a.mT)(torch.randn(blocks, BLOCK, BLOCK, generator=g) / BLOCK**0.5)
    )
    with torch.no_grad():
        w0 = base.weight.detach()
        w_star = (w0.reshape(n_out, blocks, BLOCK).transpose(0, 1) @ teacher_r.mT).transpose(0, 1)
        w_star = w_star.reshape(n_out, n_in)
    ours, peft = ours_layer(_copy(base)), peft_layer(_copy(base))
    runs = {
        "ours (exact expm)": (
            ours,
            lambda: ours_param(ours).rotation(ours.parametrizations.weight.original),
            [ours.parametrizations.weight.original],
        ),
        "peft OFT (Cayley-Neumann)": (
            peft,
            lambda: (lambda m: m._cayley_batch(m.weight, BLOCK, True, 5))(peft_rotation(peft)),
            [peft_rotation(peft).weight],
        ),
    }
    out: dict[str, dict[str, float]] = {}
    for name, (model, rotation, params) in runs.items():
        opt = torch.optim.Adam(params, lr=lr)
        gen = torch.Generator().manual_seed(seed + 1)
        worst = 0.0
        for step in range(steps):
            x = torch.randn(32, n_in, generator=gen)
            loss = (model(x) - x @ w_star.T - base.bias).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 10 == 9 or step == steps - 1:
                with torch.no_grad():
                    worst = max(worst, orth_error(rotation()))
        with torch.no_grad():
            final = orth_error(rotation())
            x = torch.randn(256, n_in, generator=gen)
            loss = float((model(x) - x @ w_star.T - base.bias).square().mean())
            coord = float(params[0].detach().abs().max())
        out[name] = {"max_err": worst, "final_err": final, "loss": loss, "coord": coord}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument(
        "--only", choices=["rotation", "layer", "ops", "training"], help="one section alone"
    )
    args = ap.parse_args()
    import peft

    load = os.getloadavg()[0]
    print(
        f"torch {torch.__version__}, peft {peft.__version__}, CPU float32, "
        f"{torch.get_num_threads()} threads, load average {load:.1f}\n"
    )

    def want(section: str) -> bool:
        return args.only in (None, section)

    if want("rotation"):
        rotation_table(args.rounds)
    if want("layer"):
        layer_table(args.rounds)
    if want("ops"):
        ops_table()
    if want("training"):
        training_table(args.steps, args.lr)


def rotation_table(rounds: int) -> None:
    print("| 128 blocks of 32x32, fwd+bwd | median ms | vs peft |")
    print("|---|---:|---:|")
    t = interleaved(rotation_fns(128), rounds)
    ref = t["peft OFT (Cayley-Neumann)"]
    for k, v in t.items():
        print(f"| rotation R: {k} | {v * 1e3:.2f} | {v / ref:.2f}x |")


def layer_table(rounds: int) -> None:
    print("\n| Linear(4096, 256), batch 64, fwd+bwd | median ms | vs peft | saved for backward |")
    print("|---|---:|---:|---:|")
    fns, models = layer_fns()
    t = interleaved(fns, rounds)
    ref = t["peft OFT (Cayley-Neumann)"]
    for k, v in t.items():
        mb = saved_bytes(fns[k], models[k]) / 2**20
        print(f"| {k} | {v * 1e3:.2f} | {v / ref:.2f}x | {mb:.1f} MB |")


def ops_table() -> None:
    print("\n| aten ops in one rotation fwd+bwd | 8 blocks | 32 blocks | 128 blocks |")
    print("|---|---:|---:|---:|")
    counts = {k: [] for k in rotation_fns(8)}
    for blocks in (8, 32, 128):
        for k, f in rotation_fns(blocks).items():
            counts[k].append(aten_ops(f))
    for k, v in counts.items():
        print(f"| {k} | " + " | ".join(str(c) for c in v) + " |")


def training_table(steps: int, lr: float) -> None:
    print(
        f"\n| {steps} Adam steps, lr {lr} "
        "| max over the run of max\\|RᵀR − I\\| | at the end | final loss | largest coordinate |"
    )
    print("|---|---:|---:|---:|---:|")
    for k, v in training(steps, lr).items():
        print(
            f"| {k} | {v['max_err']:.2e} | {v['final_err']:.2e} | {v['loss']:.3e} "
            f"| {v['coord']:.2f} |"
        )


if __name__ == "__main__":
    main()
