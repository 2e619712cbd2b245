"""The sphere and the oblique manifold: closed forms of the map, layouts (whole tensor, rows,
columns, a middle dim of a 3-D weight), bad input, rebase and the geoopt oracle."""

from __future__ import annotations

import math

import geoopt
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import manifoldparam as mp

DT = torch.float64


def param(m: nn.Module, name: str = "weight") -> mp.hard.Sphere:
    p = m.parametrizations[name][0]
    assert isinstance(p, mp.hard.Sphere)
    return p


def test_zero_coordinates_are_the_base_and_a_coordinate_line_is_a_great_circle() -> None:
    """map(0) = r·p; map(t·e_i) = r(cos t·p + sin t·u_i), u_i unit and orthogonal to p; at
    t = π the antipode -r·p (the map reaches the whole sphere)."""
    torch.manual_seed(0)
    m = mp.sphere(nn.Linear(5, 1, bias=False).double(), radius=3.0)
    p = param(m)
    base = m.weight.detach().clone() / 3.0
    x = torch.zeros(1, 4, dtype=DT)
    torch.testing.assert_close(p.map(x), 3.0 * base, atol=1e-15, rtol=0)
    for i in range(4):
        e = torch.zeros(1, 4, dtype=DT)
        e[0, i] = 1.0
        u = p.map(1e-7 * e) - p.map(-1e-7 * e)  # the tangent direction of coordinate i
        u = u / u.norm()
        assert abs(float((u * base).sum())) < 1e-8
        for t in (0.3, 1.0, 2.5):
            want = 3.0 * (math.cos(t) * base + math.sin(t) * u)
            torch.testing.assert_close(p.map(t * e), want, atol=1e-7, rtol=0)
        torch.testing.assert_close(p.map(math.pi * e), -3.0 * base, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    ("shape", "dim"),
    [((7,), None), ((4, 6), None), ((4, 6), -1), ((4, 6), 0), ((3, 4, 5), 1), ((2, 3, 4), -1)],
)
def test_layouts_keep_the_weight_normalised_with_n_minus_1_coordinates_per_vector(
    shape, dim
) -> None:
    torch.manual_seed(1)
    m = nn.Module()
    m.weight = nn.Parameter(torch.randn(shape, dtype=DT))
    before = m.weight.detach().clone()
    mp.sphere(m, dim=dim, radius=0.5)
    w = m.weight.detach()
    if dim is None:
        norms, want = w.norm(), before / before.norm()
        n = before.numel()
    else:
        norms = torch.linalg.vector_norm(w, dim=dim)
        want = before / torch.linalg.vector_norm(before, dim=dim, keepdim=True)
        n = shape[dim]
    torch.testing.assert_close(norms, torch.full_like(norms, 0.5), atol=1e-14, rtol=0)
    torch.testing.assert_close(w, 0.5 * want, atol=1e-14, rtol=0)
    assert m.parametrizations.weight.original.numel() == before.numel() // n * (n - 1)


@given(seed=st.integers(0, 2**16), scale=st.sampled_from([1e-3, 1.0, 10.0, 1e3]))
def test_any_coordinates_land_on_geoopts_sphere(seed, scale) -> None:
    """Far from the base too: cosine and sine are bounded, so nothing drifts off the set."""
    m = mp.sphere(nn.Linear(9, 4).float(), dim=-1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        orig = m.parametrizations.weight.original
        orig.copy_(scale * torch.randn(orig.shape, generator=g))
    ok, why = geoopt.Sphere().check_point_on_manifold(
        m.weight.detach(), atol=1e-6, rtol=0, explain=True
    )
    assert ok, why
    assert param(m).manifold is not None


def test_a_zero_vector_becomes_e1_and_assignment_resets_the_base() -> None:
    m = nn.Linear(3, 2, bias=False).double()
    with torch.no_grad():
        m.weight.zero_()
        m.weight[1] = torch.tensor([0.0, 3.0, 4.0])
    mp.sphere(m, dim=-1)
    want = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]], dtype=DT)
    torch.testing.assert_close(m.weight.detach(), want, atol=1e-15, rtol=0)
    q = torch.tensor([[0.0, 0.0, -1.0], [0.6, -0.8, 0.0]], dtype=DT)
    m.weight = q
    torch.testing.assert_close(m.weight.detach(), q, atol=1e-15, rtol=0)
    assert float(m.parametrizations.weight.original.detach().abs().max()) == 0.0


def test_rebase_moves_the_base_to_the_current_weight() -> None:
    torch.manual_seed(2)
    m = mp.sphere(nn.Linear(6, 3).double(), dim=-1)
    with torch.no_grad():
        m.parametrizations.weight.original.normal_()
    before = m.weight.detach().clone()
    assert mp.rebase(m) == 1
    torch.testing.assert_close(m.weight.detach(), before, atol=1e-14, rtol=0)
    assert float(m.parametrizations.weight.original.detach().abs().max()) == 0.0


def test_an_off_sphere_assignment_is_refused_naming_the_attribute() -> None:
    m = mp.sphere(nn.Linear(4, 3), dim=-1)
    with pytest.raises(ValueError, match=r"Linear\.weight = X: X is not on the sphere: 3 of 3"):
        m.weight = 2 * torch.eye(3, 4)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"radius": 0.0}, ValueError, r"Linear\.weight: radius must be finite and > 0.*radius="),
        ({"radius": -1.0}, ValueError, r"radius must be finite and > 0"),
        ({"radius": float("inf")}, ValueError, r"radius must be finite"),
        ({"radius": "1"}, TypeError, r"radius must be a number"),
        ({"dim": 2}, ValueError, r"Linear\.weight: dim=2 is out of range.*dim=None"),
        ({"dim": 1.0}, TypeError, r"dim must be None or an int"),
    ],
)
def test_bad_options_are_refused_before_anything_changes(kwargs, error, match) -> None:
    m = nn.Linear(4, 3)
    w = m.weight.detach().clone()
    with pytest.raises(error, match=match):
        mp.sphere(m, **kwargs)
    assert not torch.nn.utils.parametrize.is_parametrized(m)
    assert torch.equal(m.weight, w)


def test_vectors_of_one_entry_are_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"Linear\.weight: a sphere needs vectors of at least 2"):
        mp.sphere(nn.Linear(1, 3), dim=-1)
    with pytest.raises(ValueError, match=r"Linear\.bias: .*one entry"):
        mp.sphere(nn.Linear(3, 1), "bias")


def test_manifold_is_geoopts_sphere_only_where_its_layout_matches() -> None:
    assert isinstance(param(mp.sphere(nn.Linear(3, 2), dim=-1)).manifold, geoopt.Sphere)
    assert param(mp.sphere(nn.Linear(3, 2), dim=0)).manifold is None
    assert param(mp.sphere(nn.Linear(3, 2), dim=-1, radius=2.0)).manifold is None
    assert isinstance(param(mp.sphere(nn.Linear(3, 2), "bias"), "bias").manifold, geoopt.Sphere)


def test_a_checkpoint_with_a_zero_base_row_is_refused() -> None:
    m = mp.sphere(nn.Linear(4, 3), dim=-1)
    state = m.state_dict()
    state["parametrizations.weight.0.base"] = torch.zeros(3, 4)
    with pytest.raises(RuntimeError, match=r"Linear\.weight: .*zero row.*Nothing of"):
        m.load_state_dict(state)
