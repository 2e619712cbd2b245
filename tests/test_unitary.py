"""mp.unitary: the map against torch.linalg.matrix_exp in complex128, unitarity in complex64,
the polar factor against scipy's, the coordinate count (and the one inert real for odd k),
batched weights and bad input. (The generic contract runs on the unitary cases of
tests/cases.py, with complex values.)"""

from __future__ import annotations

import pytest
import scipy.linalg
import torch
from torch import nn

import manifoldparam as mp

C128 = torch.complex128


def _unitary(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=C128))
    return q


def _linear(rows: int, cols: int, dtype: torch.dtype = C128) -> nn.Module:
    torch.manual_seed(rows * 10 + cols)
    return nn.Linear(cols, rows, bias=False).to(dtype)


@pytest.mark.parametrize(("n", "k"), [(4, 4), (5, 5), (6, 2), (5, 3)])
def test_map_is_base_times_the_exponential(n: int, k: int) -> None:
    m = mp.unitary(_linear(n, k))
    p = m.parametrizations.weight[0]
    x = 0.7 * torch.randn(p.dim, dtype=C128, generator=torch.Generator().manual_seed(1))
    a = p.skew_hermitian(x)
    torch.testing.assert_close(a, -a.mH, atol=0, rtol=0)
    ref = (p.base @ torch.linalg.matrix_exp(a))[:, :k]
    torch.testing.assert_close(p.map(x), ref, atol=1e-14, rtol=0)


@pytest.mark.parametrize(("n", "k"), [(4, 4), (5, 5), (6, 2), (5, 3)])
def test_real_dimension_and_the_inert_coordinate(n: int, k: int) -> None:
    """2nk - k² reals; for odd k one more, the imaginary part of the last coordinate, which the
    map ignores (gradient exactly 0)."""
    m = mp.unitary(_linear(n, k))
    original = m.parametrizations.weight.original
    assert 2 * original.numel() == 2 * n * k - k * k + k % 2
    probe = torch.randn(n, k, dtype=C128, generator=torch.Generator().manual_seed(2))
    (m.weight * probe.conj()).real.sum().backward()
    assert (float(original.grad[-1].imag) == 0.0) == (k % 2 == 1)


@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])
def test_complex64_training_stays_unitary(scale: float) -> None:
    m = mp.unitary(_linear(8, 8, torch.complex64))
    with torch.no_grad():
        m.parametrizations.weight.original.normal_(0, scale)
    w = m.weight.detach()
    err = float((w.mH @ w - torch.eye(8, dtype=w.dtype)).abs().max())
    assert err <= 8 * torch.finfo(torch.float32).eps, err


def test_project_is_scipys_polar_factor() -> None:
    m = mp.unitary(_linear(5, 3))
    raw = torch.randn(5, 3, dtype=C128, generator=torch.Generator().manual_seed(3))
    ref = torch.from_numpy(scipy.linalg.polar(raw.numpy())[0])
    torch.testing.assert_close(mp.project(m, "weight", raw), ref, atol=1e-13, rtol=0)


def test_any_unitary_is_assigned_and_read_back() -> None:
    m = mp.unitary(_linear(6, 6))
    target = _unitary(6, 6, 4)
    m.weight = target
    torch.testing.assert_close(m.weight, target, atol=1e-14, rtol=0)
    with pytest.raises(ValueError, match=r"Linear\.weight = X: X is not unitary.*WᴴW - I"):
        m.weight = 2 * target


def test_batched() -> None:
    m = nn.Module()
    m.weight = nn.Parameter(torch.randn(3, 4, 4, dtype=C128))
    mp.unitary(m, batched=True)
    assert m.parametrizations.weight.original.shape == (3, 8)
    w = m.weight.detach()
    torch.testing.assert_close(w.mH @ w, torch.eye(4, dtype=C128).expand(3, 4, 4))


def test_a_real_weight_is_refused_with_the_fix() -> None:
    m = nn.Linear(4, 4)
    before = m.weight.detach().clone()
    with pytest.raises(TypeError, match=r"Linear\.weight has dtype torch\.float32; .*complex64"):
        mp.unitary(m)
    assert not torch.nn.utils.parametrize.is_parametrized(m)
    assert torch.equal(m.weight, before)


def test_a_complex_weight_is_refused_by_a_real_set() -> None:
    with pytest.raises(TypeError, match=r"Linear\.weight has dtype torch\.complex64"):
        mp.orthogonal(nn.Linear(3, 3).to(torch.complex64))


def test_a_base_converted_to_a_higher_precision_is_corrected() -> None:
    """complex64 registration, then module.to(complex128): the base carries complex64
    round-off, which the Newton--Schulz step removes (the Taylor path alone would keep it)."""
    m = mp.unitary(_linear(6, 6, torch.complex64)).to(C128)
    w = m.weight.detach()
    err = float((w.mH @ w - torch.eye(6, dtype=C128)).abs().max())
    assert err <= 1e-14, err
