"""mp.grassmannian: the closed form through the SVD of C, principal angles, the span kept at
registration, a PCA subspace found by training, batched frames and bad input. (The generic
contract runs on the grassmannian cases of tests/cases.py.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import manifoldparam as mp
from manifoldparam.hard.grassmannian import subspace_distance

DT = torch.float64


def _frame(n: int, k: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(
        torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=DT)
    )
    return q


@pytest.mark.parametrize(("n", "k"), [(5, 2), (7, 3), (4, 1)])
def test_map_is_the_closed_form_geodesic(n: int, k: int) -> None:
    """W = B_k V cos Σ Vᵀ + B_⊥ U sin Σ Vᵀ for C = UΣVᵀ, and the principal angles between the
    span and the base subspace are the singular values of C (below π/2)."""
    m = mp.grassmannian(nn.Linear(k, n, bias=False).double())
    p = m.parametrizations.weight[0]
    base = p.base
    g = torch.Generator().manual_seed(n + k)
    c = 0.4 * torch.randn(n - k, k, generator=g, dtype=DT)
    w = p.map(c.flatten())
    u, s, vh = torch.linalg.svd(c, full_matrices=False)
    ref = (
        base[:, :k] @ vh.mT @ torch.diag(torch.cos(s)) @ vh
        + base[:, k:] @ u @ torch.diag(torch.sin(s)) @ vh
    )
    torch.testing.assert_close(w, ref, atol=1e-14, rtol=0)
    cosines = torch.linalg.svdvals(base[:, :k].mT @ w)
    torch.testing.assert_close(torch.arccos(cosines.clamp(max=1)).sort().values, s.sort().values)


def test_registration_keeps_the_span() -> None:
    m = nn.Linear(3, 8, bias=False).double()
    before = m.weight.detach().clone()
    mp.grassmannian(m)
    q, _ = torch.linalg.qr(before)
    assert float(subspace_distance(m.weight.detach(), q)) < 1e-14


def test_subspace_distance_ignores_the_frame_and_sees_the_span() -> None:
    a = _frame(6, 2, 0)
    rot = torch.linalg.qr(torch.randn(2, 2, dtype=DT))[0]
    assert float(subspace_distance(a, a @ rot)) < 1e-14
    b = _frame(6, 2, 1)
    angles = torch.arccos(torch.linalg.svdvals(a.mT @ b).clamp(max=1))
    torch.testing.assert_close(subspace_distance(a, b), torch.sin(angles).norm())


def test_training_finds_the_pca_subspace() -> None:
    """Maximising tr(WᵀΣW) over Gr(6, 2) reaches the span of Σ's top two eigenvectors."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 6, generator=g, dtype=DT) * torch.tensor([3, 2, 1, 0.5, 0.3, 0.1])
    cov = x.mT @ x / len(x)
    top = torch.linalg.eigh(cov).eigenvectors[:, -2:]
    m = mp.grassmannian(nn.Linear(2, 6, bias=False).double())
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        w = m.weight
        (-torch.trace(w.mT @ cov @ w)).backward()
        opt.step()
    assert float(subspace_distance(m.weight.detach(), top)) < 1e-4


def test_batched_frames() -> None:
    m = nn.Module()
    m.weight = nn.Parameter(torch.randn(4, 5, 2, dtype=DT))
    mp.grassmannian(m, batched=True)
    assert m.parametrizations.weight.original.shape == (4, 6)
    w = m.weight.detach()
    torch.testing.assert_close(w.mT @ w, torch.eye(2, dtype=DT).expand(4, 2, 2), atol=1e-14, rtol=0)


def test_a_square_weight_is_refused() -> None:
    m = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"Linear\.weight: grassmannian needs .* orthogonal"):
        mp.grassmannian(m)
    assert not torch.nn.utils.parametrize.is_parametrized(m)
