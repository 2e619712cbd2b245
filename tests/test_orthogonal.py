"""Orthogonal / Stiefel: membership (geoopt oracle), minimal coordinates, assignment,
registration keeps the weight, determinant sign, conv layouts, float32 fidelity, rebase."""

from __future__ import annotations

import contextlib

import geoopt
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.autograd import gradcheck
from torch.autograd.functional import jacobian

import manifoldparam as mp
from manifoldparam.linalg.expm import expm
from tests.conftest import assert_on_stiefel

MAPS = ["expm", "cayley"]
DTYPES = [torch.float32, torch.float64]


def linear(rows: int, cols: int, dtype: torch.dtype = torch.float64) -> nn.Linear:
    return nn.Linear(cols, rows, bias=False).to(dtype)


def param(module: nn.Module, name: str = "weight") -> mp.Orthogonal:
    p = module.parametrizations[name][0]
    assert isinstance(p, mp.Orthogonal)
    return p


@given(
    rows=st.integers(1, 64),
    cols=st.integers(1, 64),
    dtype=st.sampled_from(DTYPES),
    map=st.sampled_from(MAPS),
    scale=st.sampled_from([0.0, 1e-6, 1.0, 10.0, 100.0]),
)
def test_any_coordinates_land_on_stiefel(rows, cols, dtype, map, scale):
    layer = mp.orthogonal(linear(rows, cols, dtype), map=map)
    with torch.no_grad():
        orig = layer.parametrizations.weight.original
        orig.copy_(scale * torch.randn_like(orig))
    w = layer.weight
    assert w.shape == (rows, cols) and w.dtype == dtype
    assert_on_stiefel(w)


@given(
    out_ch=st.integers(1, 12),
    in_ch=st.integers(1, 4),
    kernel=st.integers(1, 3),
    batched=st.booleans(),
    map=st.sampled_from(MAPS),
    scale=st.sampled_from([0.0, 1.0, 100.0]),
)
def test_conv_kernels_land_on_stiefel(out_ch, in_ch, kernel, batched, map, scale):
    conv = nn.Conv2d(in_ch, out_ch, kernel).double()
    mp.orthogonal(conv, map=map, batched=batched)
    with torch.no_grad():
        orig = conv.parametrizations.weight.original
        orig.copy_(scale * torch.randn_like(orig))
    w = conv.weight
    assert w.shape == (out_ch, in_ch, kernel, kernel)
    assert_on_stiefel(w if batched else w.reshape(out_ch, -1))


@pytest.mark.parametrize("rows,cols", [(1, 1), (2, 2), (6, 6), (7, 3), (3, 7), (5, 1), (1, 5)])
def test_minimal_coordinates_have_no_dead_direction(rows, cols):
    """The original holds exactly dim St(n, k) numbers and the map's Jacobian has full rank:
    torch's orthogonal stores n² numbers with 21 of 36 dead at n=6 (ANCHORS)."""
    layer = mp.orthogonal(linear(rows, cols))
    p = param(layer)
    n, k = max(rows, cols), min(rows, cols)
    dim = n * k - k * (k + 1) // 2
    original = layer.parametrizations.weight.original
    assert original.shape == (dim,)
    if dim == 0:
        return
    x = 0.3 * torch.randn(dim, dtype=torch.float64)
    jac = jacobian(p.map, x).reshape(rows * cols, dim)
    assert int(torch.linalg.matrix_rank(jac)) == dim


def test_torch_orthogonal_has_dead_directions():
    """The failure we fix, reproduced: torch stores 36 numbers for a 15-dim set at n=6."""
    layer = torch.nn.utils.parametrizations.orthogonal(linear(6, 6))
    assert layer.parametrizations.weight.original.numel() == 36


@pytest.mark.parametrize("map", MAPS)
@pytest.mark.parametrize("rows,cols", [(5, 5), (6, 3), (3, 6)])
def test_registration_keeps_an_orthogonal_weight(map, rows, cols):
    layer = linear(rows, cols)
    nn.init.orthogonal_(layer.weight)
    before = layer.weight.detach().clone()
    mp.orthogonal(layer, map=map)
    torch.testing.assert_close(layer.weight, before, atol=1e-12, rtol=0)


@pytest.mark.parametrize("rows,cols", [(5, 5), (6, 3), (3, 6)])
def test_registration_moves_weight_to_its_polar_factor(rows, cols):
    layer = linear(rows, cols)
    w = layer.weight.detach().clone()
    mp.orthogonal(layer)
    tall = w if rows >= cols else w.T
    u, _, vh = torch.linalg.svd(tall, full_matrices=False)
    polar = u @ vh if rows >= cols else (u @ vh).T
    torch.testing.assert_close(layer.weight, polar, atol=1e-12, rtol=0)


def test_registration_never_resamples():
    """geotorch#12: registration throws the weight away. Ours is deterministic in it."""
    a, b = linear(8, 8), linear(8, 8)
    b.load_state_dict(a.state_dict())
    torch.manual_seed(1)
    mp.orthogonal(a)
    torch.manual_seed(2)
    mp.orthogonal(b)
    torch.testing.assert_close(a.weight, b.weight, atol=0, rtol=0)


@pytest.mark.parametrize("map", MAPS)
@pytest.mark.parametrize("rows,cols", [(4, 4), (6, 2), (2, 6)])
def test_assigning_an_orthogonal_matrix_sets_the_weight(map, rows, cols):
    layer = mp.orthogonal(linear(rows, cols), map=map)
    q = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), dtype=torch.float64))[0]
    q = q if rows >= cols else q.T
    layer.weight = q
    torch.testing.assert_close(layer.weight, q, atol=1e-13, rtol=0)
    assert bool((layer.parametrizations.weight.original == 0).all())


@pytest.mark.parametrize("cache", ["none", "cached", "auto"])
def test_reinitialise_by_assignment_not_by_nn_init(cache):
    """The README's recipe: ``nn.init.orthogonal_(layer.weight)`` writes into the computed
    value (torch's trap, pytorch#180968), so the weight read next is unchanged, also with a
    cache, which must not serve the overwritten tensor; assigning an initialised tensor sets
    the weight (wide, so the rows are orthonormal)."""
    torch.manual_seed(0)
    layer = mp.orthogonal(linear(3, 5))
    if cache == "auto":
        mp.auto_cache(layer)
    before = layer.weight.detach().clone()
    ctx = mp.cached() if cache == "cached" else contextlib.nullcontext()
    with ctx:
        nn.init.orthogonal_(layer.weight)
        torch.testing.assert_close(layer.weight, before, atol=0, rtol=0)
        q = nn.init.orthogonal_(torch.empty_like(layer.weight))
        layer.weight = q
        torch.testing.assert_close(layer.weight, q, atol=1e-13, rtol=0)
    assert_on_stiefel(layer.weight.detach())


def test_assigning_off_the_set_raises_and_keeps_the_weight():
    layer = mp.orthogonal(linear(4, 4))
    before = layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"Linear\.weight.*not orthogonal.*max\|WᵀW - I\|") as e:
        layer.weight = 2 * torch.eye(4, dtype=torch.float64)
    assert "manifoldparam.project" in str(e.value)
    torch.testing.assert_close(layer.weight, before, atol=0, rtol=0)
    # the projection helper gives the nearest point, which assigns
    layer.weight = mp.project(layer, "weight", 2 * torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(layer.weight, torch.eye(4, dtype=torch.float64), atol=1e-14, rtol=0)


def test_assignment_tolerance_is_dtype_aware():
    """A float32 QR factor (error ~1e-6) is accepted; the same error in float64 is not."""
    q32 = torch.linalg.qr(torch.randn(64, 64))[0]
    layer32 = mp.orthogonal(linear(64, 64, torch.float32))
    layer32.weight = q32
    q64 = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))[0]
    layer64 = mp.orthogonal(linear(64, 64))
    with pytest.raises(ValueError):
        layer64.weight = q64 + 1e-6
    layer64.weight = q64


@pytest.mark.parametrize("map", MAPS)
def test_training_keeps_the_determinant_sign(map):
    layer = mp.orthogonal(linear(5, 5), map=map)
    reflection = torch.diag(torch.tensor([-1.0, 1, 1, 1, 1], dtype=torch.float64))
    layer.weight = reflection
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    target = torch.randn(5, 5, dtype=torch.float64)
    for _ in range(20):
        opt.zero_grad()
        ((layer.weight - target) ** 2).sum().backward()
        opt.step()
    assert not torch.allclose(layer.weight, reflection)
    assert float(torch.linalg.det(layer.weight.detach())) == pytest.approx(-1.0, abs=1e-10)
    assert_on_stiefel(layer.weight)


def test_conv_kernel_is_the_flattened_matrix_by_default():
    conv = mp.orthogonal(nn.Conv2d(4, 8, 3).double())
    w = conv.weight.reshape(8, -1)  # 8 x 36: orthonormal rows
    torch.testing.assert_close(w @ w.T, torch.eye(8, dtype=torch.float64), atol=1e-12, rtol=0)
    assert conv.parametrizations.weight.original.shape == (8 * 36 - 8 * 9 // 2,)


def test_conv_kernel_batched_option_constrains_each_kxk_matrix():
    conv = mp.orthogonal(nn.Conv2d(4, 8, 3).double(), batched=True)
    assert conv.parametrizations.weight.original.shape == (8, 4, 3)  # 3x3 matrices: dim 3
    assert_on_stiefel(conv.weight)


@pytest.mark.parametrize("map", MAPS)
def test_float32_fidelity_with_huge_originals(map):
    """max|WᵀW - I| < 5e-4 in float32 even with every original scaled by 100."""
    layer = mp.orthogonal(linear(128, 128, torch.float32), map=map)
    with torch.no_grad():
        orig = layer.parametrizations.weight.original
        orig.copy_(100 * torch.randn_like(orig))
    w = layer.weight.detach()
    err = float((w.T @ w - torch.eye(128)).abs().max())
    assert err < 5e-4
    assert_on_stiefel(w)


def test_newton_schulz_is_what_keeps_huge_originals_exact():
    """Same coordinates with and without the correction: the float32 drift of the
    exponential itself is an order of magnitude above the corrected one."""
    layer = mp.orthogonal(linear(128, 128, torch.float32))
    p = param(layer)
    with torch.no_grad():
        orig = layer.parametrizations.weight.original
        orig.copy_(100 * torch.randn_like(orig))
    errors = []
    for steps in (1, 0):
        p.newton_schulz = steps
        w = layer.weight.detach()
        errors.append(float((w.T @ w - torch.eye(128)).abs().max()))
    corrected, raw = errors
    assert corrected < 2e-6 and raw > 10 * corrected


def _with_spectral_radius(layer: nn.Module, rho: float, seed: int) -> mp.Orthogonal:
    """Random coordinates scaled so that ρ(A) = rho (A the skew matrix of the map)."""
    p = param(layer)
    orig = layer.parametrizations.weight.original
    with torch.no_grad():
        orig.copy_(torch.randn(orig.shape, generator=torch.Generator().manual_seed(seed)))
        r = float(torch.linalg.eigvals(p.skew(orig.double())).abs().max())
        orig.mul_(rho / max(r, 1e-300))
    return p


@pytest.mark.parametrize("map", MAPS)
@pytest.mark.parametrize("rho", [0.0, 0.3, 0.6, 2.0, 40.0])
def test_default_newton_schulz_runs_exactly_off_the_taylor_path(map, rho):
    """Default (None): the weight is bitwise the one without the correction where the
    exponential took T_8 with at most one squaring (float32: ρ ≤ 0.88 by its norm bound), and
    bitwise the one with one step elsewhere (more squarings, Padé, and always for Cayley)."""
    layer = mp.orthogonal(linear(40, 40, torch.float32), map=map)
    p = _with_spectral_radius(layer, rho, seed=3)
    assert p.newton_schulz is None
    default = layer.weight.detach().clone()
    p.newton_schulz = 0 if (map == "expm" and rho <= 0.6) else 1
    assert torch.equal(default, layer.weight.detach())
    p.newton_schulz = 1 - p.newton_schulz
    assert not torch.equal(default, layer.weight.detach())


@given(
    n=st.integers(2, 256),
    rho=st.floats(0.0, 50.0),
    seed=st.integers(0, 2**16),
    assigned=st.booleans(),
)
def test_default_float32_orthogonality_stays_within_16_ulps(n, rho, seed, assigned):
    """With the default correction policy, float32 ``max|WᵀW - I|`` stays within 16 ulps
    (1.9e-6) for n ≤ 256 at any ρ(A), also from an assigned float32 base whose own error is
    ~100x that (the base is re-orthogonalized on assignment). Measured worst: 13 ulps
    (n = 190, ρ = 0.5: T_8 with one squaring, uncorrected); with the step always on, 5."""
    layer = mp.orthogonal(linear(n, n, torch.float32))
    if assigned:  # a float32 Q inside the assignment tolerance, but far from exact
        g = torch.Generator().manual_seed(seed + 1)
        q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
        q = q + 5e-7 * n * torch.randn(n, n, dtype=torch.float64, generator=g) / n**0.5
        layer.weight = q.float()
    _with_spectral_radius(layer, rho, seed)
    w = layer.weight.detach().double()
    err = float((w.T @ w - torch.eye(n, dtype=torch.float64)).abs().max())
    assert err <= 16 * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("source", ["double()", "old checkpoint"])
def test_a_base_that_is_not_exact_keeps_the_correction(source):
    """The step is skipped only when the base itself is orthogonal to working precision: a
    float32 base converted by ``module.double()``, or one loaded from a checkpoint saved
    before bases were re-orthogonalized (accepted within ``16·n·eps``), still gives a weight
    orthogonal to its dtype's round-off, and the verdict follows a later exact base."""
    n = 48
    layer = mp.orthogonal(linear(n, n, torch.float32))
    p = _with_spectral_radius(layer, 0.02, seed=5)  # the Taylor path, also in float64
    if source == "double()":
        layer.double()
        tol = 1e-13
    else:
        state = layer.state_dict()
        noise = 5e-5 * torch.randn(n, n, generator=torch.Generator().manual_seed(6)) / n**0.5
        key = "parametrizations.weight.0.base"
        state[key] = state[key] + noise
        layer.load_state_dict(state)
        tol = 16 * torch.finfo(torch.float32).eps
    b = p.base.double()
    assert float((b.T @ b - torch.eye(n, dtype=torch.float64)).abs().max()) > 10 * tol
    w = layer.weight.detach().double()
    assert float((w.T @ w - torch.eye(n, dtype=torch.float64)).abs().max()) < tol
    mp.rebase(layer)  # an exact base again: the step is skipped (bitwise the uncorrected map)
    default = layer.weight.detach().clone()
    p.newton_schulz = 0
    assert torch.equal(default, layer.weight.detach())


def test_base_check_under_inference_mode():
    """Registration, assignment, conversion and reads under ``torch.inference_mode`` (whose
    tensors keep no version counter): the base check steps aside and the step runs."""
    with torch.inference_mode():
        layer = mp.orthogonal(linear(8, 8, torch.float32))
        w = layer.weight
        q, _ = torch.linalg.qr(torch.randn(8, 8))
        layer.weight = q
        layer.to(torch.float64)
        w = layer.weight
    assert_on_stiefel(w)


def test_base_check_keeps_no_substituted_tensor_alive():
    """A base substituted by ``functional_call`` (here a non-leaf) is not held by the check's
    memo: the module still deep-copies, and the tensor is freed."""
    import copy
    import gc
    import weakref

    from torch.func import functional_call

    layer = mp.orthogonal(linear(6, 6, torch.float32))
    p = param(layer)
    substitute = p.base + torch.zeros(6, 6, requires_grad=True) * 0
    ref = weakref.ref(substitute)
    w = functional_call(
        layer, {"parametrizations.weight.0.base": substitute}, (torch.eye(6),), strict=False
    )
    del w, substitute
    gc.collect()
    assert ref() is None
    copy.deepcopy(layer)


def test_invalidate_drops_the_base_check_after_a_data_write():
    """A write through ``.data`` (no version counter sees it) that makes the base non-exact:
    after ``mp.invalidate`` the step runs again and the weight is orthogonal to round-off."""
    n = 32
    layer = mp.orthogonal(linear(n, n, torch.float32))
    p = _with_spectral_radius(layer, 0.3, seed=2)
    layer.weight  # noqa: B018  (verdict: exact)
    noise = 5e-5 * torch.randn(n, n, generator=torch.Generator().manual_seed(3)) / n**0.5
    p.base.data.add_(noise)
    mp.invalidate(layer)
    w = layer.weight.detach().double()
    assert float((w.T @ w - torch.eye(n, dtype=torch.float64)).abs().max()) < 2e-6


@pytest.mark.filterwarnings("error:There is a performance drop:UserWarning")
def test_map_under_vmap_has_batching_rules():
    """Per-sample coordinates through ``vmap``: no op of the map falls back to the slow
    per-sample loop (functorch warns "There is a performance drop" for one without a batching
    rule; turned into an error here)."""
    p = param(mp.orthogonal(linear(6, 6, torch.float32)))
    xs = 0.3 * torch.randn(4, p.dim)
    ws = torch.func.vmap(p.map)(xs)
    for x, w in zip(xs, ws, strict=True):
        torch.testing.assert_close(w, p.map(x))


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_newton_schulz_setting_is_checked(bad):
    with pytest.raises(ValueError, match="newton_schulz must be None"):
        mp.orthogonal(linear(4, 4), newton_schulz=bad)


def test_assignment_makes_the_base_orthogonal_to_working_precision():
    """A float32 Q accepted within tolerance (max|QᵀQ - I| ≈ 2e-4) becomes a base orthogonal
    to a few ulps, and the weight stays within that tolerance of Q."""
    n = 64
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    noisy = (q + 1e-4 * torch.randn(n, n, dtype=torch.float64) / n**0.5).float()
    eye = torch.eye(n)
    assert float((noisy.T @ noisy - eye).abs().max()) > 1e-5
    layer = mp.orthogonal(linear(n, n, torch.float32))
    layer.weight = noisy
    b = param(layer).base.double()
    assert float((b.T @ b - torch.eye(n, dtype=torch.float64)).abs().max()) < 4e-7
    assert float((layer.weight.detach() - noisy).abs().max()) < 1e-4


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(12, 12), (12, 5), (5, 12)])
def test_newton_schulz_backward_is_skipped_without_changing_gradients(steps, dtype, rows, cols):
    """The correction carries no backward. Value: the tracked NS iteration. Gradient and a
    Hessian-vector product: those through the tracked iteration, to the dtype's round-off
    (NS fixes tangent vectors and is the identity on the manifold)."""
    torch.manual_seed(0)
    p = param(mp.orthogonal(linear(rows, cols, dtype)))
    p.newton_schulz = steps
    x = (0.7 * torch.randn(p.dim, dtype=dtype)).requires_grad_()
    g = torch.randn(rows, cols, dtype=dtype)
    v = torch.randn(p.dim, dtype=dtype)

    def tracked(x: torch.Tensor) -> torch.Tensor:
        t = p.base @ expm(p.skew(x))[:, : p.k]
        eye = torch.eye(p.k, dtype=dtype)
        for _ in range(steps):
            t = t @ (1.5 * eye - 0.5 * (t.mT @ t))
        return t.mT if p.transposed else t

    tol = 50 * torch.finfo(dtype).eps * p.n
    w, w_ref = p.map(x), tracked(x)
    assert float((w - w_ref).detach().abs().max()) < tol
    (grad,) = torch.autograd.grad((w * g).sum(), x, create_graph=True)
    (grad_ref,) = torch.autograd.grad((w_ref * g).sum(), x, create_graph=True)
    scale = float(grad_ref.detach().abs().max())
    assert float((grad - grad_ref).detach().abs().max()) < tol * scale
    (hvp,) = torch.autograd.grad(grad @ v, x)
    (hvp_ref,) = torch.autograd.grad(grad_ref @ v, x)
    assert float((hvp - hvp_ref).abs().max()) < 10 * tol * float(hvp_ref.abs().max())


@pytest.mark.parametrize("map", MAPS)
@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 3), (4, 2), (2, 4)])
def test_gradcheck(map, rows, cols):
    p = param(mp.orthogonal(linear(rows, cols), map=map))
    x = 0.5 * torch.randn(p.dim, dtype=torch.float64, requires_grad=True)
    assert gradcheck(p.map, (x,))


def test_rebase_keeps_the_weight_and_resets_optimizer_state():
    layer = mp.orthogonal(linear(6, 4))
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        layer.weight.sum().backward()
        opt.step()
    before = layer.weight.detach().clone()
    original = layer.parametrizations.weight.original
    assert original in opt.state and bool(original.abs().sum() > 0)
    assert mp.rebase(layer, opt) == 1
    torch.testing.assert_close(layer.weight, before, atol=1e-12, rtol=0)
    assert bool((original == 0).all()) and original not in opt.state
    opt.zero_grad()
    layer.weight.sum().backward()
    opt.step()  # training goes on from the new chart
    assert_on_stiefel(layer.weight)


def test_manifold_is_geoopt_stiefel():
    assert isinstance(param(mp.orthogonal(linear(3, 3))).manifold, geoopt.Stiefel)


def test_check_explains():
    p = param(mp.orthogonal(linear(3, 3)))
    ok, why = p.check(torch.eye(3, dtype=torch.float64), explain=True)
    assert ok and why is None
    ok, why = p.check(3 * torch.eye(3, dtype=torch.float64), explain=True)
    assert not ok and "max|WᵀW - I|" in why and "8.000e+00" in why


def test_unknown_map_is_refused():
    with pytest.raises(ValueError, match="map must be one of"):
        mp.orthogonal(linear(3, 3), map="householder")
