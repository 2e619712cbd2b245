"""Symmetric and skew-symmetric matrices: the coordinates are the (strict) lower triangle,
batches, the nearest point, assignment of values symmetric only to round-off, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import manifoldparam as mp

DT = torch.float64


def batch_module(shape: tuple[int, ...]) -> nn.Module:
    m = nn.Module()
    m.weight = nn.Parameter(torch.randn(shape, dtype=DT))
    return m


@pytest.mark.parametrize("shape", [(1, 1), (4, 4), (2, 3, 3), (2, 2, 5, 5)])
def test_symmetric_coordinates_are_the_lower_triangle_of_the_symmetric_part(shape) -> None:
    torch.manual_seed(0)
    m = batch_module(shape)
    w0 = m.weight.detach().clone()
    mp.symmetric(m)
    n = shape[-1]
    sym = 0.5 * (w0 + w0.mT)
    assert torch.equal(m.weight, m.weight.mT)
    torch.testing.assert_close(m.weight.detach(), sym, atol=0, rtol=0)
    rows, cols = torch.tril_indices(n, n)
    assert torch.equal(m.parametrizations.weight.original, sym[..., rows, cols])


@pytest.mark.parametrize("shape", [(2, 2), (5, 5), (3, 4, 4)])
def test_skew_coordinates_are_the_strict_lower_triangle_of_the_skew_part(shape) -> None:
    torch.manual_seed(1)
    m = batch_module(shape)
    w0 = m.weight.detach().clone()
    mp.skew(m)
    n = shape[-1]
    sk = 0.5 * (w0 - w0.mT)
    assert torch.equal(m.weight, -m.weight.mT)
    torch.testing.assert_close(m.weight.detach(), sk, atol=0, rtol=0)
    rows, cols = torch.tril_indices(n, n, offset=-1)
    assert torch.equal(m.parametrizations.weight.original, sk[..., rows, cols])
    assert m.parametrizations.weight.original.shape[-1] == n * (n - 1) // 2


@given(n=st.integers(2, 24), seed=st.integers(0, 2**16))
def test_values_symmetric_to_round_off_are_accepted_in_float32(n, seed) -> None:
    """``A @ A.T`` and ``(B - B.T) * c`` computed in float32 (a GEMM need not round (i, j) and
    (j, i) alike) assign; the stored weight is exactly (skew-)symmetric."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g)
    s = mp.symmetric(nn.Linear(n, n, bias=False))
    s.weight = a @ a.T
    assert torch.equal(s.weight, s.weight.T)
    k = mp.skew(nn.Linear(n, n, bias=False))
    b = torch.randn(n, n, generator=g)
    k.weight = (b - b.T) * 0.37
    assert torch.equal(k.weight, -k.weight.T)


def test_the_generator_of_a_rotation() -> None:
    """exp of a skew weight is orthogonal with det 1: the usual use of the set."""
    k = mp.skew(nn.Linear(6, 6, bias=False).double())
    q = torch.linalg.matrix_exp(k.weight.detach())
    torch.testing.assert_close(q @ q.T, torch.eye(6, dtype=DT), atol=1e-12, rtol=0)
    assert abs(float(torch.linalg.det(q)) - 1.0) < 1e-12


@pytest.mark.parametrize("constrain", [mp.symmetric, mp.skew])
def test_off_set_assignment_is_refused_naming_the_attribute(constrain) -> None:
    m = constrain(nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"Linear\.weight = X: X is not .*symmetric.*relative"):
        m.weight = torch.triu(torch.ones(3, 3))


@pytest.mark.parametrize("constrain", [mp.symmetric, mp.skew])
def test_a_rectangular_weight_is_refused_with_the_fix(constrain) -> None:
    m = nn.Linear(3, 4)
    with pytest.raises(ValueError, match=r"Linear\.weight: .* needs a square matrix.*nn\.Linear"):
        constrain(m)
    assert not torch.nn.utils.parametrize.is_parametrized(m)


def test_a_1x1_skew_weight_is_refused() -> None:
    with pytest.raises(ValueError, match=r"Linear\.weight: a 1x1 skew-symmetric matrix is 0"):
        mp.skew(nn.Linear(1, 1))


def test_registration_keeps_a_nearer_point_than_geotorch() -> None:
    """geotorch's symmetric/skew keep the lower triangle of the weight (mirrored); ours keep
    the nearest point, the (skew-)symmetric part: nearer in Frobenius norm, for the same
    weight. Both lie on the set."""
    geotorch = pytest.importorskip("geotorch")
    torch.manual_seed(3)
    for ours, theirs in ((mp.symmetric, geotorch.symmetric), (mp.skew, geotorch.skew)):
        a, b = nn.Linear(5, 5).double(), nn.Linear(5, 5).double()
        with torch.no_grad():
            b.weight.copy_(a.weight)
        w0 = a.weight.detach().clone()
        ours(a)
        theirs(b, "weight")
        sign = 1.0 if theirs is geotorch.symmetric else -1.0
        for m in (a, b):
            torch.testing.assert_close(m.weight, sign * m.weight.mT, atol=1e-15, rtol=0)
        d_ours = float((a.weight - w0).norm())
        d_theirs = float((b.weight - w0).norm())
        assert d_ours < d_theirs
