"""Box (tanh) and orthant (softplus/exp/square): membership with `<=` over random and extreme
coordinates, registration clamps, assignment, errors, gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.autograd import gradcheck

import manifoldparam as mp

DTYPES = [torch.float32, torch.float64]
EXTREME = [0.0, 1e-8, 1.0, 10.0, 1e4, 1e30]


@given(
    shape=st.sampled_from([(1,), (3,), (4, 5), (2, 3, 4)]),
    dtype=st.sampled_from(DTYPES),
    scale=st.sampled_from(EXTREME),
    tensor_bounds=st.booleans(),
)
def test_box_holds_for_any_coordinates(shape, dtype, scale, tensor_bounds):
    holder = nn.Module()
    holder.weight = nn.Parameter(torch.zeros(shape, dtype=dtype))
    if tensor_bounds:  # per-column bounds broadcast against the weight
        low = -torch.rand(shape[-1], dtype=dtype) - 0.1
        high = torch.rand(shape[-1], dtype=dtype) + 0.1
    else:
        low, high = -0.5, 2.0
    mp.bounded(holder, low=low, high=high)
    with torch.no_grad():
        orig = holder.parametrizations.weight.original
        orig.copy_(scale * torch.randn_like(orig))
    w = holder.weight
    low_t, high_t = torch.as_tensor(low, dtype=dtype), torch.as_tensor(high, dtype=dtype)
    assert bool(((low_t <= w) & (w <= high_t)).all())  # closed box: tanh saturates


def test_box_registration_clamps_and_keeps_inside_values():
    layer = nn.Linear(50, 40).double()
    w = layer.weight.detach().clone()
    mp.bounded(layer, low=-0.05, high=0.05)
    torch.testing.assert_close(layer.weight, w.clamp(-0.05, 0.05), atol=1e-15, rtol=1e-12)


def test_box_assignment_round_trip_boundary_and_rejection():
    layer = mp.bounded(nn.Linear(3, 2).double(), low=-1.0, high=1.0)
    target = torch.tensor([[-1.0, 0.0, 1.0], [0.25, -0.999, 0.5]], dtype=torch.float64)
    layer.weight = target  # values on the bounds are allowed and keep finite coordinates
    torch.testing.assert_close(layer.weight, target, atol=1e-15, rtol=0)
    assert bool(torch.isfinite(layer.parametrizations.weight.original).all())
    before = layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"Linear\.weight = X.*3 entries lie outside"):
        layer.weight = target * 1.5
    torch.testing.assert_close(layer.weight, before, atol=0, rtol=0)


@pytest.mark.parametrize(
    "low,high,match",
    [
        (1.0, 1.0, "low must be < high everywhere; 1 of 1"),
        (2.0, 1.0, "low must be < high"),
        (torch.tensor([0.0, 1.0, 0.0]), 0.5, "low must be < high everywhere; 1 of 3 entries"),
        (float("nan"), 1.0, "low must be finite"),
        (0.0, float("inf"), "high must be finite.*nonnegative"),
        (torch.zeros(7), 1.0, "must broadcast"),
        (torch.zeros(2, 2, 3), 1.0, "larger shape"),
    ],
)
def test_box_bad_bounds_are_refused_at_registration(low, high, match):
    layer = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"Linear\.weight: .*" + match):
        mp.bounded(layer, low=low, high=high)
    assert not torch.nn.utils.parametrize.is_parametrized(layer)


@pytest.mark.parametrize("map", ["softplus", "exp", "square"])
@given(dtype=st.sampled_from(DTYPES), scale=st.sampled_from(EXTREME))
def test_orthant_holds_for_any_coordinates(map, dtype, scale):
    layer = mp.nonnegative(nn.Linear(6, 5).to(dtype), map=map)
    with torch.no_grad():
        orig = layer.parametrizations.weight.original
        orig.copy_(scale * torch.randn_like(orig))
    x = orig.detach().double()
    exact = {"softplus": torch.nn.functional.softplus, "exp": torch.exp, "square": torch.square}
    overflows = bool((exact[map](x) > torch.finfo(dtype).max).any())
    if overflows:  # an Inf weight is named, never returned
        with pytest.raises(mp.NonFiniteError, match=r"Linear\.weight: .*the map overflowed"):
            layer.weight  # noqa: B018
        return
    w = layer.weight
    assert bool((w >= 0).all()) and bool(torch.isfinite(w).all())


@pytest.mark.parametrize("map", ["softplus", "exp", "square"])
def test_orthant_registration_clamps_and_assignment_round_trips(map):
    layer = nn.Linear(8, 6).double()
    w = layer.weight.detach().clone()
    mp.nonnegative(layer, map=map)
    torch.testing.assert_close(layer.weight, w.clamp_min(0), atol=1e-300, rtol=1e-12)
    target = torch.rand(6, 8, dtype=torch.float64)
    target[0, 0] = 0.0
    layer.weight = target
    torch.testing.assert_close(layer.weight, target, atol=1e-300, rtol=1e-12)
    assert bool(torch.isfinite(layer.parametrizations.weight.original).all())
    with pytest.raises(ValueError, match=r"Linear\.weight = X: X is not nonnegative: 1 entries"):
        layer.weight = target - 2.0 * (torch.arange(48).reshape(6, 8) == 5)


def test_orthant_unknown_map_is_refused():
    with pytest.raises(ValueError, match="map must be one of"):
        mp.nonnegative(nn.Linear(2, 2), map="relu")


@pytest.mark.parametrize(
    "make",
    [
        lambda lin: mp.bounded(lin, low=-2.0, high=torch.linspace(1, 3, 3, dtype=torch.float64)),
        lambda lin: mp.nonnegative(lin, map="softplus"),
        lambda lin: mp.nonnegative(lin, map="exp"),
        lambda lin: mp.nonnegative(lin, map="square"),
    ],
)
def test_gradcheck(make):
    lin = make(nn.Linear(3, 2).double())
    p = lin.parametrizations.weight[0]
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert gradcheck(p.map, (x,))
