"""Tests of manifoldparam.linalg.expm_skew_blocks: the value against scipy's expm, the
gradient (the exact derivative of the computed polynomial, gradcheck, and within the Taylor
remainder of exp's own Fréchet derivative), the spectral bound, the squarings it picks, the
product count, non-finite and huge input, half precision, autocast and retain_graph."""

from __future__ import annotations

import math

import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck

from manifoldparam.linalg import expm_skew_blocks
from manifoldparam.linalg.skew_blocks import rho_bound, skew_index

F64 = torch.float64


def coords(k: int, n: int, scale: float, dtype=F64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(k, n * (n - 1) // 2, generator=g, dtype=F64)).to(dtype)


def skew(x: torch.Tensor, n: int) -> torch.Tensor:
    """The skew matrices of the coordinates, built independently (tril_indices + transpose)."""
    ii, jj = torch.tril_indices(n, n, offset=-1)
    a = x.new_zeros(*x.shape[:-1], n, n)
    a[..., ii, jj] = x
    return a - a.mT


def scipy_expm(a: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.from_numpy(scipy.linalg.expm(m.numpy())) for m in a.double()])


@pytest.mark.parametrize("n", [2, 3, 8, 32])
@pytest.mark.parametrize("scale", [0.0, 0.01, 0.05, 0.3, 3.0])
def test_value_matches_scipy_and_is_a_rotation(n: int, scale: float) -> None:
    """Round-off grows like 2^s with the squarings (then one Newton--Schulz step)."""
    x = coords(6, n, scale)
    r, _ = expm_skew_blocks(x, n)
    ref = scipy_expm(skew(x, n))
    torch.testing.assert_close(r, ref, atol=1e-13, rtol=0)
    r32, s = expm_skew_blocks(x.float(), n)
    torch.testing.assert_close(r32.double(), ref, atol=4e-6 * 2**s, rtol=0)
    eye = torch.eye(n, dtype=F64)
    assert float((r32.double().mT @ r32.double() - eye).abs().max()) < 1e-6 * 2**s
    assert bool((torch.linalg.det(r) > 0).all())


@pytest.mark.parametrize("scale", [0.005, 0.4])  # float64: no squaring, and squarings
def test_gradcheck_in_float64(scale: float) -> None:
    x = coords(3, 5, scale).requires_grad_()
    s = expm_skew_blocks(x.detach(), 5)[1]
    assert s == 0 if scale < 0.01 else s >= 3
    assert gradcheck(lambda v: expm_skew_blocks(v, 5)[0], (x,))


def test_the_gradient_is_exps_own_to_the_taylor_remainder() -> None:
    """float32 at OFT's angles (no squaring): the gradient is within ρ⁸/8! (relative) of
    the Fréchet adjoint of exp itself, computed in float64 by torch.linalg.matrix_exp."""
    x = coords(16, 32, 0.05, torch.float32, seed=1)
    r, s = expm_skew_blocks(x.requires_grad_(), 32)
    assert s == 0
    g = torch.randn(16, 32, 32, generator=torch.Generator().manual_seed(2))
    (r * g).sum().backward()
    x64 = x.detach().double().requires_grad_()
    (torch.linalg.matrix_exp(skew(x64, 32)) * g.double()).sum().backward()
    a64 = skew(x64.detach(), 32)
    rho = float(torch.linalg.eigvalsh(-(a64 @ a64)).max().sqrt())
    rel = float((x.grad.double() - x64.grad).norm() / x64.grad.norm())
    assert rel <= rho**8 / math.factorial(8) + 1e-6


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    n=st.integers(2, 24),
    log_scale=st.floats(-6, 2),
    rank=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_the_bound_is_above_the_spectral_radius(
    n: int, log_scale: float, rank: int, seed: int
) -> None:
    """Full, low-rank (one dominant rotation plane) and tiny spectra: ρ(A) <= the bound."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, min(rank, n), generator=g, dtype=F64)
    v = torch.randn(n, min(rank, n), generator=g, dtype=F64)
    a = 10.0**log_scale * (u @ v.T - v @ u.T)
    m = a.mT @ a
    t2, t3 = float((m @ m).trace()), float((m @ m @ m).trace())
    rho = float(torch.linalg.eigvalsh(m).max().clamp(min=0).sqrt())
    assert rho <= rho_bound(t2, t3) * (1 + 1e-9) + 1e-300


def test_oft_angles_take_no_squaring_and_eight_products() -> None:
    """128 blocks of 32x32 at a trained adapter's size: s = 0, and forward plus backward are
    8 batched products (3 + 5), the same number for 2 blocks."""
    from torch.profiler import ProfilerActivity, profile

    counts = []
    for k in (2, 128):
        x = coords(k, 32, 0.05, torch.float32).requires_grad_()
        g = torch.randn(k, 32, 32)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            r, s = expm_skew_blocks(x, 32)
            r.backward(g)
        assert s == 0
        names = [e.name for e in prof.events()]
        products = [m for m in names if m in ("aten::bmm", "aten::baddbmm", "aten::baddbmm_")]
        counts.append((len(products), len(names)))
    assert counts[0] == counts[1]
    assert counts[0][0] == 8


def test_huge_and_non_finite_coordinates() -> None:
    """Never a finite wrong value: a finite x whose powers overflow float32 takes the ‖A‖₁
    bound (s ≈ 64 squarings, hopeless in float32: the result is non-finite, or a rotation);
    a NaN coordinate gives NaN in its block, and the other blocks still get their own
    exponential (the squarings are chosen from the finite coordinates)."""
    x = coords(4, 6, 1.0, torch.float32)
    x[1] *= 1e18
    r, s = expm_skew_blocks(x, 6)
    assert s > 50
    r = r.double()
    orthogonal = float((r.mT @ r - torch.eye(6, dtype=F64)).abs().max()) < 1e-3
    assert orthogonal or not bool(torch.isfinite(r).all())
    x = coords(4, 6, 0.1, torch.float32)
    x[2, 0] = float("nan")
    r, _ = expm_skew_blocks(x, 6)
    assert bool(torch.isnan(r[2]).all()) and bool(r[[0, 1, 3]].isfinite().all())
    for bad in (float("nan"), float("inf")):  # (at angles that need squarings: s = 6 here)
        x = coords(2, 8, 0.5)
        expected = scipy_expm(skew(x[1:], 8))[0]
        x[0, 0] = bad
        r, s = expm_skew_blocks(x, 8)
        assert s > 0 and bool(torch.isnan(r[0]).all())
        torch.testing.assert_close(r[1], expected, atol=1e-13, rtol=0)


def test_half_precision_and_autocast() -> None:
    x = coords(8, 16, 0.05, torch.bfloat16)
    r, _ = expm_skew_blocks(x, 16)
    assert r.dtype == torch.bfloat16
    ref, _ = expm_skew_blocks(x.float(), 16)
    torch.testing.assert_close(r.float(), ref, atol=4e-3, rtol=0)
    x32 = coords(8, 16, 0.05, torch.float32).requires_grad_()
    g = torch.randn(8, 16, 16)
    r32, _ = expm_skew_blocks(x32, 16)
    (r32 * g).sum().backward()
    expected = x32.grad.clone()
    x32.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # forward and backward inside autocast
        r_ac, _ = expm_skew_blocks(x32, 16)
        assert r_ac.dtype == torch.float32
        (r_ac * g).sum().backward()
    torch.testing.assert_close(x32.grad, expected, atol=0, rtol=0)


def test_retain_graph_backward_twice_gives_the_same_gradient() -> None:
    """The backward reuses its own buffers, never the saved tensors."""
    x = coords(4, 8, 0.3).requires_grad_()
    r, s = expm_skew_blocks(x, 8)
    assert s > 0
    g = torch.randn(4, 8, 8, dtype=F64)
    (first,) = torch.autograd.grad(r, x, g, retain_graph=True)
    (second,) = torch.autograd.grad(r, x, g)
    assert torch.equal(first, second)


def test_batch_shapes_index_and_errors() -> None:
    x = coords(6, 4, 0.1).reshape(2, 3, 6)
    r, _ = expm_skew_blocks(x, 4, skew_index(4))
    assert r.shape == (2, 3, 4, 4)
    torch.testing.assert_close(r.reshape(6, 4, 4), expm_skew_blocks(x.reshape(6, 6), 4)[0])
    with pytest.raises(ValueError, match="4x4 skew block has 6 coordinates"):
        expm_skew_blocks(torch.zeros(3, 5), 4)


@pytest.mark.parametrize("scale", [0.05, 2.0])  # s = 0, and squarings with the polish
def test_the_custom_op_passes_opcheck_and_matches_eager(scale: float) -> None:
    """What torch.compile calls: torch.library's checks (schema, fake kernel, autograd
    registration, AOT dispatch), and the eager Function's value and gradient."""
    x = coords(5, 6, scale, torch.float32).requires_grad_()
    index = skew_index(6)
    torch.library.opcheck(torch.ops.manifoldparam.expm_skew_blocks_v1, (x, *index))
    r_op = torch.ops.manifoldparam.expm_skew_blocks_v1(x, *index)[0]
    g = torch.randn(5, 6, 6)
    (g_op,) = torch.autograd.grad(r_op, x, g)
    r, s = expm_skew_blocks(x, 6, index)
    (g_eager,) = torch.autograd.grad(r, x, g)
    assert (s == 0) == (scale < 0.1)
    torch.testing.assert_close(r_op, r, atol=0, rtol=0)
    torch.testing.assert_close(g_op, g_eager, atol=0, rtol=0)
    eye = torch.eye(6, dtype=F64)
    assert float((r.double().mT @ r.double() - eye).abs().max()) < 1e-6  # (polished)


def test_a_transposed_incoming_gradient() -> None:
    """The gradient that reaches the backward may have any strides (here Rᵀ·B is used: the
    gradient of R arrives transposed; float32 used to fail on a view of a transposed result)."""
    for dtype in (torch.float32, F64):
        x = coords(4, 8, 0.05, dtype).requires_grad_()
        b = torch.randn(4, 8, 3, dtype=dtype)
        r, _ = expm_skew_blocks(x, 8)
        (got,) = torch.autograd.grad((r.mT @ b).square().sum(), x, retain_graph=True)
        rt = r.mT.contiguous()
        (expected,) = torch.autograd.grad((rt @ b).square().sum(), x)
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


# (scale, squarings) per dtype: the traced branches (s = 0, 1) and the custom op (s >= 2)
_BRANCHES = {torch.float32: [(0.05, 0), (0.2, 1), (1.0, 3)], F64: [(0.005, 0), (0.02, 1), (0.3, 5)]}


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_compiled_matches_eager_on_every_branch(dtype: torch.dtype) -> None:
    """Under torch.compile (inductor, fullgraph) the choice of s is made in the graph: traced
    Taylor for s = 0 and 1 (no call of the custom ops: the profiler sees none), the custom ops
    beyond; each gives the eager value and gradient, with the gradient arriving transposed
    (Rᵀ·B, as in the adapter's weight), and NaN coordinates give NaN, as eagerly."""
    pytest.importorskip("torch._inductor")
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    b, c = (torch.randn(4, 8, 3, dtype=dtype, generator=gen) for _ in range(2))

    def loss(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = expm_skew_blocks(t, 8)[0]
        return r, ((r.mT @ b) * c).sum()  # (not ‖RᵀB‖², constant in R)

    compiled = torch.compile(loss, fullgraph=True)
    compiled(coords(4, 8, 0.1, dtype).requires_grad_())[1].backward()  # (compiles both graphs)
    eps = 1e-6 if dtype == torch.float32 else 1e-14  # (relative to the largest entry)
    for scale, squarings in _BRANCHES[dtype]:
        x = coords(4, 8, scale, dtype).requires_grad_()
        assert expm_skew_blocks(x, 8)[1] == squarings
        r, value = loss(x)
        (g,) = torch.autograd.grad(value, x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            r_c, value_c = compiled(x)
            (g_c,) = torch.autograd.grad(value_c, x)
        ops = {e.name for e in prof.events() if e.name.startswith("manifoldparam::")}
        assert ops == (set() if squarings <= 1 else {
            "manifoldparam::expm_skew_blocks_v1", "manifoldparam::expm_skew_blocks_backward_v1"
        })  # fmt: skip
        torch.testing.assert_close(r_c, r, atol=eps, rtol=0)
        torch.testing.assert_close(g_c, g, atol=eps * float(g.abs().max()), rtol=0)
    x = torch.full((4, 28), math.nan, dtype=dtype, requires_grad=True)
    assert bool(compiled(x)[0].isnan().all())


def test_compiled_with_dynamic_shapes() -> None:
    """torch.compile(dynamic=True): the custom ops for every s (torch 2.13 cannot trace the cond
    inside a Function with symbolic shapes), the eager value and gradient, any batch."""
    pytest.importorskip("torch._inductor")
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: expm_skew_blocks(t, 8)[0], fullgraph=True, dynamic=True)
    for k, scale in ((3, 0.03), (5, 1.0)):
        x = coords(k, 8, scale).requires_grad_()
        g = torch.randn(k, 8, 8, dtype=F64)
        (grad_c,) = torch.autograd.grad(compiled(x), x, g)
        r, _ = expm_skew_blocks(x, 8)
        (grad,) = torch.autograd.grad(r, x, g)
        torch.testing.assert_close(compiled(x), r, atol=0, rtol=0)
        torch.testing.assert_close(grad_c, grad, atol=0, rtol=0)
