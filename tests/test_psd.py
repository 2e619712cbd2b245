"""PSD of full and bounded rank: the nearest point in closed form, singular values reached,
the trapezoidal factor's coordinate count, batches, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.autograd.functional import jacobian

import manifoldparam as mp

DT = torch.float64


def square(n: int) -> nn.Linear:
    return nn.Linear(n, n, bias=False).double()


def test_the_nearest_point_zeroes_negative_and_small_eigenvalues() -> None:
    """diag(3, -1, 2, 0.5) in a random basis: rank 2 keeps (3, 2), full rank drops -1."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=DT))
    lam = torch.tensor([3.0, -1.0, 2.0, 0.5], dtype=DT)
    for rank, keep in ((2, [3.0, 0.0, 2.0, 0.0]), (None, [3.0, 0.0, 2.0, 0.5])):
        m = square(4)
        with torch.no_grad():
            m.weight.copy_((q * lam) @ q.T)
        mp.psd(m, rank=rank)
        want = (q * torch.tensor(keep, dtype=DT)) @ q.T
        torch.testing.assert_close(m.weight.detach(), want, atol=1e-13, rtol=0)


@given(n=st.integers(1, 9), data=st.data())
def test_any_psd_matrix_of_rank_at_most_r_assigns_and_reads_back(n, data) -> None:
    rank = data.draw(st.integers(1, n))
    true_rank = data.draw(st.integers(0, rank))  # singular ones too (0: the zero matrix)
    g = torch.Generator().manual_seed(n * 100 + rank * 10 + true_rank)
    b = torch.randn(n, true_rank, generator=g, dtype=DT)
    target = b @ b.T
    m = mp.psd(square(n), rank=rank)
    m.weight = target
    torch.testing.assert_close(m.weight.detach(), target, atol=1e-12, rtol=0)
    orig = m.parametrizations.weight.original
    assert orig.numel() == n * rank - rank * (rank - 1) // 2


@pytest.mark.parametrize(("n", "rank"), [(1, None), (3, 1), (5, 3), (6, 6)])
def test_minimal_coordinates_have_no_dead_direction(n, rank) -> None:
    torch.manual_seed(n)
    m = mp.psd(square(n), rank=rank)
    p = m.parametrizations.weight[0]
    x = torch.randn_like(m.parametrizations.weight.original.detach())
    jac = jacobian(p.map, x).reshape(n * n, -1)
    s = torch.linalg.svdvals(jac)
    assert int((s > 1e-9 * s.max()).sum()) == p.dim == x.numel()


def test_a_batch_of_matrices() -> None:
    torch.manual_seed(1)
    m = nn.Module()
    m.weight = nn.Parameter(torch.randn(2, 3, 4, 4, dtype=DT))
    mp.psd(m, rank=2)
    lam = torch.linalg.eigvalsh(m.weight.detach())
    assert float(lam.min()) > -1e-12 and bool((lam[..., :2].abs() < 1e-12).all())
    assert m.parametrizations.weight.original.shape == (2, 3, 7)


def test_off_set_assignment_is_refused_naming_the_attribute() -> None:
    m = mp.psd(square(3), rank=1)
    with pytest.raises(ValueError, match=r"Linear\.weight = X: X is not positive semidefinite"):
        m.weight = torch.eye(3, dtype=DT)  # PSD, but rank 3
    with pytest.raises(ValueError, match=r"smallest eigenvalue -1"):
        m.weight = -torch.eye(3, dtype=DT)


@pytest.mark.parametrize(
    ("rank", "error", "match"),
    [
        (4, ValueError, r"Linear\.weight: rank=4 is not in 1\.\.3.*rank=None"),
        (0, ValueError, r"rank=0 is not in 1\.\.3"),
        (1.5, TypeError, r"rank must be None or an int"),
    ],
)
def test_bad_rank_is_refused(rank, error, match) -> None:
    m = nn.Linear(3, 3)
    w = m.weight.detach().clone()
    with pytest.raises(error, match=match):
        mp.psd(m, rank=rank)
    assert not torch.nn.utils.parametrize.is_parametrized(m) and torch.equal(m.weight, w)


def test_a_rectangular_weight_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"Linear\.weight: psd needs a square.*low_rank"):
        mp.psd(nn.Linear(3, 4))
