"""export(): plain modules for inference; the source model stays intact and trainable."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import manifoldparam as mp
from manifoldparam.interop import export
from manifoldparam.soft import constrain, rms, soft_constraints
from tests.conftest import assert_on_stiefel, assert_spd

DTYPE = torch.float64


def _plain() -> nn.Sequential:
    """The architecture, unconstrained (what an export loads into)."""
    return nn.Sequential(
        nn.Linear(5, 5, dtype=DTYPE),
        nn.Tanh(),
        nn.Linear(5, 5, bias=False, dtype=DTYPE),
        nn.Conv1d(1, 2, 3, dtype=DTYPE),
    )


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    m = _plain()
    mp.orthogonal(m[0])
    mp.bounded(m[0], "bias", low=-0.5, high=0.5)
    mp.spd(m[2])
    mp.nonnegative(m[3])
    constrain(m[2], "weight", rms, max=0.4)
    return m


def _x() -> torch.Tensor:
    return torch.randn(4, 1, 5, dtype=DTYPE, generator=torch.Generator().manual_seed(3))


def test_export_is_plain_and_equal_and_the_source_stays_intact_and_trainable() -> None:
    model = _model()
    x = _x()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = export(model)

    # plain modules, plain keys, same outputs
    assert [type(m) for m in plain] == [nn.Linear, nn.Tanh, nn.Linear, nn.Conv1d]
    assert not any(parametrize.is_parametrized(m) for m in plain.modules())
    assert set(plain.state_dict()) == {"0.weight", "0.bias", "2.weight", "3.weight", "3.bias"}
    assert torch.equal(plain(x), model(x))
    assert soft_constraints(plain) == []  # declarations dropped from the export

    # the source: untouched, still parametrized, still trains and keeps its constraints
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert type(model[0]).__name__ == "ParametrizedLinear"
    assert len(soft_constraints(model)) == 1
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(3):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(model[0].weight, plain[0].weight)
    assert_on_stiefel(model[0].weight)
    assert_spd(model[2].weight)
    assert bool((model[3].weight >= 0).all())

    # and the export is independent of the source's training
    assert torch.equal(plain[0].weight, export(_model())[0].weight)


def test_the_hazard_export_avoids_is_real() -> None:
    """deepcopy + remove_parametrizations on the copy deletes .weight on the *source*."""
    model = _model()
    naive = copy.deepcopy(model)
    parametrize.remove_parametrizations(naive[2], "weight", leave_parametrized=True)
    with pytest.raises(AttributeError):
        _ = model[2].weight  # the source's property went with the shared class

    model = _model()
    export(model)
    assert_spd(model[2].weight)


def test_export_pickles_and_its_state_loads_with_weights_only() -> None:
    model = _model()
    with pytest.raises(RuntimeError):  # torch refuses to pickle a parametrized model
        torch.save(model, io.BytesIO())
    plain = export(model, requires_grad=False).eval()
    assert not any(p.requires_grad for p in plain.parameters())
    buf = io.BytesIO()
    torch.save(plain, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    assert torch.equal(again(_x()), model(_x()))

    buf = io.BytesIO()
    torch.save(plain.state_dict(), buf)
    buf.seek(0)
    fresh = _plain()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh(_x()), model(_x()))


def test_export_keeps_requires_grad_buffers_and_other_libraries_parametrizations() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    nn.utils.parametrizations.orthogonal(m[0])  # torch's own
    mp.nonnegative(m[2], "bias")
    m[2].weight.requires_grad_(False)
    plain = export(m)
    assert type(plain[0]) is nn.Linear and plain[0].weight.requires_grad
    assert not plain[2].weight.requires_grad
    assert "1.running_mean" in plain.state_dict()
    m.eval()
    plain.eval()
    x = torch.randn(6, 4)
    torch.testing.assert_close(plain(x), m(x), rtol=0, atol=0)
    assert not plain.training and not m.training


def test_soft_declarations_can_be_kept() -> None:
    plain = export(_model(), keep_soft=True)
    (c,) = soft_constraints(plain)
    assert c.target is not None and c.target[0] is plain[2]  # rebound to the copy


def test_export_rejects_non_modules() -> None:
    with pytest.raises(TypeError, match=r"nn\.Module"):
        export({"weight": torch.zeros(2)})  # type: ignore[arg-type]


def test_jit_trace_records_the_maps_and_follows_the_originals() -> None:
    """``torch.jit.trace`` of a constrained model (the orthogonal map is traced as
    ``matrix_exp``: a Function with non-tensor outputs cannot be recorded): the trace equals the
    eager model, and re-reads the originals (a later change shows in both)."""
    model = _model()[:3]
    x = torch.randn(4, 5, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    traced = torch.jit.trace(model, x)
    torch.testing.assert_close(traced(x), model(x), atol=1e-12, rtol=0.0)
    with torch.no_grad():
        model[0].parametrizations.weight.original.add_(0.2)
    torch.testing.assert_close(traced(x), model(x), atol=1e-12, rtol=0.0)
