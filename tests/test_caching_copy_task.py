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
    original = mp.Orthogonal._map

    def counted(self: mp.Orthogonal, a: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return original(self, a)

    monkeypatch.setattr(mp.Orthogonal, "_map", counted)
    with cached():
        logits = model(x)
        torch.nn.functional.cross_entropy(logits.reshape(-1, 9), y.reshape(-1)).backward()
    assert calls[0] == 1
    assert logits.shape == (25, 3, 9)
    w = model.rec.weight.detach()
    torch.testing.assert_close(w @ w.T, torch.eye(16), atol=1e-5, rtol=0)
