"""The tall path of ``orthogonal`` (k ≪ n, O(nk²)): the same map as the square one, on the
Stiefel manifold (geoopt oracle), exact derivatives, its base kept as n×k buffers, the
automatic switch, checkpoints, rebase. The generic tests run on it through ``tests/cases.py``
(case ``orthogonal-tall``)."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import manifoldparam as mp
from manifoldparam.hard import _stiefel_tall
from manifoldparam.linalg.stiefel import complement, householder_frame, polar, stiefel_map
from tests.conftest import assert_on_stiefel

DT = torch.float64


def linear(rows: int, cols: int, dtype: torch.dtype = DT) -> nn.Linear:
    return nn.Linear(cols, rows, bias=False).to(dtype)


def param(module: nn.Module) -> mp.Orthogonal:
    p = module.parametrizations.weight[0]
    assert isinstance(p, mp.Orthogonal)
    return p


def dense_reference(p: mp.Orthogonal, x: torch.Tensor, map: str) -> torch.Tensor:
    """``[U, U⊥] φ(A) E_k`` with the n×n skew ``A`` of the square path's coordinates and
    ``torch.linalg.matrix_exp`` / a dense solve: the definition, computed independently."""
    n, k = p.n, p.k
    u_perp = complement(p.reflectors, p.wy, torch.eye(n - k, dtype=DT))
    b = torch.cat([p.base, u_perp], dim=-1)
    ii, jj = torch.tril_indices(n, n, offset=-1)
    keep = jj < k
    low = torch.zeros(n, n, dtype=DT)
    low[ii[keep], jj[keep]] = x
    a = low - low.mT
    eye = torch.eye(n, dtype=DT)
    e = (
        torch.linalg.matrix_exp(a)
        if map == "expm"
        else torch.linalg.solve(eye - a / 2, eye + a / 2)
    )
    return b @ e[:, :k]


def tall_layer(rows: int, cols: int, seed: int, map: str = "expm") -> nn.Module:
    torch.manual_seed(seed)
    layer = mp.orthogonal(linear(rows, cols), map=map, tall=True)
    # a random base point (not the identity's), set by assignment
    layer.weight = mp.project(layer, "weight", torch.randn(rows, cols, dtype=DT))
    return layer


@given(
    n=st.integers(2, 14),
    k=st.integers(1, 7),
    scale=st.sampled_from([0.0, 0.1, 1.0, 4.0]),
    map=st.sampled_from(["expm", "cayley"]),
    seed=st.integers(0, 2**16),
)
def test_tall_map_equals_the_dense_exponential_of_the_embedded_skew_matrix(n, k, scale, map, seed):
    k = min(k, n)
    layer = tall_layer(n, k, seed, map)
    p = param(layer)
    x = scale * torch.randn(p.dim, dtype=DT, generator=torch.Generator().manual_seed(seed))
    w = p.map(x)
    torch.testing.assert_close(w, dense_reference(p, x, map), atol=1e-11 * (1 + scale**2), rtol=0)
    assert_on_stiefel(w)


@pytest.mark.parametrize("map", ["expm", "cayley"])
def test_tall_and_square_paths_agree_on_the_same_base(map):
    torch.manual_seed(0)
    tall = tall_layer(30, 4, 1, map)
    square = mp.orthogonal(linear(30, 4), map=map, tall=False)
    p, q = param(tall), param(square)
    assert p.tall and not q.tall and q.base.shape == (30, 30) and p.base.shape == (30, 4)
    with torch.no_grad():
        q.base = torch.cat([p.base, complement(p.reflectors, p.wy, torch.eye(26, dtype=DT))], -1)
    x = torch.randn(p.dim, dtype=DT, requires_grad=True)
    w_tall, w_square = p.map(x), q.map(x)
    torch.testing.assert_close(w_tall, w_square, atol=1e-13, rtol=0)
    g = torch.randn(30, 4, dtype=DT)
    (gt,) = torch.autograd.grad((w_tall * g).sum(), x)
    (gs,) = torch.autograd.grad((w_square * g).sum(), x)
    torch.testing.assert_close(gt, gs, atol=1e-12, rtol=0)


def test_the_map_at_zero_is_the_base_and_registration_keeps_the_weight():
    torch.manual_seed(0)
    m = linear(300, 20)
    before = m.weight.detach().clone()
    mp.orthogonal(m)  # automatic: n = 300 >= 3k, >= 256
    p = param(m)
    assert p.tall and p.base.shape == (300, 20)
    assert bool((m.parametrizations.weight.original == 0).all())
    u, _, vh = torch.linalg.svd(before, full_matrices=False)
    torch.testing.assert_close(m.weight, u @ vh, atol=1e-12, rtol=0)
    torch.testing.assert_close(m.weight, p.base, atol=1e-15, rtol=0)  # (+ its NS step)
    assert_on_stiefel(m.weight)


@pytest.mark.parametrize(
    ("rows", "cols", "tall", "expected"),
    [
        (300, 20, None, True),
        (20, 300, None, True),  # wide: rows orthonormal
        (300, 100, None, True),
        (300, 101, None, False),  # n < 3k
        (200, 10, None, False),  # n < 256
        (200, 10, True, True),
        (300, 20, False, False),
        (8, 8, True, True),  # k = n: allowed when forced (no complement)
    ],
)
def test_the_switch_is_automatic_by_shape_and_can_be_forced(rows, cols, tall, expected):
    m = mp.orthogonal(linear(rows, cols), tall=tall)
    p = param(m)
    assert p.tall is expected
    n, k = max(rows, cols), min(rows, cols)
    assert p.base.shape == ((n, k) if expected else (n, n))
    assert p.dim == n * k - k * (k + 1) // 2
    with torch.no_grad():
        m.parametrizations.weight.original.normal_()
    assert_on_stiefel(m.weight if rows >= cols else m.weight.T)


def test_tall_must_be_a_bool_or_none():
    with pytest.raises(ValueError, match="tall must be None"):
        mp.orthogonal(linear(300, 20), tall="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("map", ["expm", "cayley"])
def test_gradcheck_and_double_backward(map):
    p = param(tall_layer(9, 3, 0, map))
    x = 0.7 * torch.randn(p.dim, dtype=DT, requires_grad=True)
    assert gradcheck(p.map, (x,))
    assert gradgradcheck(p.map, (x,))
    zero = torch.zeros(p.dim, dtype=DT, requires_grad=True)  # C = 0: smooth there (no QR)
    assert gradcheck(p.map, (zero,))


@given(
    scale=st.sampled_from([1e-3, 0.3, 3.0, 30.0]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    map=st.sampled_from(["expm", "cayley"]),
    seed=st.integers(0, 2**16),
)
def test_any_coordinates_land_on_stiefel(scale, dtype, map, seed):
    torch.manual_seed(seed)
    m = mp.orthogonal(linear(40, 5, dtype), map=map, tall=True)
    with torch.no_grad():
        m.parametrizations.weight.original.normal_(0, scale)
    with warnings.catch_warnings():  # (far from the base: the drift warning, with the fix)
        warnings.simplefilter("ignore", RuntimeWarning)
        w = m.weight
    assert_on_stiefel(w)


def test_batched_tall_weights():
    module = nn.Module()
    module.weight = nn.Parameter(torch.randn(3, 40, 6, dtype=DT))
    before = module.weight.detach().clone()
    mp.register(module, "weight", mp.Orthogonal, batched=True, tall=True)
    p = module.parametrizations.weight[0]
    assert p.tall and p.base.shape == (3, 40, 6)
    torch.testing.assert_close(module.weight, polar(before), atol=1e-12, rtol=0)
    with torch.no_grad():
        module.parametrizations.weight.original.normal_()
    assert_on_stiefel(module.weight)
    x = torch.randn(p.dim, dtype=DT).reshape(3, -1)
    for i in range(3):  # each matrix is the map of its own coordinates and base
        single = stiefel_map(*_split(p, x[i]), p.base[i], p.reflectors[i], p.wy[i], cayley=False)
        torch.testing.assert_close(p.map(x)[i], single, atol=1e-12, rtol=0)


def _split(p, x):
    k = p.k
    m = k * (k - 1) // 2
    low = torch.zeros(k, k, dtype=x.dtype)
    ii, jj = torch.tril_indices(k, k, offset=-1)
    low[ii, jj] = x[:m]
    return low - low.mT, x[m:].reshape(p.n - k, k)


def test_rebase_keeps_the_weight():
    torch.manual_seed(0)
    layer = mp.orthogonal(linear(8, 300))  # wide, automatic
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        (layer.weight[:, :8] ** 2).sum().backward()
        opt.step()
    before = layer.weight.detach().clone()
    assert mp.rebase(layer, opt) == 1
    torch.testing.assert_close(layer.weight, before, atol=1e-12, rtol=0)
    assert bool((layer.parametrizations.weight.original == 0).all())
    p = param(layer)
    assert _stiefel_tall.frame_error(p.base, p.reflectors, p.wy) < 1e-13


def test_checkpoints_of_the_other_path_and_bad_frames_are_refused():
    tall = mp.orthogonal(linear(300, 20))
    square = mp.orthogonal(linear(300, 20), tall=False)
    with pytest.raises(RuntimeError, match=r"tall=False"):
        tall.load_state_dict(square.state_dict())
    with pytest.raises(RuntimeError, match=r"tall=True"):
        square.load_state_dict(tall.state_dict())
    other = tall_layer(300, 20, 3)
    state = other.state_dict()
    state["parametrizations.weight.0.reflectors"] = tall.state_dict()[
        "parametrizations.weight.0.reflectors"
    ]
    with pytest.raises(RuntimeError, match="do not complete its base point"):
        tall.load_state_dict(state)
    tall.load_state_dict(other.state_dict())  # a consistent one loads
    torch.testing.assert_close(tall.weight, other.weight, atol=0, rtol=0)


def test_float32_training_stays_on_the_set():
    torch.manual_seed(0)
    m = mp.orthogonal(linear(16, 600, torch.float32))
    x, y = torch.randn(64, 600), 3 * torch.randn(64, 16)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        ((m(x) - y) ** 2).mean().backward()
        opt.step()
    w = m.weight.detach()
    assert float((w @ w.T - torch.eye(16)).abs().max()) <= 1e-5


def test_householder_frame_and_complement():
    torch.manual_seed(0)
    for u in (torch.eye(9, 3, dtype=DT), torch.linalg.qr(torch.randn(9, 3, dtype=DT))[0]):
        v, t = householder_frame(u)  # (at the identity every τ is 0)
        q = torch.eye(9, dtype=DT) - v @ t @ v.mT
        torch.testing.assert_close(q.mT @ q, torch.eye(9, dtype=DT), atol=1e-14, rtol=0)
        torch.testing.assert_close(q[:, :3].abs(), u.abs(), atol=1e-14, rtol=0)
        y = torch.randn(6, 2, dtype=DT)
        torch.testing.assert_close(complement(v, t, y), q[:, 3:] @ y, atol=1e-14, rtol=0)


def test_polar_of_a_rank_deficient_matrix_is_orthonormal():
    w = torch.randn(50, 4, dtype=DT)
    w[:, 3] = w[:, 0]  # rank 3: the QR route
    assert_on_stiefel(polar(w))
    good = torch.randn(50, 4, dtype=DT)  # the Gram route
    u, _, vh = torch.linalg.svd(good, full_matrices=False)
    torch.testing.assert_close(polar(good), u @ vh, atol=1e-13, rtol=0)


def _loss_and_grad(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    loss = (m(x) ** 3).sum()
    (g,) = torch.autograd.grad(loss, m.parametrizations.weight.original)
    return loss.detach(), g


def test_compile_torch_func_and_cache_give_the_eager_values():
    torch.manual_seed(0)
    m = tall_layer(5, 40, 2)  # wide
    with torch.no_grad():
        m.parametrizations.weight.original.normal_(0, 0.3)
    x = torch.randn(7, 40, dtype=DT)
    loss, grad = _loss_and_grad(m, x)
    compiled = torch.compile(lambda: _loss_and_grad(m, x), backend="aot_eager")
    c_loss, c_grad = compiled()  # (the exponential is torch.linalg.matrix_exp there)
    torch.testing.assert_close(c_loss, loss, atol=1e-10, rtol=0)
    torch.testing.assert_close(c_grad, grad, atol=1e-10, rtol=0)
    coords = m.parametrizations.weight.original.detach()
    key = "parametrizations.weight.original"

    def f(c: torch.Tensor) -> torch.Tensor:
        return (torch.func.functional_call(m, {key: c}, (x,)) ** 3).sum()

    torch.testing.assert_close(torch.func.grad(f)(coords), grad, atol=1e-10, rtol=0)
    p = param(m)
    batch = torch.stack([coords, 0.5 * coords])
    torch.testing.assert_close(torch.func.vmap(p.map)(batch)[1], p.map(0.5 * coords))
    with mp.cached():
        torch.testing.assert_close(m.weight, m.weight)
        torch.testing.assert_close(m(x), torch.func.functional_call(m, {key: coords}, (x,)))
