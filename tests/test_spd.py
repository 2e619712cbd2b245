"""SPD through Cholesky: membership (geoopt + Cholesky oracle), floor, minimal coordinates,
projection at registration, assignment, gradients."""

from __future__ import annotations

import geoopt
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.autograd import gradcheck
from torch.autograd.functional import jacobian

import manifoldparam as mp
from tests.conftest import assert_spd


def square(n: int, dtype: torch.dtype = torch.float64) -> nn.Linear:
    return nn.Linear(n, n, bias=False).to(dtype)


def param(module: nn.Module) -> mp.SPD:
    p = module.parametrizations.weight[0]
    assert isinstance(p, mp.SPD)
    return p


@given(
    n=st.integers(1, 32),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    scale=st.sampled_from([0.0, 1e-3, 1.0, 5.0]),
    floor=st.sampled_from([0.0, 1e-3, 1.0]),
)
def test_any_coordinates_land_on_spd_above_the_floor(n, dtype, scale, floor):
    m = mp.spd(square(n, dtype), min_eigenvalue=floor)
    with torch.no_grad():
        orig = m.parametrizations.weight.original
        orig.copy_(scale * torch.randn_like(orig))
    w = m.weight.detach()
    assert torch.equal(w, w.mT)  # symmetric to the bit
    # Eigenvalues exceed the floor up to the round-off of forming W = LLᵀ + εI (relative to
    # ‖W‖): huge coordinates make W as ill-conditioned as the dtype allows, which is what the
    # floor is for.
    slack = 10 * n * torch.finfo(dtype).eps * float(w.abs().max())
    assert float(torch.linalg.eigvalsh(w.double()).min()) >= floor - slack
    if scale <= 1.0:  # well-conditioned: the full oracle, Cholesky included
        assert_spd(w, floor=max(0.0, floor - slack))


def test_very_negative_diagonal_coordinates_keep_the_floor():
    m = mp.spd(square(6), min_eigenvalue=1e-3)
    with torch.no_grad():
        m.parametrizations.weight.original.fill_(-60.0)  # softplus -> ~1e-26
    assert float(torch.linalg.eigvalsh(m.weight.detach()).min()) >= 1e-3 * (1 - 1e-12)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_minimal_coordinates_have_no_dead_direction(n):
    m = mp.spd(square(n))
    dim = n * (n + 1) // 2
    assert m.parametrizations.weight.original.shape == (dim,)
    x = torch.randn(dim, dtype=torch.float64)
    jac = jacobian(param(m).map, x).reshape(n * n, dim)
    assert int(torch.linalg.matrix_rank(jac)) == dim


def test_registration_keeps_an_spd_weight():
    m = square(5)
    a = torch.randn(5, 5, dtype=torch.float64)
    with torch.no_grad():
        m.weight.copy_(a @ a.T + 0.5 * torch.eye(5, dtype=torch.float64))
    before = m.weight.detach().clone()
    mp.spd(m)
    torch.testing.assert_close(m.weight, before, atol=1e-12, rtol=1e-12)


def test_registration_projects_a_non_spd_weight():
    m = square(6)
    w = m.weight.detach().clone()
    mp.spd(m, min_eigenvalue=0.1)
    assert_spd(m.weight, floor=0.1)
    # nearest point: same eigenvectors as the symmetric part, eigenvalues lifted
    sym = 0.5 * (w + w.T)
    lam, vec = torch.linalg.eigh(sym)
    lam_new = torch.linalg.eigvalsh(m.weight.detach())
    expected = torch.sort(torch.clamp(lam, min=0.1)).values
    torch.testing.assert_close(lam_new, expected, atol=1e-6, rtol=0)
    lifted = torch.diag(torch.clamp(lam, min=0.1))
    torch.testing.assert_close(vec.T @ m.weight.detach() @ vec, lifted, atol=1e-6, rtol=0)


def test_assignment_round_trip_and_rejection():
    m = mp.spd(square(4), min_eigenvalue=0.01)
    a = torch.randn(4, 4, dtype=torch.float64)
    s = a @ a.T + torch.eye(4, dtype=torch.float64)
    m.weight = s
    torch.testing.assert_close(m.weight, s, atol=1e-12, rtol=1e-12)
    before = m.weight.detach().clone()
    with pytest.raises(ValueError, match=r"Linear\.weight.*not symmetric positive definite"):
        m.weight = torch.diag(torch.tensor([1.0, 1, 1, -1], dtype=torch.float64))
    with pytest.raises(ValueError, match="not symmetric positive definite"):
        m.weight = s + torch.triu(torch.ones_like(s), 1)  # not symmetric
    with pytest.raises(ValueError, match=r"eigenvalue deficit 5\.000e-03"):
        m.weight = torch.diag(torch.tensor([1.0, 1, 1, 0.005], dtype=torch.float64))  # below floor
    torch.testing.assert_close(m.weight, before, atol=0, rtol=0)


def test_batched_matrices():
    w = nn.Parameter(torch.randn(3, 4, 4, dtype=torch.float64))
    holder = nn.Module()
    holder.weight = w
    mp.spd(holder)
    assert holder.parametrizations.weight.original.shape == (3, 10)
    assert_spd(holder.weight)


def test_non_square_is_refused_at_registration():
    with pytest.raises(ValueError, match=r"Linear\.weight: spd needs a square matrix.*\(3, 4\)"):
        mp.spd(nn.Linear(4, 3))


@pytest.mark.parametrize("floor", [0.0, 0.5])
@pytest.mark.parametrize("n", [1, 3])
def test_gradcheck(n, floor):
    p = param(mp.spd(square(n), min_eigenvalue=floor))
    x = torch.randn(p.dim, dtype=torch.float64, requires_grad=True)
    assert gradcheck(p.map, (x,))


def test_manifold_is_geoopt_spd_and_check_explains():
    p = param(mp.spd(square(3)))
    assert isinstance(p.manifold, geoopt.SymmetricPositiveDefinite)
    singular = torch.diag(torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))
    # geoopt's own check passes a singular matrix (ANCHORS); ours does not
    assert geoopt.SymmetricPositiveDefinite().check_point_on_manifold(singular)
    ok, why = p.check(singular, explain=True)
    assert not ok and "Cholesky" in why
