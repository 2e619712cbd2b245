"""Checkpoints: plain checkpoints into constrained models, bit-for-bit training resume."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

import manifoldparam as mp
from manifoldparam.interop import (
    ProjectedOnLoadWarning,
    export,
    load_plain_state_dict,
    load_training_state,
    training_state,
)
from manifoldparam.soft import MDMM, constrain, rms, soft_constraints
from tests.conftest import assert_on_stiefel, assert_spd, via_bytes

DTYPE = torch.float64


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 5, dtype=DTYPE)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(5, 5, bias=False, dtype=DTYPE)
        self.fc3 = nn.Linear(5, 2, dtype=DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.tanh(self.fc2(self.drop(torch.tanh(self.fc1(x))))))


def constrained(seed: int = 0) -> Plain:
    torch.manual_seed(seed)
    m = Plain()
    mp.orthogonal(m.fc1)
    mp.bounded(m.fc1, "bias", low=-0.5, high=0.5)
    mp.spd(m.fc2)
    mp.nonnegative(m.fc3)
    return m


def assert_constraints(m: Plain) -> None:
    assert_on_stiefel(m.fc1.weight)
    assert_spd(m.fc2.weight)
    assert bool(((m.fc1.bias >= -0.5) & (m.fc1.bias <= 0.5)).all())
    assert bool((m.fc3.weight >= 0).all())


# --------------------------------------------------------------------- plain checkpoints
def test_plain_checkpoint_loads_into_a_constrained_model_moved_and_said_so() -> None:
    torch.manual_seed(7)
    source = Plain()
    with torch.no_grad():
        source.fc1.bias.mul_(4.0)  # some entries outside the box
        source.fc3.weight[0, :2] = -0.3  # and below the orthant
    sd = via_bytes(source.state_dict())
    model = constrained()
    with pytest.warns(ProjectedOnLoadWarning, match=r"fc1\.weight") as rec:
        report = load_plain_state_dict(model, sd)
    message = str(rec[0].message)
    assert "fc2.weight" in message and "fc3.weight" in message and "fc1.bias" in message
    assert {p.key for p in report.moved} == {"fc1.weight", "fc1.bias", "fc2.weight", "fc3.weight"}
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert all(p.change > 0 and p.distance > 0 for p in report.moved)
    assert "moved by up to" in str(report)

    assert_constraints(model)
    # each value is the nearest point of its set to the checkpoint's value
    u, _, vh = torch.linalg.svd(sd["fc1.weight"])
    torch.testing.assert_close(model.fc1.weight, u @ vh, rtol=0, atol=1e-12)
    torch.testing.assert_close(model.fc1.bias, sd["fc1.bias"].clamp(-0.5, 0.5), rtol=0, atol=1e-15)
    torch.testing.assert_close(model.fc3.weight, sd["fc3.weight"].clamp_min(0), rtol=0, atol=1e-15)
    assert torch.equal(model.fc3.bias, sd["fc3.bias"])  # unconstrained: exact


def test_a_checkpoint_already_on_the_sets_loads_exactly_without_warning() -> None:
    source = constrained(seed=3)
    sd = via_bytes(export(source).state_dict())  # plain keys, values on the sets
    model = constrained(seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = load_plain_state_dict(model, sd)
    assert report.moved == [] and len(report.projected) == 4
    x = torch.randn(8, 5, dtype=DTYPE)
    model.eval()
    source.eval()
    torch.testing.assert_close(model(x), source(x), rtol=0, atol=1e-12)


def test_wrapper_prefixes_mixed_keys_and_strictness() -> None:
    torch.manual_seed(1)
    sd = {f"module.{k}": v for k, v in Plain().state_dict().items()}  # saved from DDP
    model = constrained()
    with pytest.warns(ProjectedOnLoadWarning):
        report = load_plain_state_dict(model, sd)
    assert report.stripped_prefix == "module."

    # a constrained model's own checkpoint loads through the same function, unchanged
    other = constrained(seed=5)
    model = constrained()
    load_plain_state_dict(model, other.state_dict())
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True)
    )

    # missing / unexpected: nothing is modified before the error
    model = constrained()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    partial = dict(Plain().state_dict())
    del partial["fc2.weight"]
    partial["extra.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"missing keys \['fc2\.weight'\].*extra\.weight"):
        load_plain_state_dict(model, partial)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.warns(ProjectedOnLoadWarning):
        report = load_plain_state_dict(model, partial, strict=False)
    assert report.missing_keys == ["fc2.weight"] and report.unexpected_keys == ["extra.weight"]
    assert torch.equal(model.fc2.weight, constrained().fc2.weight)

    bad = dict(Plain().state_dict())
    bad["fc1.weight"] = torch.zeros(3, 3, dtype=DTYPE)
    with pytest.raises(RuntimeError, match=r"shape \(3, 3\).*Linear\.weight"):
        load_plain_state_dict(model, bad)


def test_a_constrained_checkpoint_into_a_plain_model_says_what_to_do() -> None:
    with pytest.raises(RuntimeError, match="register the same constraints"):
        load_plain_state_dict(Plain(), constrained().state_dict())


# --------------------------------------------------------------------- training resume
def _setup(seed: int) -> tuple[Plain, MDMM, torch.optim.Optimizer]:
    model = constrained(seed)
    constrain(model.fc3, "weight", rms, eq=0.2, damping=5.0)
    mdmm = MDMM(soft_constraints(model))
    opt = mdmm.make_optimizer(model.parameters(), optimizer=torch.optim.Adam, lr=0.05)
    return model, mdmm, opt


def _train(model: Plain, mdmm: MDMM, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    g = torch.Generator().manual_seed(11)
    x, y = (
        torch.randn(32, 5, dtype=DTYPE, generator=g),
        torch.randn(32, 2, dtype=DTYPE, generator=g),
    )
    losses = []
    for _ in range(steps):
        out = mdmm(((model(x) - y) ** 2).mean())  # dropout draws from the global RNG
        opt.zero_grad()
        out.value.backward()
        opt.step()
        losses.append(float(out.value))
    return losses


def test_model_multipliers_optimizer_and_rng_resume_bit_for_bit() -> None:
    model, mdmm, opt = _setup(0)
    _train(model, mdmm, opt, 5)
    mp.rebase(model, opt)  # a base point that moved during training must be saved too
    state = via_bytes(training_state(model, opt, mdmm, step=5))  # weights_only=True load
    reference = _train(model, mdmm, opt, 5)

    model2, mdmm2, opt2 = _setup(1)  # a different start: everything must come from state
    extra = load_training_state(state, model2, opt2, mdmm2)
    assert extra == {"step": 5}
    resumed = _train(model2, mdmm2, opt2, 5)
    assert resumed == reference
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(mdmm.multipliers(), mdmm2.multipliers(), strict=True):
        assert torch.equal(a, b) and bool(a.abs().sum() > 0)
    assert_constraints(model2)


def test_load_training_state_errors() -> None:
    model, mdmm, opt = _setup(0)
    with pytest.raises(KeyError, match="multipliers"):
        load_training_state(training_state(model, opt), model, opt, mdmm)

    class Rebinding(torch.optim.SGD):
        """Like an optimizer whose load_state_dict adopts the checkpoint's tensors."""

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            super().load_state_dict(state_dict)
            self.param_groups[0]["params"] = [
                p.detach().clone().requires_grad_() for p in self.param_groups[0]["params"]
            ]

    sgd = Rebinding(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="would not train the model"):
        load_training_state(training_state(model, sgd), model, sgd)


# --------------------------------------------------------------------- torchzero resume
def _tz_setup(seed: int, chain: str) -> tuple[Plain, MDMM, Any]:
    tz = pytest.importorskip("torchzero")
    model = constrained(seed).eval()  # no dropout: BFGS's line search wants one function
    constrain(model.fc3, "weight", rms, eq=0.2, damping=5.0)
    mdmm = MDMM(soft_constraints(model))
    modules = [tz.m.Adam(), tz.m.LR(0.02)] if chain == "Adam" else [tz.m.BFGS(), tz.m.StrongWolfe()]
    return model, mdmm, tz.Optimizer(model.parameters(), *modules)


def _tz_train(model: Plain, mdmm: MDMM, opt: Any, rounds: int) -> list[float]:
    """The method of multipliers: 4 torchzero steps at fixed multipliers, then dual_update."""
    from manifoldparam.soft import dual_update

    g = torch.Generator().manual_seed(11)
    x = torch.randn(32, 5, dtype=DTYPE, generator=g)
    y = torch.randn(32, 2, dtype=DTYPE, generator=g)

    def closure(backward: bool = True) -> torch.Tensor:
        value = mdmm(((model(x) - y) ** 2).mean()).value
        if backward:
            opt.zero_grad()
            value.backward()
        return value

    losses = []
    for _ in range(rounds):
        losses += [float(opt.step(closure).detach()) for _ in range(4)]
        dual_update(mdmm)
    return losses


@pytest.mark.parametrize("chain", ["Adam", "BFGS"])
def test_torchzero_optimizer_resumes_bit_for_bit(chain: str) -> None:
    model, mdmm, opt = _tz_setup(0, chain)
    _tz_train(model, mdmm, opt, 2)
    saved = via_bytes(training_state(model, opt, mdmm))  # weights_only=True load
    reference = _tz_train(model, mdmm, opt, 2)

    # the hazard: torchzero's own load_state_dict adopts the checkpoint's (copied) tensors
    model2, mdmm2, opt2 = _tz_setup(1, chain)
    opt2.load_state_dict(saved["optimizer"])
    own = {id(p) for p in model2.parameters()}
    assert not any(id(p) in own for g in opt2.param_groups for p in g["params"])

    model2, mdmm2, opt2 = _tz_setup(1, chain)
    load_training_state(saved, model2, opt2, mdmm2)
    assert [id(p) for g in opt2.param_groups for p in g["params"]] == [
        id(p) for p in model2.parameters()
    ]
    assert _tz_train(model2, mdmm2, opt2, 2) == reference
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(mdmm.multipliers(), mdmm2.multipliers(), strict=True):
        assert torch.equal(a, b) and bool(a.abs().sum() > 0)
    assert_constraints(model2)

    # control: the same weights and multipliers with a fresh optimizer state do not resume
    model3, mdmm3, opt3 = _tz_setup(1, chain)
    model3.load_state_dict(saved["model"])
    mdmm3.load_state_dict(saved["multipliers"])
    assert _tz_train(model3, mdmm3, opt3, 2) != reference
