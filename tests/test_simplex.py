"""The probability simplex: the Euclidean projection against a bisection oracle, closed forms
of the map, layouts, one-hot values, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import manifoldparam as mp
from manifoldparam.hard.simplex import project_simplex

DT = torch.float64


def bisection_projection(v: torch.Tensor) -> torch.Tensor:
    """KKT of min ‖w - v‖² on the simplex: w = max(v - τ, 0) with Σ w = 1; τ by bisection
    (Σ max(v - τ, 0) decreases in τ). Independent of the sort-based formula."""
    lo, hi = v.min(-1, keepdim=True).values - 1.0, v.max(-1, keepdim=True).values
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        above = (v - mid).clamp_min(0).sum(-1, keepdim=True) > 1
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return (v - 0.5 * (lo + hi)).clamp_min(0)


@given(n=st.integers(2, 40), rows=st.integers(1, 5), scale=st.sampled_from([0.01, 1.0, 100.0]))
def test_the_projection_is_the_euclidean_one(n, rows, scale) -> None:
    g = torch.Generator().manual_seed(n * 31 + rows)
    v = scale * torch.randn(rows, n, generator=g, dtype=DT)
    torch.testing.assert_close(project_simplex(v), bisection_projection(v), atol=1e-12, rtol=0)


def test_zero_coordinates_are_uniform_and_coordinates_are_log_ratios() -> None:
    m = nn.Linear(4, 2, bias=False).double()
    nn.init.constant_(m.weight, 0.25)
    mp.simplex(m)
    assert float(m.parametrizations.weight.original.detach().abs().max()) == 0.0
    p = m.parametrizations.weight[0]
    w = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]], dtype=DT)
    m.weight = w
    x = m.parametrizations.weight.original.detach()
    torch.testing.assert_close(x, torch.log(w[:, :-1] / w[:, -1:]), atol=1e-14, rtol=0)
    torch.testing.assert_close(p.map(x), w, atol=1e-15, rtol=0)
    assert x.shape == (2, 3)


def test_registration_keeps_the_nearest_point_lifted_to_the_floor() -> None:
    m = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[2.0, 0.5, -1.0]]))
    mp.simplex(m)
    # Euclidean projection: (1, 0, 0); the zeros lifted to √eps, then renormalised
    floor = torch.finfo(DT).eps ** 0.5
    want = torch.tensor([[1.0, floor, floor]], dtype=DT) / (1 + 2 * floor)
    torch.testing.assert_close(m.weight.detach(), want, atol=1e-15, rtol=0)


def test_a_one_hot_value_assigns_with_finite_coordinates() -> None:
    m = mp.simplex(nn.Linear(3, 2, bias=False))
    one_hot = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    m.weight = one_hot
    assert bool(torch.isfinite(m.parametrizations.weight.original).all())
    torch.testing.assert_close(m.weight.detach(), one_hot, atol=1e-30, rtol=0)


@pytest.mark.parametrize(
    ("shape", "dim"), [((5,), 0), ((3, 4), 0), ((2, 3, 4), 1), ((2, 3, 4), -1)]
)
def test_layouts_sum_to_one_along_dim(shape, dim) -> None:
    torch.manual_seed(0)
    m = nn.Module()
    m.weight = nn.Parameter(torch.rand(shape, dtype=DT))
    mp.simplex(m, dim=dim)
    w = m.weight.detach()
    torch.testing.assert_close(w.sum(dim), torch.ones_like(w.sum(dim)), atol=1e-14, rtol=0)
    assert bool((w > 0).all())
    n = shape[dim]
    assert m.parametrizations.weight.original.numel() == w.numel() // n * (n - 1)


def test_off_simplex_assignment_is_refused_naming_the_attribute() -> None:
    m = mp.simplex(nn.Linear(3, 2))
    with pytest.raises(
        ValueError, match=r"Linear\.weight = X: X is not in the probability simplex"
    ):
        m.weight = torch.tensor([[0.5, 0.5, 0.5], [1.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match=r"1 negative entries"):
        m.weight = torch.tensor([[1.5, -0.5, 0.0], [1.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dim": 2}, ValueError, r"Linear\.weight: dim=2 is out of range.*simplex\(module"),
        ({"dim": None}, TypeError, r"Linear\.weight: dim must be an int"),
    ],
)
def test_bad_dim_is_refused(kwargs, error, match) -> None:
    m = nn.Linear(3, 2)
    with pytest.raises(error, match=match):
        mp.simplex(m, **kwargs)
    assert not torch.nn.utils.parametrize.is_parametrized(m)


def test_a_dim_of_size_one_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"Linear\.weight: dim 0 has size 1.*dim=\.\.\."):
        mp.simplex(nn.Linear(3, 1), dim=0)
