"""Checkpoints that cannot hurt (issue 17): a load checks everything first and changes nothing
unless all of it fits; the error names the first offending key.

* torch's own ``model.load_state_dict``: what a checkpoint holds for a constrained attribute
  (coordinates, ``Bounded``'s ``low``/``high``, ``Orthogonal``'s ``base``) is checked by the
  attribute's load pre-hook before torch copies any of it (torch loads module by module, so
  only that attribute is guaranteed untouched);
* ``load_training_state`` / ``load_plain_state_dict``: model, optimizer, multipliers and RNG
  are left bit-identical by a load that fails.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import manifoldparam as mp
from manifoldparam.interop import load_plain_state_dict, load_training_state, training_state
from tests.conftest import assert_on_stiefel, via_bytes
from tests.test_interop_checkpoint import DTYPE, Plain, _setup, _train, constrained

BASE = "fc1.parametrizations.weight.0.base"
LOW, HIGH = "fc1.parametrizations.bias.0.low", "fc1.parametrizations.bias.0.high"


# --------------------------------------------------------------------- helpers
def _flat(obj: Any, path: str = "") -> list[tuple[str, Any]]:
    """Every leaf of nested dicts/lists, tensors cloned: a snapshot to compare bit for bit."""
    if isinstance(obj, Tensor):
        return [(path, obj.detach().clone())]
    if isinstance(obj, Mapping):
        return [x for k, v in obj.items() for x in _flat(v, f"{path}[{k!r}]")]
    if isinstance(obj, list | tuple):
        return [x for i, v in enumerate(obj) for x in _flat(v, f"{path}[{i}]")]
    return [(path, obj)]


def snapshot(
    model: nn.Module, opt: torch.optim.Optimizer | None = None, mdmm: nn.Module | None = None
) -> list[tuple[str, Any]]:
    parts: dict[str, Any] = {"model": model.state_dict(), "rng": torch.get_rng_state()}
    if opt is not None:
        parts["optimizer"] = opt.state_dict()
        parts["optimizes"] = [id(p) for g in opt.param_groups for p in g["params"]]
    if mdmm is not None:
        parts["multipliers"] = mdmm.state_dict()
    return _flat(parts)


def _bits(t: Tensor) -> Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_identical(before: list[tuple[str, Any]], after: list[tuple[str, Any]]) -> None:
    assert [p for p, _ in before] == [p for p, _ in after]
    for (path, a), (_, b) in zip(before, after, strict=True):
        if isinstance(a, Tensor):
            assert a.dtype == b.dtype and a.shape == b.shape, path
            assert torch.equal(_bits(a), _bits(b)), path  # bit for bit (NaN, -0.0 included)
        else:
            assert a == b, path


def refused(load: Callable[[], object]) -> str:
    """``"RuntimeError: <message>"`` of a load that must fail. Callers compare the state first,
    then the message, so that on the code before the fix a load that raised anyway (having
    already changed things) fails the test on the state."""
    with pytest.raises((RuntimeError, ValueError, TypeError)) as err:
        load()
    return f"{type(err.value).__name__}: {err.value}"


def corrupt(t: Tensor, how: str, index: int = 0, amount: float = 0.01) -> Tensor:
    """``t`` spoiled: ``nan``/``inf`` (entry ``index`` modulo the size), ``shape`` (one entry
    more), ``off`` (a base point scaled by ``1 + amount``, a bound moved by ``amount``),
    ``zeros`` / ``float`` (an RNG state)."""
    t = t.detach().clone()
    if how in ("nan", "inf"):
        t.view(-1)[index % t.numel()] = float(how)
        return t
    if how == "shape":
        flat = t.reshape(-1)
        return torch.cat([flat, flat[:1]])
    if how == "off":
        return t * (1 + amount) if t.dim() >= 2 else t + amount
    if how == "zeros":
        return torch.zeros_like(t)
    assert how == "float"
    return t.float()


def replaced(
    state: Mapping[str, Any], path: tuple[Any, ...], how: str, *args: Any
) -> dict[str, Any]:
    """A copy of ``state`` (copied along ``path`` only) with the leaf at ``path`` corrupted."""
    out = dict(state)
    node: Any = out
    for k in path[:-1]:
        node[k] = dict(node[k])
        node = node[k]
    node[path[-1]] = corrupt(node[path[-1]], how, *args)
    return out


#: Where in a tensor, and by how much (base points: a relative 1e-4 is 20x their tolerance).
entries = st.integers(0, 1000)
amounts = st.floats(1e-4, 0.5).flatmap(lambda a: st.sampled_from([a, -a]))  # (-B is orthogonal)


def named(message: str, part: str, path: tuple[Any, ...]) -> bool:
    """Whether the error names the entry (``state['optimizer']['state'][3]['exp_avg']``)."""
    if part in ("model", "multipliers"):
        return f"['{part}']" in message and repr(path[0]) in message
    return f"['{part}']" + "".join(f"[{k!r}]" for k in path) in message


# --------------------------------------------------------------------- torch's load_state_dict
def _plist_state(model: nn.Module, key: str) -> list[tuple[str, Any]]:
    prefix = key[: key.index("parametrizations.") + len("parametrizations.")]
    prefix += key[len(prefix) :].split(".", 1)[0] + "."
    return [(k, v.detach().clone()) for k, v in model.state_dict().items() if k.startswith(prefix)]


@pytest.mark.parametrize("assign", [False, True])
@pytest.mark.parametrize("strict", [True, False])
def test_a_base_point_off_the_set_is_refused_and_the_weight_stays_on_it(
    strict: bool, assign: bool
) -> None:
    model = constrained(seed=0)
    sd = dict(constrained(seed=1).state_dict())
    # the issue: a non-orthogonal base loaded silently and the weight ended 3.8e3 off the set
    sd[BASE] = torch.randn(5, 5, dtype=DTYPE) * 30
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"'fc1\.parametrizations\.weight\.0\.base' is not orth"):
        model.load_state_dict(sd, strict=strict, assign=assign)
    assert_identical(before, snapshot(model))  # fc1 loads first: nothing at all changed
    assert_on_stiefel(model.fc1.weight)


@pytest.mark.parametrize("assign", [False, True])
@pytest.mark.parametrize("key", [LOW, HIGH])
def test_bounds_other_than_the_declared_ones_are_refused_with_both_values_and_the_fix(
    key: str, assign: bool
) -> None:
    model = constrained(seed=0)
    sd = dict(constrained(seed=1).state_dict())
    sd[key] = torch.tensor(-0.25 if key == LOW else 2.0, dtype=DTYPE)
    before = _plist_state(model, key)
    with pytest.raises(RuntimeError) as err:
        model.load_state_dict(sd, assign=assign)
    message = str(err.value)
    name = "low" if key == LOW else "high"
    declared, loaded = ("-0.5", "-0.25") if key == LOW else ("0.5", "2.0")
    assert repr(key) in message
    assert f"{name} is {declared} here, {loaded} in the checkpoint" in message
    assert "manifoldparam.bounded(module, 'bias', low=..., high=...)" in message
    assert_identical(before, _plist_state(model, key))


@pytest.mark.parametrize("assign", [False, True])
def test_a_lower_precision_checkpoint_keeps_the_declared_bounds_exactly(assign: bool) -> None:
    """float32 checkpoint, float64 model: the same bounds rounded (0.1 is not a float32) are
    accepted and the declared float64 ones kept; the float32 base point is one of this set."""
    torch.manual_seed(0)
    source, model = Plain(), Plain()
    for m in (source, model):
        mp.orthogonal(m.fc1)
        mp.bounded(m.fc1, "bias", low=0.1, high=0.7)
    low = model.fc1.parametrizations.bias[0].low.clone()
    high = model.fc1.parametrizations.bias[0].high.clone()
    sd = {k: v.float() for k, v in source.state_dict().items()}
    assert not torch.equal(sd[LOW].double(), low)  # rounded: loading it would move the bound
    model.load_state_dict(sd, assign=assign)
    bias = model.fc1.parametrizations.bias[0]
    assert bias.low.dtype == bias.high.dtype == DTYPE
    assert torch.equal(bias.low, low) and torch.equal(bias.high, high)
    assert_on_stiefel(model.fc1.weight)  # (assign=True: float32, as torch assigns the dtype)


@pytest.mark.parametrize("strict", [True, False])
def test_misshaped_or_nonfinite_coordinates_change_nothing_of_the_attribute(strict: bool) -> None:
    model = constrained(seed=0)
    good = constrained(seed=1).state_dict()
    key = "fc1.parametrizations.weight.original"
    # wrong shape: torch skips `original` but copied the other checkpoint's base (unstrict too)
    for how, match in (("shape", r"has shape \(11,\); this constraint's has shape \(10,\)"),
                       ("nan", r"holds 1 NaN/Inf entries of 10")):  # fmt: skip
        sd = {**good, key: corrupt(good[key], how)}
        before = _plist_state(model, key)
        message = refused(lambda sd=sd: model.load_state_dict(sd, strict=strict))
        assert_identical(before, _plist_state(model, key))
        assert message.startswith("RuntimeError: Linear.weight") and re.search(match, message)


def _torch_cases() -> list[tuple[str, str]]:
    cases = []
    for key in constrained().state_dict():
        if "parametrizations." not in key:
            continue
        cases += [(key, how) for how in ("nan", "inf", "shape")]
        if key.endswith((".base", ".low", ".high")):
            cases.append((key, "off"))
    return cases


@given(
    case=st.sampled_from(_torch_cases()),
    index=entries,
    amount=amounts,
    strict=st.booleans(),
    assign=st.booleans(),
)
def test_any_corrupted_constrained_entry_is_refused_by_torchs_load(
    case: tuple[str, str], index: int, amount: float, strict: bool, assign: bool
) -> None:
    key, how = case
    model = constrained(seed=0)
    sd = dict(constrained(seed=1).state_dict())
    sd[key] = corrupt(sd[key], how, index, amount)
    before = _plist_state(model, key)
    message = refused(lambda: model.load_state_dict(sd, strict=strict, assign=assign))
    assert_identical(before, _plist_state(model, key))
    assert message.startswith("RuntimeError: Linear.") and repr(key) in message
    assert "Nothing of Linear." in message


# --------------------------------------------------------------------- load_training_state
@functools.cache
def _saved() -> tuple[dict[str, Any], list[float]]:
    """A training state after 3 steps (from a weights_only load) and the 3 losses after it."""
    rng = torch.get_rng_state()
    try:
        torch.manual_seed(5)
        model, mdmm, opt = _setup(0)
        _train(model, mdmm, opt, 3)
        state = via_bytes(training_state(model, opt, mdmm, step=3))
        return state, _train(model, mdmm, opt, 3)
    finally:
        torch.set_rng_state(rng)


def _target() -> tuple[Plain, Any, torch.optim.Optimizer]:
    """Another run, one step in: it has its own optimizer state and multipliers to keep."""
    model, mdmm, opt = _setup(1)
    _train(model, mdmm, opt, 1)
    return model, mdmm, opt


def _training_cases() -> list[tuple[str, tuple[Any, ...], str]]:
    state, _ = _saved()
    model, mdmm, _ = _setup(0)
    cases: list[tuple[str, tuple[Any, ...], str]] = []
    for part, module in (("model", model), ("multipliers", mdmm)):
        own = module.state_dict(keep_vars=True)
        for key in state[part]:
            cases += [(part, (key,), "nan"), (part, (key,), "shape")]
            if isinstance(own[key], nn.Parameter) or "parametrizations." in key:
                cases.append((part, (key,), "inf"))
            if key.endswith((".base", ".low", ".high")):
                cases.append((part, (key,), "off"))
    for index, entry in state["optimizer"]["state"].items():
        for name in entry:
            cases += [("optimizer", ("state", index, name), how) for how in ("nan", "inf")]
            if name != "step":
                cases.append(("optimizer", ("state", index, name), "shape"))
    cases += [("rng", ("cpu",), how) for how in ("shape", "zeros", "float")]
    return cases


@settings(max_examples=60)  # (87 cases; ~15 ms each)
@given(case=st.sampled_from(_training_cases()), index=entries, amount=amounts)
def test_any_corrupted_entry_of_a_training_state_changes_nothing(
    case: tuple[str, tuple[Any, ...], str], index: int, amount: float
) -> None:
    part, path, how = case
    state, _ = _saved()
    bad = replaced(state, (part, *path), how, index, amount)
    model, mdmm, opt = _target()
    before = snapshot(model, opt, mdmm)
    message = refused(lambda: load_training_state(bad, model, opt, mdmm))
    assert_identical(before, snapshot(model, opt, mdmm))
    assert message.startswith("RuntimeError: load_training_state: state[")
    assert named(message, part, path) and "Nothing was loaded" in message, message


def test_the_first_offending_key_is_named() -> None:
    state, _ = _saved()
    bad = replaced(state, ("model", "fc3.bias"), "nan")
    bad = replaced(bad, ("model", BASE), "off")  # earlier in the model's key order
    model, mdmm, opt = _target()
    before = snapshot(model, opt, mdmm)
    message = refused(lambda: load_training_state(bad, model, opt, mdmm))
    assert_identical(before, snapshot(model, opt, mdmm))
    assert "'fc1.parametrizations.weight.0.base' is not orthogonal" in message
    assert "fc3.bias" not in message


def test_after_a_refused_load_the_checkpoint_still_resumes_bit_for_bit() -> None:
    state, reference = _saved()
    model, mdmm, opt = _target()
    before = snapshot(model, opt, mdmm)
    message = refused(
        lambda: load_training_state(replaced(state, ("rng", "cpu"), "zeros"), model, opt, mdmm)
    )
    assert_identical(before, snapshot(model, opt, mdmm))  # the RNG was set last, before
    assert "state['rng']['cpu'] is not a CPU generator state" in message
    assert load_training_state(state, model, opt, mdmm) == {"step": 3}
    assert _train(model, mdmm, opt, 3) == reference


def test_optimizer_groups_that_do_not_match_change_nothing() -> None:
    state, _ = _saved()
    model, mdmm, _ = _target()
    one_group = torch.optim.Adam([*model.parameters(), *mdmm.parameters()], lr=0.05)
    before = snapshot(model, one_group, mdmm)
    message = refused(lambda: load_training_state(state, model, one_group, mdmm))
    assert_identical(before, snapshot(model, one_group, mdmm))  # the model loaded first, before
    assert "RuntimeError: load_training_state: state['optimizer']['param_groups'] has 2 " in message

    fewer = list(model.parameters())[:-1]
    opt = mdmm.make_optimizer(fewer, optimizer=torch.optim.Adam, lr=0.05)
    before = snapshot(model, opt, mdmm)
    message = refused(lambda: load_training_state(state, model, opt, mdmm))
    assert_identical(before, snapshot(model, opt, mdmm))
    assert re.search(r"\['param_groups'\]\[0\] has 5 parameters, .* 4", message)


def test_an_optimizer_that_rebinds_on_load_is_put_back_and_nothing_loads() -> None:
    class Rebinding(torch.optim.SGD):
        """Like an optimizer whose load_state_dict adopts the checkpoint's tensors."""

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            super().load_state_dict(state_dict)
            self.param_groups[0]["params"] = [
                p.detach().clone().requires_grad_() for p in self.param_groups[0]["params"]
            ]

    source = constrained(seed=1)
    saved = via_bytes(training_state(source, Rebinding(source.parameters(), lr=0.1, momentum=0.9)))
    model = constrained(seed=0)
    sgd = Rebinding(model.parameters(), lr=0.1, momentum=0.9)
    before = snapshot(model, sgd)
    message = refused(lambda: load_training_state(saved, model, sgd))
    assert_identical(before, snapshot(model, sgd))
    assert re.search(r"would not train the model.*put back as it was", message)
    assert [id(p) for p in sgd.param_groups[0]["params"]] == [id(p) for p in model.parameters()]


def test_a_torchzero_state_of_other_parameters_changes_nothing() -> None:
    tz = pytest.importorskip("torchzero")
    source = constrained(seed=1)
    saved = via_bytes(training_state(source, tz.Optimizer(source.parameters(), tz.m.Adam())))
    model = constrained(seed=0)
    opt = tz.Optimizer(list(model.parameters())[::-1], tz.m.Adam())  # another order
    before = snapshot(model)
    message = refused(lambda: load_training_state(saved, model, opt))
    assert_identical(before, snapshot(model))
    assert "in the same order" in message


# --------------------------------------------------------------------- load_plain_state_dict
def test_a_nonfinite_plain_value_changes_nothing() -> None:
    torch.manual_seed(3)
    sd = dict(Plain().state_dict())
    sd["fc3.weight"] = corrupt(sd["fc3.weight"], "nan")  # the last one assigned
    model = constrained(seed=0)
    before = snapshot(model)
    message = refused(lambda: load_plain_state_dict(model, sd))
    assert_identical(before, snapshot(model))  # fc1, fc2 were assigned first, before
    assert (
        "RuntimeError: load_plain_state_dict: state_dict['fc3.weight'] holds 1 NaN/Inf" in message
    )


def _plain_cases() -> list[tuple[str, str]]:
    own = constrained().state_dict(keep_vars=True)
    cases = []
    for key, value in own.items():
        cases += [(key, "nan"), (key, "shape")]
        if isinstance(value, nn.Parameter) or "parametrizations." in key:
            cases.append((key, "inf"))
        if key.endswith((".base", ".low", ".high")):
            cases.append((key, "off"))
    # a plain checkpoint's keys, loaded through the constraints
    plain = [k for k in Plain().state_dict() if k != "fc3.bias"]
    cases += [(k, how) for k in plain for how in ("nan", "inf", "shape")]
    return cases


@given(case=st.sampled_from(_plain_cases()), index=entries, amount=amounts)
def test_any_corrupted_entry_of_a_plain_load_changes_nothing(
    case: tuple[str, str], index: int, amount: float
) -> None:
    key, how = case
    if "parametrizations." in key or key == "fc3.bias":
        sd = dict(constrained(seed=1).state_dict())  # the constrained model's own keys
    else:
        sd = dict(Plain().state_dict())
    sd[key] = corrupt(sd[key], how, index, amount)
    model = constrained(seed=0)
    before = snapshot(model)
    message = refused(lambda: load_plain_state_dict(model, sd, warn=False))
    assert_identical(before, snapshot(model))
    assert message.startswith("RuntimeError: load_plain_state_dict") and repr(key) in message
