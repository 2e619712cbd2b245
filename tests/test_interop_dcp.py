"""Distributed checkpoints (``torch.distributed.checkpoint``) of FSDP2 constrained training.

The test runs this file as a script in a subprocess with a timeout; the script spawns two
ranks that train the model of ``_fsdp_model`` sharded (multipliers and Adam state included),
save a sharded checkpoint through :class:`manifoldparam.interop.TrainingState`, train on, then
load the checkpoint into a fresh sharded model (cached, its old weights read just before) and
train the same steps: bit-exact. The test process then loads the same files into one plain,
unsharded model (``no_dist=True``): the weights as saved, and training resumes to the two-rank
result up to round-off.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

if __name__ == "__main__":  # pragma: no cover - the subprocess: import the helpers as a package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import _fsdp_model as fm
from tests import _ranks

TIMEOUT_S = 180
BEFORE, AFTER = 3, 3  # steps before the checkpoint, and resumed after it


def _worker(rank: int, store: str, out_dir: str) -> None:  # pragma: no cover - subprocess
    import torch.distributed.checkpoint as dcp

    import manifoldparam as mp
    from manifoldparam.interop import TrainingState

    _ranks.init(rank, store)
    x, y = fm.data()
    x, y = fm.local(x, rank), fm.local(y, rank)
    ckpt = str(Path(out_dir, "ckpt"))

    model, mdmm = fm.build()
    fm.shard(model)
    mp.auto_cache(model)
    opt = fm.optimizer(model, mdmm)
    for i in range(BEFORE):
        fm.step(model, mdmm, opt, x, y, True)
        if i == 1:
            mp.rebase(model, opt)
    saved = fm.weights(model)
    saved_lambda = [lam.detach().clone() for lam in mdmm.multipliers()]
    dcp.save({"train": TrainingState(model, opt, mdmm)}, checkpoint_id=ckpt)
    losses = [fm.step(model, mdmm, opt, x, y, True) for _ in range(AFTER)]
    resumed_ref = fm.weights(model)

    # a fresh sharded model, trained elsewhere first, its cached weights read (no grad)
    model2, mdmm2 = fm.build()
    fm.shard(model2)
    mp.auto_cache(model2)
    opt2 = fm.optimizer(model2, mdmm2)
    fm.step(model2, mdmm2, opt2, -x, y, True)
    seen: dict[str, torch.Tensor] = {}
    for i in fm.LAYERS:
        model2[i].register_forward_pre_hook(
            lambda m, a, i=i: seen.__setitem__(str(i), m.weight.detach().clone())
        )
    with torch.no_grad():
        model2(x)
    before_load = fm.max_diff(seen, saved)
    dcp.load({"train": TrainingState(model2, opt2, mdmm2)}, checkpoint_id=ckpt)
    with torch.no_grad():
        model2(x)  # the weights FSDP gathers and the cache gives after the load
    loaded_read = fm.max_diff(seen, saved)
    loaded = fm.max_diff(fm.weights(model2), saved)
    lambda_loaded = all(
        torch.equal(a, b) for a, b in zip(mdmm2.multipliers(), saved_lambda, strict=True)
    )
    losses2 = [fm.step(model2, mdmm2, opt2, x, y, True) for _ in range(AFTER)]
    report = {
        "before_load": before_load,
        "loaded_read": loaded_read,
        "loaded": loaded,
        "lambda_loaded": lambda_loaded,
        "resumed": fm.max_diff(fm.weights(model2), resumed_ref),
        "losses": losses,
        "losses2": losses2,
        "lambda": [float(v) for lam in mdmm2.multipliers() for v in lam.detach().flatten()],
        "saved": {k: v.tolist() for k, v in saved.items()},
        "resumed_weights": {k: v.tolist() for k, v in resumed_ref.items()},
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    _ranks.finish()


def _main(store: str, out_dir: str) -> None:  # pragma: no cover - subprocess
    import torch.multiprocessing as tmp

    tmp.spawn(_worker, args=(store, out_dir), nprocs=2, join=True)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # no_dist load
def test_dcp_sharded_save_loads_on_two_ranks_and_on_one(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    import manifoldparam as mp
    from manifoldparam.interop import TrainingState

    proc = _ranks.run_script(__file__, tmp_path, TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rep in reports:
        assert rep["before_load"] > 1e-3  # the fresh model held other weights
        # the load is what the next (cached, no-grad) forward sees, and what a read gives
        assert rep["loaded_read"] == 0.0 and rep["loaded"] == 0.0
        assert rep["lambda_loaded"] and rep["lambda"][0] != 0.0
        # resumed on 2 ranks: bit-exact (weights, multipliers, Adam state, step counts)
        assert rep["resumed"] == 0.0 and rep["losses2"] == rep["losses"]
    assert reports[0]["lambda"] == reports[1]["lambda"]

    # one process, no process group, no sharding: the same files
    model, mdmm = fm.build()
    mp.auto_cache(model)
    opt = fm.optimizer(model, mdmm)
    dcp.load(
        {"train": TrainingState(model, opt, mdmm)}, checkpoint_id=tmp_path / "ckpt", no_dist=True
    )
    saved = {k: torch.tensor(v, dtype=fm.DT) for k, v in reports[0]["saved"].items()}
    assert fm.max_diff(fm.weights(model), saved) == 0.0
    x, y = fm.data()
    losses = [fm.step(model, mdmm, opt, x, y, False) for _ in range(AFTER)]
    resumed = {k: torch.tensor(v, dtype=fm.DT) for k, v in reports[0]["resumed_weights"].items()}
    # the whole batch's mean gradient here, the mean of the two halves' there: round-off
    assert fm.max_diff(fm.weights(model), resumed) < 1e-12
    assert losses == pytest.approx(
        [(a + b) / 2 for a, b in zip(reports[0]["losses"], reports[1]["losses"], strict=True)],
        abs=1e-12,
    )


if __name__ == "__main__":  # pragma: no cover - the subprocess entry point
    _main(sys.argv[1], sys.argv[2])


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_training_state_of_a_fresh_mdmm_optimizer_round_trips_in_one_process(
    tmp_path: Path,
) -> None:
    """torch's get_state_dict makes a fresh optimizer's state by a step at lr=0 (which the
    multipliers' check rejected before); the state then round-trips through DCP files."""
    import torch.distributed.checkpoint as dcp

    import manifoldparam as mp
    from manifoldparam.interop import TrainingState

    model, mdmm = fm.build()
    opt = fm.optimizer(model, mdmm)
    before = fm.weights(model)
    state = TrainingState(model, opt, mdmm).state_dict()  # a fresh optimizer: no state yet
    assert fm.max_diff(fm.weights(model), before) == 0.0  # that step moved nothing
    assert "mdmm.0.lmbda" in state["model"]
    x, y = fm.data()
    for _ in range(2):
        fm.step(model, mdmm, opt, x, y, False)
    dcp.save({"train": TrainingState(model, opt, mdmm)}, checkpoint_id=tmp_path, no_dist=True)
    saved, lam = fm.weights(model), [t.clone() for t in mdmm.multipliers()]
    after = [fm.step(model, mdmm, opt, x, y, False) for _ in range(2)]

    model2, mdmm2 = fm.build()
    mp.auto_cache(model2)
    opt2 = fm.optimizer(model2, mdmm2)
    dcp.load({"train": TrainingState(model2, opt2, mdmm2)}, checkpoint_id=tmp_path, no_dist=True)
    assert fm.max_diff(fm.weights(model2), saved) == 0.0
    assert all(torch.equal(a, b) for a, b in zip(mdmm2.multipliers(), lam, strict=True))
    assert [fm.step(model2, mdmm2, opt2, x, y, False) for _ in range(2)] == after
