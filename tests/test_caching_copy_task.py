"""The copy-task example: the data match the task's definition, the kernel is computed once."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
copy_task = pytest.importorskip("copy_task")


def test_copy_batch_definition_and_baseline() -> None:
    length, batch = 7, 4
    x, y = copy_task.copy_batch(batch, length, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (length + 20, batch)
    symbols = x[:10]
    assert bool(((symbols >= 1) & (symbols <= 8)).all())
    assert bool((x[10 : 10 + length] == 0).all())
    assert bool((x[10 + length] == 9).all())
    assert bool((x[11 + length :] == 0).all())
    assert bool((y[: length + 10] == 0).all())
    assert torch.equal(y[length + 10 :], symbols)
    assert copy_task.baseline(100) == pytest.approx(0.1733, abs=5e-5)
    assert copy_task.baseline(100) == pytest.approx(10 * math.log(8) / 120)


def test_orthogonal_rnn_computes_its_kernel_once_per_forward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import manifoldparam as mp
    from manifoldparam.caching import cached

    model = copy_task.OrthogonalRNN(16)
    x, y = copy_task.copy_batch(3, 5, torch.Generator().manual_seed(0))
    calls = [0]
    original = mp.Orthogonal.map

    def counted(self: mp.Orthogonal, a: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return original(self, a)

    monkeypatch.setattr(mp.Orthogonal, "map", counted)
    with cached():
        logits = model(x)
        torch.nn.functional.cross_entropy(logits.reshape(-1, 9), y.reshape(-1)).backward()
    assert calls[0] == 1
    assert logits.shape == (25, 3, 9)
    w = model.rec.weight.detach()
    torch.testing.assert_close(w @ w.T, torch.eye(16), atol=1e-5, rtol=0)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_copy_task_trains_under_autocast(amp: str) -> None:
    """The example's --amp path: the kernel stays a float32 orthogonal matrix and the loss
    falls, as in float32 (benchmarks/mixed_precision.py runs the full comparison)."""
    import argparse

    pytest.importorskip("tqdm")
    args = argparse.Namespace(
        seed=0, batch=16, lr=1e-2, lr_orth=1e-3, iters=15, length=5, device="cpu", amp=amp
    )
    torch.manual_seed(0)
    model = copy_task.OrthogonalRNN(16)
    r = copy_task.train("orthogonal", model, args, cache="cached")
    losses = r["losses"]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.7 * losses[0]
    assert model.rec.weight.dtype == torch.float32
    assert r["orthogonality_error"] < 1e-5
