"""DDP (gloo, 2 CPU ranks on loopback): constrained weights and multipliers stay identical.

The test runs this file as a script in a subprocess with a timeout; the script spawns two
ranks, each trains on its own data shard and writes a JSON report. Two ways of handling the
multipliers are checked, each against a control without the synchronisation: first-order
MDMM ascent (``all_reduce_grads``) and the method of multipliers (``dual_update`` on
``all_reduce_mean`` of the constraint values).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

if __name__ == "__main__":  # pragma: no cover - the subprocess: import the helpers as a package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import _ranks

TIMEOUT_S = 240
STEPS = 12
ROUNDS, INNER = 4, 20  # method of multipliers: dual updates, Adam steps between two


def _worker(rank: int, store: str, out_dir: str) -> None:  # pragma: no cover - subprocess
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    import manifoldparam as mp
    from manifoldparam.interop import (
        all_reduce_grads,
        all_reduce_mean,
        broadcast_module,
        global_closure,
        replica_divergence,
    )
    from manifoldparam.soft import (
        MDMM,
        EqConstraint,
        constrain,
        dual_update,
        rms,
        soft_constraints,
    )

    _ranks.init(rank, store)
    dtype = torch.float64

    def setup(
        broadcast_buffers: bool = True,
    ) -> tuple[nn.Module, DDP, MDMM, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(4, 4, dtype=dtype), nn.Tanh(), nn.Linear(4, 4, bias=False, dtype=dtype)
        )
        mp.orthogonal(model[0])
        mp.spd(model[2])
        constrain(model[2], "weight", rms, max=0.3, damping=5.0)  # params only
        last: dict[str, torch.Tensor] = {}
        # a data-dependent constraint: its value differs between ranks' shards
        out_mean = EqConstraint(lambda: last["out"].mean(), 0.1, damping=5.0)
        mdmm = MDMM([*soft_constraints(model), out_mean])
        if rank == 1:  # rank-local perturbations that DDP / broadcast_module must undo
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.5)
                for lam in mdmm.multipliers():
                    lam.fill_(3.0)
        # broadcasts rank 0's parameters (and, by default, its buffers at every forward)
        ddp = DDP(model, broadcast_buffers=broadcast_buffers)
        broadcast_module(mdmm)
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
        x = torch.randn(16, 4, dtype=dtype, generator=g)
        y = torch.randn(16, 4, dtype=dtype, generator=g)
        return model, ddp, mdmm, last, x, y

    def build(sync: bool, broadcast_buffers: bool = True, dual: str = "gda") -> dict[str, object]:
        model, ddp, mdmm, last, x, y = setup(broadcast_buffers)
        opt = mdmm.make_optimizer(ddp.parameters(), optimizer=torch.optim.Adam, lr=0.05, dual=dual)
        start = end = 0.0
        for step in range(STEPS):
            out = ddp(x)
            last["out"] = out
            loss = ((out - y) ** 2).mean()
            ret = mdmm(loss)
            opt.zero_grad()
            ret.value.backward()
            if sync:
                all_reduce_grads(mdmm.parameters())
            opt.step()
            if step == STEPS // 2:
                mp.rebase(model, opt)  # every rank moves its base point identically
            start = float(loss) if step == 0 else start
            end = float(loss)
        div = replica_divergence(model, mdmm)
        w = model[0].weight.detach()
        return {
            "divergence": div,
            "start": start,
            "end": end,
            "orth": float((w.T @ w - torch.eye(4, dtype=dtype)).abs().max()),
            "spd_min_eig": float(torch.linalg.eigvalsh(model[2].weight.detach()).min()),
            "lambda": [float(lam) for lam in mdmm.multipliers()],
            "broadcast_buffers": ddp.broadcast_buffers,
        }

    def multipliers_method(sync: bool) -> dict[str, object]:
        """Adam on the model alone at fixed multipliers, then a closed-form dual update."""
        model, ddp, mdmm, last, x, y = setup()
        opt = torch.optim.Adam(ddp.parameters(), lr=0.05)

        def global_gap() -> float:  # |mean over all shards of out.mean() - 0.1|
            with torch.no_grad():
                last["out"] = ddp(x)
                return abs(float(all_reduce_mean([last["out"].mean()])[0]) - 0.1)

        gap_start = global_gap()
        for _ in range(ROUNDS):
            for _ in range(INNER):
                out = ddp(x)
                last["out"] = out
                ret = mdmm(((out - y) ** 2).mean())
                opt.zero_grad()
                ret.value.backward()
                opt.step()
            with torch.no_grad():
                last["out"] = ddp(x)
                fn_values = [c.evaluate() for c in mdmm]
            dual_update(mdmm, all_reduce_mean(fn_values) if sync else fn_values)
        return {
            "model_divergence": replica_divergence(model),
            "multiplier_divergence": replica_divergence(mdmm),
            "lambda": [float(lam) for lam in mdmm.multipliers()],
            "gap": [gap_start, global_gap()],
        }

    def lbfgs_line_search() -> dict[str, object]:
        """LBFGS with a strong-Wolfe line search on each rank's shard, closure wrapped in
        global_closure: the ranks evaluate the same number of times and stay identical."""
        model, ddp, _, _, x, y = setup()
        opt = torch.optim.LBFGS(ddp.parameters(), lr=1, max_iter=8, line_search_fn="strong_wolfe")
        calls = [0]
        local: list[float] = []

        @global_closure
        @mp.cached_closure
        def closure() -> torch.Tensor:
            calls[0] += 1
            opt.zero_grad()
            loss = ((ddp(x) - y) ** 2).mean()
            loss.backward()
            local.append(float(loss.detach()))
            return loss

        start = float(closure().detach())
        for _ in range(3):
            end = float(opt.step(closure).detach())
        w = model[0].weight.detach()
        return {
            "divergence": replica_divergence(model),
            "calls": calls[0],
            "start": start,
            "end": end,
            "first_local": local[0],
            "orth": float((w.T @ w - torch.eye(4, dtype=dtype)).abs().max()),
        }

    report = {
        "lbfgs": lbfgs_line_search(),
        "synced": build(sync=True),
        "no_buffer_broadcast": build(sync=True, broadcast_buffers=False),
        "unsynced": build(sync=False),
        "pi_synced": build(sync=True, dual="pi"),
        "pi_unsynced": build(sync=False, dual="pi"),
        "mom_synced": multipliers_method(sync=True),
        "mom_unsynced": multipliers_method(sync=False),
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    _ranks.finish()


def _main(store: str, out_dir: str) -> None:  # pragma: no cover - subprocess
    import torch.multiprocessing as tmp

    tmp.spawn(_worker, args=(store, out_dir), nprocs=2, join=True)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_ddp_two_cpu_ranks_keep_constrained_weights_and_multipliers_identical(
    tmp_path: Path,
) -> None:
    proc = _ranks.run_script(__file__, tmp_path, TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rep in reports:
        synced = rep["synced"]
        assert synced["divergence"] == 0.0  # bit-identical weights, buffers, multipliers
        assert synced["end"] < synced["start"]
        assert synced["orth"] < 1e-10
        assert synced["spd_min_eig"] > 0
        # without averaging the multipliers' gradients, the data-dependent one drifts apart
        assert rep["unsynced"]["divergence"] > 1e-6
        # DDP(broadcast_buffers=False) sends no buffers (base points, index maps) at any
        # forward: the base changes only at rebase/assignment, which every rank computes from
        # the same coordinates, so the weights stay bit-identical without that traffic
        quiet = rep["no_buffer_broadcast"]
        assert quiet["broadcast_buffers"] is False
        assert quiet["divergence"] == 0.0 and quiet["end"] < quiet["start"]
        assert quiet["orth"] < 1e-10
    assert reports[0]["synced"]["lambda"] == reports[1]["synced"]["lambda"]
    assert reports[0]["synced"]["lambda"][1] != 0.0
    # the νPI controller reads the averaged gradients (its error) on every rank: identical
    # multipliers and controller state; without the averaging they drift apart
    for rep in reports:
        assert rep["pi_synced"]["divergence"] == 0.0
        assert rep["pi_unsynced"]["divergence"] > 1e-6
    assert reports[0]["pi_synced"]["lambda"] == reports[1]["pi_synced"]["lambda"]
    assert reports[0]["pi_synced"]["lambda"] != reports[0]["synced"]["lambda"]
    assert reports[0]["synced"]["end"] != reports[1]["synced"]["end"]  # different shards

    # method of multipliers: dual_update on all_reduce_mean(fn values) keeps weights and
    # multipliers bit-identical, and moves the global (all-shard) constraint towards 0.1
    for rep in reports:
        mom = rep["mom_synced"]
        assert mom["model_divergence"] == 0.0 and mom["multiplier_divergence"] == 0.0
        assert mom["gap"][1] < 0.5 * mom["gap"][0]
    assert reports[0]["mom_synced"]["lambda"] == reports[1]["mom_synced"]["lambda"]
    assert reports[0]["mom_synced"]["lambda"][1] != 0.0
    # control: each rank's own constraint value gives each rank its own multiplier (DDP still
    # averages the weights' gradients, so only the multipliers show it)
    for rep in reports:
        assert rep["mom_unsynced"]["multiplier_divergence"] > 1e-6
    assert reports[0]["mom_unsynced"]["lambda"][1] != reports[1]["mom_unsynced"]["lambda"][1]

    # LBFGS + strong Wolfe through global_closure: each rank's own loss differs, the returned
    # (global) one does not, so both ranks make the same number of evaluations and the same
    # steps (without the wrapper the ranks' collectives fall out of step)
    lb = [rep["lbfgs"] for rep in reports]
    assert lb[0]["first_local"] != lb[1]["first_local"]
    assert lb[0]["start"] == lb[1]["start"] and lb[0]["end"] == lb[1]["end"]
    assert lb[0]["calls"] == lb[1]["calls"] > 4
    for r in lb:
        assert r["divergence"] == 0.0 and r["orth"] < 1e-10
        assert r["end"] < 0.9 * r["start"]


if __name__ == "__main__":  # pragma: no cover - the subprocess entry point
    _main(sys.argv[1], sys.argv[2])
