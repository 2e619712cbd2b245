"""FSDP2 (``fully_shard``, gloo, 2 CPU ranks on loopback): constrained training equals the
single-process run.

The test runs this file as a script in a subprocess with a timeout; the script spawns two
ranks, and each writes a JSON report. Each rank trains the model of ``_fsdp_model`` (orthogonal,
SPD with a soft constraint and its MDMM multiplier, bounded, nonnegative) sharded, on its half
of the batch, with the cache on (``auto_cache`` or one ``cached()`` block around the loop) and
a rebase half way, and also the same model in one process on the whole batch: the gathered
weights agree to round-off (the averaged gradient is summed in another order), each map runs
once per step on each rank, the ranks agree bit for bit. Also: a write to the shards outside an
optimizer step (an EMA update) is seen by the cache, and bf16 parameters
(``MixedPrecisionPolicy``) stay on their sets to bf16 precision.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import pytest
import torch

if __name__ == "__main__":  # pragma: no cover - the subprocess: import the helpers as a package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import _fsdp_model as fm
from tests import _ranks

TIMEOUT_S = 240
STEPS = 6


def _train(rank: int | None, cache: str) -> dict[str, object]:  # pragma: no cover - subprocess
    import manifoldparam as mp
    from manifoldparam.interop import replica_divergence

    calls = fm.count_maps()
    model, mdmm = fm.build()
    if rank is not None:
        fm.shard(model)
    if cache == "auto":
        mp.auto_cache(model)
    opt = fm.optimizer(model, mdmm)
    x, y = fm.data()
    x, y = fm.local(x, rank), fm.local(y, rank)
    losses = []
    calls.clear()
    with mp.cached() if cache == "block" else contextlib.nullcontext():
        for i in range(STEPS):
            losses.append(fm.step(model, mdmm, opt, x, y, rank is not None))
            if i == STEPS // 2:
                assert mp.rebase(model, opt) == 1
    counted = dict(calls)
    w = fm.weights(model)
    out: dict[str, object] = {
        "calls": counted,
        "losses": losses,
        "lambda": [float(v) for lam in mdmm.multipliers() for v in lam.detach().flatten()],
        "on_set": fm.set_errors(w),
    }
    if rank is not None:
        out["divergence"] = replica_divergence(model, mdmm)
    return {"out": out, "w": w}


def _stale(rank: int, cache: str) -> float:  # pragma: no cover - subprocess
    """A write to the shards between two no-grad forwards (an EMA-like update): the second
    forward's weights must be the new ones (FSDP gathers into the same objects, versions kept)."""
    import manifoldparam as mp

    model, _ = fm.build()
    fm.shard(model)
    if cache == "auto":
        mp.auto_cache(model)
    seen: dict[str, torch.Tensor] = {}

    def hook(module: torch.nn.Module, args: object) -> None:
        # after FSDP's own pre-forward hook (the gathered weight, read through the cache)
        seen[str(id(module))] = module.weight.detach().clone()

    for i in fm.LAYERS:
        model[i].register_forward_pre_hook(hook)
    x, _ = fm.data()
    with mp.cached() if cache == "block" else contextlib.nullcontext(), torch.no_grad():
        model(x)
        for p in model.parameters():
            p.mul_(0.5)
        model(x)
        after = dict(seen)
        mp.invalidate(model)
        with mp.cached(fresh=True) if cache == "block" else contextlib.nullcontext():
            model(x)  # (the stale entries dropped: what a fresh map gives)
    return max(float((after[k] - seen[k]).abs().max()) for k in seen)


def _mixed(rank: int) -> dict[str, object]:  # pragma: no cover - subprocess
    """bf16 parameters, fp32 reduction: the gathered bf16 weights on their sets to bf16."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    import manifoldparam as mp

    model, mdmm = fm.build(torch.float32)
    fm.shard(model, mp_policy=MixedPrecisionPolicy(torch.bfloat16, torch.float32))
    mp.auto_cache(model)
    seen: dict[str, torch.Tensor] = {}
    for i in fm.LAYERS:
        model[i].register_forward_pre_hook(
            lambda m, a, i=i: seen.__setitem__(str(i), m.weight.detach().clone())
        )
    opt = fm.optimizer(model, mdmm)
    x, y = fm.data(torch.float32)
    x, y = fm.local(x, rank), fm.local(y, rank)
    losses = []
    for i in range(STEPS):
        losses.append(fm.step(model, mdmm, opt, x, y, True))
        if i == STEPS // 2:
            mp.rebase(model, opt)
    with torch.no_grad():
        model(x)
    return {
        "dtype": str(seen["0"].dtype),
        "on_set": fm.set_errors(seen),
        "losses": losses,
        "vs_fp32": fm.max_diff(seen, fm.weights(model)),
    }


def _resharded(rank: int) -> dict[str, object]:  # pragma: no cover - subprocess
    """Every layer resharded after its forward: the MDMM's read of the SPD weight after the
    forward gathers the shards again (``DTensor.full_tensor``) and maps them a second time,
    and the gradient reaches the shards through that gather: still the one-process result."""
    from torch.distributed.fsdp import fully_shard

    import manifoldparam as mp

    calls = fm.count_maps()
    model, mdmm = fm.build()
    ref, ref_mdmm = fm.build()
    for i in fm.LAYERS:
        fully_shard(model[i])
    fully_shard(model)
    mp.auto_cache(model)
    opt, ref_opt = fm.optimizer(model, mdmm), fm.optimizer(ref, ref_mdmm)
    x, y = fm.data()
    for _ in range(3):
        calls.clear()
        fm.step(model, mdmm, opt, fm.local(x, rank), fm.local(y, rank), True)
        counted = dict(calls)
        fm.step(ref, ref_mdmm, ref_opt, x, y, False)
    lam = [float(v) for m in (mdmm, ref_mdmm) for v in next(iter(m.multipliers())).flatten()]
    return {
        "diff": fm.max_diff(fm.weights(model), fm.weights(ref)),
        "calls": counted,
        "lambda": lam,
    }


def _compiled(rank: int) -> dict[str, float]:  # pragma: no cover - subprocess
    """``torch.compile`` of the sharded model (FSDP2's hooks and the maps traced by Dynamo and
    AOTAutograd; the aot_eager backend: inductor's C++ build takes ~35 s a run on 2 busy cores,
    with the same result, see docs/distributed.md), with a rebase half way."""
    import manifoldparam as mp

    model, mdmm = fm.build()
    ref, ref_mdmm = fm.build()
    fm.shard(model)
    compiled = torch.compile(model, backend="aot_eager")
    opt, ref_opt = fm.optimizer(model, mdmm), fm.optimizer(ref, ref_mdmm)
    x, y = fm.data()
    for i in range(STEPS):
        fm.step(compiled, mdmm, opt, fm.local(x, rank), fm.local(y, rank), True)
        fm.step(ref, ref_mdmm, ref_opt, x, y, False)
        if i == STEPS // 2:
            mp.rebase(model, opt)
            mp.rebase(ref, ref_opt)
    w = fm.weights(model)
    return {"diff": fm.max_diff(w, fm.weights(ref)), "orthogonal": fm.set_errors(w)["orthogonal"]}


def _adapter_compiled(rank: int) -> float:  # pragma: no cover - subprocess
    """An OFT adapter sharded by FSDP2 and compiled (its blocks' exponential chooses the
    squarings inside the graph, a torch.cond; aot_eager, as in ``_compiled``: inductor's value
    is tests/test_skew_blocks.py's), against one eager process: the largest weight difference
    after a few Adam steps."""
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    import manifoldparam as mp

    def build() -> nn.Sequential:
        torch.manual_seed(0)
        m = nn.Sequential(
            mp.orthogonal_adapter(nn.Linear(16, 16), block_size=4), nn.Tanh(), nn.Linear(16, 2)
        ).to(fm.DT)
        with torch.no_grad():
            m[0].parametrizations.weight.original.normal_(0.0, 0.1)
        return m

    model, ref = build(), build()
    fully_shard(model[0])
    fully_shard(model)
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 16, dtype=fm.DT, generator=g)
    y = torch.randn(16, 2, dtype=fm.DT, generator=g)
    for _ in range(STEPS):  # (FSDP averages the ranks' gradients: each rank's mean loss)
        opt.zero_grad()
        (compiled(fm.local(x, rank)) - fm.local(y, rank)).square().mean().backward()
        opt.step()
        ref_opt.zero_grad()
        (ref(x) - y).square().mean().backward()
        ref_opt.step()
    with torch.no_grad():
        return float((model[0].weight - ref[0].weight).abs().max())  # (whole: a collective)


def _worker(rank: int, store: str, out_dir: str) -> None:  # pragma: no cover - subprocess

    _ranks.init(rank, store)
    report: dict[str, object] = {}
    for cache in ("auto", "block"):
        ref = _train(None, cache)
        got = _train(rank, cache)
        report[cache] = {
            "ref": ref["out"],
            "fsdp": got["out"],
            "diff": fm.max_diff(got["w"], ref["w"]),  # type: ignore[arg-type]
        }
        report[f"stale_{cache}"] = _stale(rank, cache)
    report["mixed"] = _mixed(rank)
    report["compiled"] = _compiled(rank)
    report["adapter_compiled"] = _adapter_compiled(rank)
    report["resharded"] = _resharded(rank)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    _ranks.finish()


def _main(store: str, out_dir: str) -> None:  # pragma: no cover - subprocess
    import torch.multiprocessing as tmp

    tmp.spawn(_worker, args=(store, out_dir), nprocs=2, join=True)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_fsdp2_two_cpu_ranks_train_like_one_process(tmp_path: Path) -> None:
    proc = _ranks.run_script(__file__, tmp_path, TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rep in reports:
        for cache in ("auto", "block"):
            ref, fsdp = rep[cache]["ref"], rep[cache]["fsdp"]
            # the gathered weights equal the one-process run's to round-off (float64)
            assert rep[cache]["diff"] < 1e-12, (cache, rep[cache]["diff"])
            assert fsdp["lambda"] == pytest.approx(ref["lambda"], abs=1e-12)
            assert fsdp["lambda"][0] != 0.0  # the soft constraint was active
            # each map once per step on each rank, as in one process (+1 orthogonal: rebase)
            assert (
                fsdp["calls"]
                == ref["calls"]
                == {
                    "Orthogonal": STEPS + 1,
                    "SPD": STEPS,
                    "Bounded": STEPS,
                    "Nonnegative": STEPS,
                }
            )
            assert fsdp["divergence"] == 0.0  # the ranks hold bit-identical weights
            assert fsdp["losses"][-1] < fsdp["losses"][0]
            on = fsdp["on_set"]
            assert on["orthogonal"] < 1e-12 and on["spd_asym"] == 0.0
            assert on["spd_min_eig"] > 0 and on["bounded_excess"] == 0.0
            assert on["nonneg_min"] >= 0
            # the write to the shards is seen: the weights equal a fresh map's
            assert rep[f"stale_{cache}"] == 0.0
        mixed = rep["mixed"]
        assert mixed["dtype"] == "torch.bfloat16"
        on = mixed["on_set"]
        assert on["orthogonal"] < 4e-2  # bf16: 8 significant bits (eps 7.8e-3), 6x6 sums
        # 0.4 itself is 0.400390625 in bf16: the box to bf16 rounding
        assert on["spd_min_eig"] > 0 and on["bounded_excess"] <= 0.400390625 - 0.4 + 1e-12
        assert on["nonneg_min"] >= 0
        assert mixed["vs_fp32"] < 2e-2  # the bf16 gather of the fp32 shards, mapped in fp32
        assert mixed["losses"][-1] < mixed["losses"][0]
        assert rep["compiled"]["diff"] < 1e-12 and rep["compiled"]["orthogonal"] < 1e-12
        assert rep["adapter_compiled"] < 1e-12
        resharded = rep["resharded"]
        assert resharded["diff"] < 1e-12
        assert resharded["lambda"][0] == pytest.approx(resharded["lambda"][1], abs=1e-12)
        # the SPD weight read again after the forward, from the shards: mapped twice a step
        assert resharded["calls"] == {"Orthogonal": 1, "SPD": 2, "Bounded": 1, "Nonnegative": 1}
    assert reports[0]["auto"]["fsdp"]["lambda"] == reports[1]["auto"]["fsdp"]["lambda"]


if __name__ == "__main__":  # pragma: no cover - the subprocess entry point
    _main(sys.argv[1], sys.argv[2])
