"""Checkpoints that cannot hurt (issue 17): a load checks everything first and changes nothing
unless all of it fits; the error names the first offending key.

* torch's own ``model.load_state_dict``: what a checkpoint holds for a constrained attribute
  (coordinates, ``Bounded``'s ``low``/``high``, ``Orthogonal``'s ``base``) is checked by the
  attribute's load pre-hook before torch copies any of it (torch loads module by module, so
  only that attribute is guaranteed untouched).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import manifoldparam as mp
from tests.conftest import assert_on_stiefel
from tests.test_interop_checkpoint import DTYPE, Plain, constrained

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
