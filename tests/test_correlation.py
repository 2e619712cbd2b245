"""mp.correlation: the chart is onto (inverse then map gives the matrix back), the diagonal is
exactly one, registration scales a positive definite weight to unit diagonal, and bad input.
(The generic contract runs on the correlation cases of tests/cases.py.)"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.autograd import gradcheck

import manifoldparam as mp

DT = torch.float64


def random_correlation(n: int, seed: int, batch: tuple[int, ...] = ()) -> torch.Tensor:
    """D^{-1/2} G D^{-1/2} for a random Gram matrix G (independent of the library)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*batch, n, n + 2, generator=g, dtype=DT)
    gram = a @ a.mT
    d = gram.diagonal(dim1=-2, dim2=-1).rsqrt()
    c = gram * d.unsqueeze(-1) * d.unsqueeze(-2)
    c = 0.5 * (c + c.mT)
    return torch.where(torch.eye(n, dtype=torch.bool), torch.ones_like(c), c)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 7), seed=st.integers(0, 2**16))
def test_every_correlation_matrix_is_reached(n: int, seed: int) -> None:
    c = random_correlation(n, seed, (2,))
    p = mp.hard.Correlation((2, n, n))
    x = p.inverse(c)
    assert x.shape == (2, n * (n - 1) // 2)
    torch.testing.assert_close(p.map(x), c, atol=1e-13, rtol=0)


def test_the_diagonal_is_exactly_one_and_the_matrix_definite() -> None:
    p = mp.hard.Correlation((6, 6))
    x = 3.0 * torch.randn(15, generator=torch.Generator().manual_seed(0))
    c = p.map(x)
    assert torch.equal(c.diagonal(), torch.ones(6)) and torch.equal(c, c.T)
    assert float(torch.linalg.eigvalsh(c.double()).min()) > 0


def test_gradcheck_batched() -> None:
    p = mp.hard.Correlation((3, 5, 5))
    x = torch.randn(3, 10, dtype=DT, requires_grad=True)
    assert gradcheck(p.map, (x,))


def test_registration_scales_a_definite_weight_to_unit_diagonal() -> None:
    c = random_correlation(4, 1)
    s = torch.tensor([0.5, 2.0, 3.0, 1.5], dtype=DT)
    m = nn.Linear(4, 4, bias=False).double()
    with torch.no_grad():
        m.weight.copy_(s[:, None] * c * s[None, :])
    mp.correlation(m)
    torch.testing.assert_close(m.weight, c, atol=1e-14, rtol=0)


def test_an_indefinite_weight_lands_on_the_set() -> None:
    m = nn.Linear(5, 5).double()
    with torch.no_grad():
        m.weight.copy_(-torch.eye(5, dtype=DT) + 0.1)
    mp.correlation(m)
    w = m.weight.detach()
    assert torch.equal(w.diagonal(), torch.ones(5, dtype=DT))
    assert bool((torch.linalg.cholesky_ex(w).info == 0).all())


def test_assignment_off_the_diagonal_is_refused() -> None:
    m = mp.correlation(nn.Linear(3, 3).double())
    bad = random_correlation(3, 2) + 0.01 * torch.eye(3, dtype=DT)
    with pytest.raises(ValueError, match=r"Linear\.weight = X: .*\|diag C - 1\|"):
        m.weight = bad
    target = random_correlation(3, 3)
    m.weight = target
    torch.testing.assert_close(m.weight, target, atol=1e-14, rtol=0)


def test_a_rectangular_weight_is_refused() -> None:
    m = nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"Linear\.weight: correlation needs square matrices"):
        mp.correlation(m)
    assert not torch.nn.utils.parametrize.is_parametrized(m)
