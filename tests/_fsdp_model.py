"""Shared by the 2-rank FSDP2 and DCP tests: the constrained model
(every constraint and a soft one) and its training loop, written once for the single-process
reference and the sharded run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
DT = torch.float64
LAYERS = (0, 2, 4, 5)  # the constrained ones: orthogonal, SPD (+ soft), bounded, nonnegative


def build(dtype: torch.dtype = DT) -> tuple[nn.Sequential, nn.Module]:
    """The model (seeded: the same on every rank and in the reference) and its MDMM."""
    import manifoldparam as mp
    from manifoldparam.soft import MDMM, rms, soft_constraints

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 6, dtype=dtype),
        nn.Tanh(),
        nn.Linear(6, 6, bias=False, dtype=dtype),
        nn.Tanh(),
        nn.Linear(6, 4, dtype=dtype),
        nn.Linear(4, 2, dtype=dtype),
    )
    mp.orthogonal(model[0])
    mp.spd(model[2])
    mp.bounded(model[4], low=-0.4, high=0.4)
    mp.nonnegative(model[5])
    mp.constrain(model[2], "weight", rms, eq=0.2, damping=5.0)
    return model, MDMM(soft_constraints(model))


def shard(model: nn.Module, **kw: Any) -> None:  # pragma: no cover - subprocess
    """``fully_shard`` each constrained layer, then the root. The soft-constrained layer stays
    gathered after its forward: the MDMM reads its weight after the model's forward."""
    from torch.distributed.fsdp import fully_shard

    for i in LAYERS:
        fully_shard(model[i], reshard_after_forward=(i != 2), **kw)
    fully_shard(model, **kw)


def data(dtype: torch.dtype = DT) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 6, dtype=dtype, generator=g), torch.randn(
        16, 2, dtype=dtype, generator=g
    )


def local(t: torch.Tensor, rank: int | None) -> torch.Tensor:
    """This rank's half of the batch (all of it for the single-process run)."""
    return t if rank is None else t[8 * rank : 8 * rank + 8]


def step(
    model: nn.Module,
    mdmm: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    sharded: bool,
) -> float:
    """One MDMM step: the loss is the mean over this rank's batch, FSDP averages the model's
    gradients (the whole batch's mean), the multipliers' are averaged explicitly."""
    from manifoldparam.interop import all_reduce_grads

    ret = mdmm(((model(x) - y) ** 2).mean())
    opt.zero_grad()
    ret.value.backward()
    if sharded:
        all_reduce_grads(mdmm.parameters())
    opt.step()
    return float(ret.value.detach())


def optimizer(model: nn.Module, mdmm: nn.Module) -> torch.optim.Optimizer:
    return mdmm.make_optimizer(model.parameters(), optimizer=torch.optim.Adam, lr=0.05)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The constrained weights, whole (a collective when sharded: every rank reads them)."""
    with torch.no_grad():
        return {str(i): model[i].weight.detach().clone() for i in LAYERS}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def set_errors(w: dict[str, torch.Tensor]) -> dict[str, float]:
    """How far each weight is from its set (0 on it; SPD and bounds: margin violations)."""
    q = w["0"].double()
    eye = torch.eye(q.shape[0], dtype=torch.float64)
    s = w["2"].double()
    return {
        "orthogonal": float((q.T @ q - eye).abs().max()),
        "spd_asym": float((s - s.T).abs().max()),
        "spd_min_eig": float(torch.linalg.eigvalsh((s + s.T) / 2).min()),
        "bounded_excess": float((w["4"].double().abs() - 0.4).clamp(min=0).max()),
        "nonneg_min": float(w["5"].double().min()),
    }


def count_maps() -> dict[str, int]:  # pragma: no cover - subprocess
    """Count each constraint's ``map`` calls (in this process) in the returned dict."""
    from manifoldparam.hard import SPD, Bounded, Nonnegative, Orthogonal

    calls: dict[str, int] = {}

    def counting(cls: type, f: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def map_(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
            calls[cls.__name__] = calls.get(cls.__name__, 0) + 1
            return f(self, x)

        return map_

    for cls in (Orthogonal, SPD, Bounded, Nonnegative):
        cls.map = counting(cls, cls.map)  # type: ignore[method-assign]
    return calls
