"""Low rank (at most r) and fixed rank (exactly r): the truncated SVD as the nearest point,
r(n + m - r) coordinates with a full-rank Jacobian, layouts, rank-deficient weights, bad
input, checkpoints of the factors' base points and rebase."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.autograd.functional import jacobian

import manifoldparam as mp

DT = torch.float64
BOTH = [mp.low_rank, mp.fixed_rank]


@given(n=st.integers(1, 8), m=st.integers(1, 8), data=st.data())
def test_registration_keeps_the_truncated_svd(n, m, data) -> None:
    """Eckart--Young from numpy's SVD (an independent implementation)."""
    rank = data.draw(st.integers(1, min(n, m)))
    g = torch.Generator().manual_seed(n * 97 + m * 13 + rank)
    layer = nn.Linear(m, n, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n, m, generator=g, dtype=DT))
    w0 = layer.weight.detach().numpy().copy()
    mp.low_rank(layer, rank=rank)
    u, s, vt = np.linalg.svd(w0, full_matrices=False)
    want = (u[:, :rank] * s[:rank]) @ vt[:rank]
    np.testing.assert_allclose(layer.weight.detach().numpy(), want, atol=1e-12, rtol=0)
    assert layer.parametrizations.weight.original.numel() == rank * (n + m - rank)


@pytest.mark.parametrize("constrain", BOTH)
@pytest.mark.parametrize(("n", "m", "rank"), [(1, 1, 1), (4, 4, 4), (6, 3, 1), (3, 7, 2)])
def test_minimal_coordinates_have_no_dead_direction(constrain, n, m, rank) -> None:
    torch.manual_seed(n + m + rank)
    layer = constrain(nn.Linear(m, n, bias=False).double(), rank=rank)
    p = layer.parametrizations.weight[0]
    x = 0.5 * torch.randn_like(layer.parametrizations.weight.original.detach())
    jac = jacobian(p.map, x).reshape(n * m, -1)
    sv = torch.linalg.svdvals(jac)
    assert int((sv > 1e-9 * sv.max()).sum()) == p.dim == rank * (n + m - rank)


def test_fixed_rank_lifts_a_rank_deficient_weight_to_rank_r() -> None:
    layer = nn.Linear(4, 5, bias=False).double()
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[0, 0] = 2.0  # rank 1
    mp.fixed_rank(layer, rank=3)
    s = torch.linalg.svdvals(layer.weight.detach())
    floor = torch.finfo(DT).eps ** 0.5 * 2.0
    torch.testing.assert_close(
        s[:3], torch.tensor([2.0, floor, floor], dtype=DT), rtol=1e-6, atol=0
    )
    assert float(s[3]) < 1e-15
    with pytest.raises(
        ValueError, match=r"Linear\.weight = X: X is not of rank exactly r: .*below 3"
    ):
        layer.weight = torch.zeros(5, 4, dtype=DT)


def test_low_rank_reaches_rank_deficient_and_sign_flipped_values() -> None:
    layer = mp.low_rank(nn.Linear(3, 3, bias=False).double(), rank=3)
    for value in (
        torch.zeros(3, 3, dtype=DT),
        -torch.eye(3, dtype=DT),
        torch.diag(torch.tensor([1.0, -2.0, 0.0], dtype=DT)),
    ):
        layer.weight = value
        torch.testing.assert_close(layer.weight.detach(), value, atol=1e-14, rtol=0)


@pytest.mark.parametrize("constrain", BOTH)
def test_a_conv_weight_is_the_matrix_out_by_rest(constrain) -> None:
    torch.manual_seed(0)
    conv = constrain(nn.Conv2d(3, 8, 3).double(), rank=2)
    mat = conv.weight.detach().reshape(8, 27)
    s = torch.linalg.svdvals(mat)
    assert float(s[2]) < 1e-12 and float(s[1]) > 1e-3
    assert conv(torch.randn(1, 3, 5, 5, dtype=DT)).shape == (1, 8, 3, 3)


@pytest.mark.parametrize("constrain", BOTH)
def test_an_assignment_of_higher_rank_is_refused_naming_the_attribute(constrain) -> None:
    layer = constrain(nn.Linear(4, 4), rank=2)
    with pytest.raises(
        ValueError, match=r"Linear\.weight = X: X is not of rank .* 4 singular values"
    ):
        layer.weight = torch.eye(4)


@pytest.mark.parametrize("constrain", BOTH)
@pytest.mark.parametrize(
    ("rank", "error", "match"),
    [
        (4, ValueError, r"Linear\.weight: rank=4 is not in 1\.\.3 .*rank=r\) with 1 <= r <= 3"),
        (0, ValueError, r"rank=0 is not in 1\.\.3"),
        (2.0, TypeError, r"rank must be an int"),
    ],
)
def test_bad_rank_is_refused(constrain, rank, error, match) -> None:
    layer = nn.Linear(5, 3)
    w = layer.weight.detach().clone()
    with pytest.raises(error, match=match):
        constrain(layer, rank=rank)
    assert not torch.nn.utils.parametrize.is_parametrized(layer)
    assert torch.equal(layer.weight, w)


def test_the_error_names_the_constructor() -> None:
    with pytest.raises(ValueError, match=r"manifoldparam\.fixed_rank\(module, 'weight'"):
        mp.fixed_rank(nn.Linear(2, 2), rank=3)
    with pytest.raises(ValueError, match=r"Linear\.bias: low_rank needs a matrix"):
        mp.low_rank(nn.Linear(2, 2), "bias", rank=1)


def test_rebase_and_a_checkpoint_with_a_non_orthogonal_base() -> None:
    torch.manual_seed(1)
    layer = mp.fixed_rank(nn.Linear(6, 5).double(), rank=2)
    with torch.no_grad():
        layer.parametrizations.weight.original.normal_()
    before = layer.weight.detach().clone()
    assert mp.rebase(layer) == 1
    torch.testing.assert_close(layer.weight.detach(), before, atol=1e-12, rtol=0)
    state = layer.state_dict()
    assert {"parametrizations.weight.0.u.base", "parametrizations.weight.0.v.base"} <= set(state)
    state["parametrizations.weight.0.v.base"] = 2 * state["parametrizations.weight.0.v.base"]
    with pytest.raises(
        RuntimeError,
        match=r"Linear\.weight: .*'parametrizations\.weight\.0\.v\.base' is not orthogonal",
    ):
        layer.load_state_dict(state)
    torch.testing.assert_close(layer.weight.detach(), before, atol=1e-12, rtol=0)
