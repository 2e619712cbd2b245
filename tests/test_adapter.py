"""The orthogonal (OFT) adapter: W = W0·R (dim=1) or R·W0 (dim=0), R block-orthogonal.

The generic contract runs in test_conformance (the "orthogonal-adapter" case); here what only
this set has: the frozen W0, the recovery of R on assignment, the Procrustes projection
against scipy, float32 orthogonality far from R = I, the merged export, checkpoints, errors,
and a kernel count that does not grow with the number of blocks.
"""

from __future__ import annotations

import pytest
import scipy.linalg
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.autograd import gradcheck
from torch.utils._python_dispatch import TorchDispatchMode

import manifoldparam as mp

DT = torch.float64


def adapter(m: nn.Module, name: str = "weight") -> mp.hard.OrthogonalAdapter:
    p = m.parametrizations[name][0]
    assert isinstance(p, mp.hard.OrthogonalAdapter)
    return p


def random_rotations(k: int, b: int, seed: int) -> torch.Tensor:
    """k Haar-like rotations in SO(b) from QR (independent of the library)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(k, b, b, generator=g, dtype=DT))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    flip = torch.linalg.det(q) < 0
    q[flip, :, 0] = -q[flip, :, 0]
    return q


def blockwise(w0: torch.Tensor, r: torch.Tensor, dim: int) -> torch.Tensor:
    """W0·diag(R) (dim=1) or diag(R)·W0 (dim=0) through a dense block-diagonal matrix."""
    dense = torch.block_diag(*r)
    return w0 @ dense if dim == 1 else dense @ w0


@pytest.mark.parametrize("dim", [0, 1])
def test_registration_freezes_w0_once_and_starts_at_the_identity(dim: int) -> None:
    torch.manual_seed(0)
    m = nn.Linear(12, 8).double()
    w0 = m.weight.detach().clone()
    mp.orthogonal_adapter(m, block_size=4, dim=dim)
    assert torch.equal(m.weight, w0)
    p = adapter(m)
    assert torch.equal(p.frozen, w0)
    keys = sorted(m.state_dict())
    assert keys == [
        "bias",
        "parametrizations.weight.0.frozen",
        "parametrizations.weight.original",
    ]
    k = (12 if dim == 1 else 8) // 4
    assert m.parametrizations.weight.original.shape == (k, 6)  # k blocks of 4·3/2 angles
    assert p.dim == k * 6
    assert not bool(m.parametrizations.weight.original.any())


@pytest.mark.parametrize("dim", [0, 1])
@given(seed=st.integers(0, 2**16))
def test_assignment_recovers_the_rotation(dim: int, seed: int) -> None:
    """``module.weight = W0·R`` for a rotation R reads back W0·R, and the coordinates are
    log R: the adapter's own R equals the assigned one (W0 unchanged)."""
    torch.manual_seed(1)
    m = mp.orthogonal_adapter(nn.Linear(8, 12).double(), block_size=4, dim=dim)
    p = adapter(m)
    w0 = p.frozen.clone()
    r = random_rotations((8 if dim == 1 else 12) // 4, 4, seed)
    target = blockwise(w0, r, dim)
    m.weight = target
    torch.testing.assert_close(m.weight.detach(), target, atol=1e-10, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(
            p.rotation(m.parametrizations.weight.original), r, atol=1e-10, rtol=0
        )
    assert torch.equal(p.frozen, w0)


@pytest.mark.parametrize("dim", [0, 1])
def test_project_is_the_procrustes_solution(dim: int) -> None:
    """The nearest W0·R to a noisy W0·Q: per block scipy's orthogonal Procrustes (over O(b);
    the noise is small, so its solution has det +1 and is also the SO(b) one)."""
    torch.manual_seed(2)
    m = mp.orthogonal_adapter(nn.Linear(16, 8).double(), block_size=4, dim=dim)
    p = adapter(m)
    w0 = p.frozen
    q = random_rotations((16 if dim == 1 else 8) // 4, 4, seed=7)
    noisy = blockwise(w0, q, dim) + 0.01 * torch.randn(w0.shape, dtype=DT)
    blocks = []
    for i in range(q.shape[0]):
        s = slice(4 * i, 4 * i + 4)
        if dim == 1:
            x, y = w0[:, s].numpy(), noisy[:, s].numpy()
            blocks.append(torch.from_numpy(scipy.linalg.orthogonal_procrustes(x, y)[0]))
        else:  # R·X ≈ Y  <=>  Xᵀ·Rᵀ ≈ Yᵀ
            x, y = w0[s].T.numpy(), noisy[s].T.numpy()
            blocks.append(torch.from_numpy(scipy.linalg.orthogonal_procrustes(x, y)[0]).T)
    expected = blockwise(w0, torch.stack(blocks), dim)
    torch.testing.assert_close(p.project(noisy), expected, atol=1e-10, rtol=0)
    assert float(p.distance(noisy)) == pytest.approx(float((noisy - expected).abs().max()))


def test_rotation_stays_orthogonal_in_float32_far_from_the_identity() -> None:
    """Coordinates far from 0 (the Padé path with squarings): R is orthogonal to float32
    round-off (the Newton--Schulz step), as OFT training needs."""
    torch.manual_seed(3)
    m = mp.orthogonal_adapter(nn.Linear(128, 4), block_size=32)
    p = adapter(m)
    eye = torch.eye(32, dtype=DT)
    for scale in (0.01, 0.3, 3.0, 30.0):
        x = scale * torch.randn_like(m.parametrizations.weight.original)
        with torch.no_grad():
            r = p.rotation(x).double()
        assert float((r.mT @ r - eye).abs().max()) <= 1e-5, scale
        assert bool((torch.linalg.det(r) > 0).all())


@pytest.mark.parametrize("dim", [0, 1])
def test_gradcheck(dim: int) -> None:
    torch.manual_seed(4)
    m = mp.orthogonal_adapter(nn.Linear(6, 9).double(), block_size=3, dim=dim)
    x = 0.5 * torch.randn_like(m.parametrizations.weight.original)
    assert gradcheck(adapter(m).map, (x.requires_grad_(),))


def test_export_merges_and_gives_the_same_outputs() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    model.requires_grad_(False)
    mp.orthogonal_adapter(model[0], block_size=4)
    coords = model[0].parametrizations.weight.original
    assert coords.requires_grad  # trainable although the model was frozen first
    opt = torch.optim.Adam([coords], lr=0.1)
    x = torch.randn(16, 8)
    for _ in range(5):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    plain = mp.export(model, requires_grad=False)
    assert type(plain[0]) is nn.Linear
    assert sorted(plain.state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert torch.equal(plain[0].weight, model[0].weight)
    assert torch.equal(plain(x), model(x))
    w0 = adapter(model[0]).frozen
    r = adapter(model[0]).rotation(coords).detach()
    torch.testing.assert_close(plain[0].weight, blockwise(w0, r, 1), atol=1e-6, rtol=0)


def test_state_dict_round_trip_carries_w0() -> None:
    """Another model (another W0) loading the state reads the same weight: W0 is loaded."""
    torch.manual_seed(6)
    a = mp.orthogonal_adapter(nn.Linear(8, 4), block_size=4)
    with torch.no_grad():
        a.parametrizations.weight.original.normal_()
    torch.manual_seed(7)
    b = mp.orthogonal_adapter(nn.Linear(8, 4), block_size=4)
    assert not torch.equal(a.weight, b.weight)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.weight, a.weight)
    bad = dict(a.state_dict())
    bad["parametrizations.weight.0.frozen"] = torch.zeros(4, 4)
    with pytest.raises(RuntimeError, match=r"frozen weight .*shape \(4, 4\)"):
        b.load_state_dict(bad)


def test_cached_reads_compute_the_rotation_once() -> None:
    m = mp.orthogonal_adapter(nn.Linear(8, 4), block_size=4)
    p = adapter(m)
    calls = []
    rotation = p.rotation
    p.__dict__["rotation"] = lambda x: calls.append(1) or rotation(x)
    x = torch.randn(2, 8)
    with mp.cached():
        (m(x) + m(x)).sum().backward()
    assert len(calls) == 1
    m(x)
    assert len(calls) == 2  # outside the cache: computed per read


def test_errors_name_the_attribute_and_the_fix() -> None:
    why = (
        r"Linear\.weight: block_size=32 does not divide .*in_features = 100.*"
        r"one of \[2, 4, 5, 10.*dim=0 \(64 is divisible"
    )
    with pytest.raises(ValueError, match=why):
        mp.orthogonal_adapter(nn.Linear(100, 64))
    with pytest.raises(ValueError, match=r"Conv2d\.weight: orthogonal_adapter needs a 2-D"):
        mp.orthogonal_adapter(nn.Conv2d(4, 4, 3), block_size=2)
    with pytest.raises(ValueError, match="block_size must be an int >= 2"):
        mp.orthogonal_adapter(nn.Linear(4, 4), block_size=1)
    with pytest.raises(ValueError, match="dim must be 0"):
        mp.orthogonal_adapter(nn.Linear(4, 4), block_size=2, dim=2)
    m = mp.orthogonal_adapter(nn.Linear(4, 4), block_size=2)
    with pytest.raises(ValueError, match=r"Linear\.weight = X: X is not .*W₀·R"):
        m.weight = torch.randn(4, 4)


def test_any_module_with_a_2d_weight() -> None:
    emb = mp.orthogonal_adapter(nn.Embedding(10, 8), block_size=4)  # rotates the 8 features
    ids = torch.tensor([1, 2, 3])
    w0 = adapter(emb).frozen
    assert torch.equal(emb(ids), w0[ids])
    with torch.no_grad():
        emb.parametrizations.weight.original.normal_()
    out = emb(ids)
    torch.testing.assert_close(out @ out.T, w0[ids] @ w0[ids].T, atol=1e-5, rtol=0)


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops += 1
        return func(*args, **(kwargs or {}))


def test_the_op_count_does_not_grow_with_the_number_of_blocks() -> None:
    """The blocks are batched: one forward+backward of the adapter dispatches as many ops for
    2 blocks as for 64 (no per-block loop)."""
    counts = []
    for blocks in (2, 64):
        m = mp.orthogonal_adapter(nn.Linear(blocks * 8, 4), block_size=8)
        with torch.no_grad():
            m.parametrizations.weight.original.normal_(std=0.05)
        x = torch.randn(3, blocks * 8)
        m(x).sum().backward()  # warm-up
        with _Count() as c:
            m(x).sum().backward()
        counts.append(c.ops)
    assert counts[0] == counts[1]


def test_half_precision_weights_train_and_report() -> None:
    """A bfloat16 model: the rotation is computed in float32 and cast, and the check (a
    Procrustes SVD, which has no half-precision kernel) runs in float32 too."""
    torch.manual_seed(7)
    m = mp.orthogonal_adapter(nn.Linear(64, 16), block_size=32).to(torch.bfloat16)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    for _ in range(5):
        opt.zero_grad()
        m(x).float().square().mean().backward()
        opt.step()
    assert m.weight.dtype == torch.bfloat16
    assert float(m.parametrizations.weight.original.detach().abs().max()) > 0  # it trained
    report = mp.constraint_report(m)
    assert "weight" in str(report)
    p = adapter(m)
    assert float(p.distance(m.weight.detach())) <= p.default_atol(torch.bfloat16)


def test_the_weight_is_the_transpose_of_a_contiguous_product() -> None:
    """dim=1: W = (diag(R_iᵀ)·W₀ᵀ)ᵀ, a view (no copy interleaves the blocks); its values are
    W₀·R blockwise, and the export keeps the layout (outputs bit-identical)."""
    torch.manual_seed(8)
    m = mp.orthogonal_adapter(nn.Linear(64, 16), block_size=32)
    with torch.no_grad():
        m.parametrizations.weight.original.normal_(std=0.1)
    p = adapter(m)
    w = m.weight.detach()
    assert w.mT.is_contiguous()
    r = p.rotation(m.parametrizations.weight.original).detach()
    expected = torch.cat([p.frozen[:, 32 * i : 32 * (i + 1)] @ r[i] for i in range(2)], dim=1)
    torch.testing.assert_close(w, expected, atol=1e-6, rtol=0)
    x = torch.randn(5, 64)
    assert torch.equal(mp.export(m)(x), m(x))
