"""Tests of manifoldparam.linalg.expm: value, gradient (exact adjoint), higher derivatives,
torch.func transforms, torch.compile, host syncs, and hypothesis property tests."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, seed, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck

from manifoldparam.linalg.expm import expm, expm_projected, expm_skew

F64 = torch.float64


def _rand(shape, norm: float, *, skew: bool = False, dtype=F64, gen_seed: int = 0) -> torch.Tensor:
    """Random (skew) matrices with spectral norm ``norm`` per matrix."""
    g = torch.Generator().manual_seed(gen_seed)
    x = torch.randn(*shape, generator=g, dtype=F64)
    if skew:
        x = x - x.mT
    if x.shape[-1] > 0 and norm > 0:
        x = x / torch.linalg.matrix_norm(x, 2)[..., None, None].clamp_min(1e-300) * norm
    return x.to(dtype)


def _grad(fn, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    a = a.detach().clone().requires_grad_()
    fn(a).backward(g)
    return a.grad


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def _frechet_adjoint_scipy(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """grad = L_exp(Aᵀ, G) by scipy's Al-Mohy–Higham implementation (float64, 2-D)."""
    out = scipy.linalg.expm_frechet(a.T.numpy(), g.numpy(), compute_expm=False, check_finite=False)
    return torch.from_numpy(np.asarray(out))


# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("skew", [False, True])
@pytest.mark.parametrize(
    ("shape", "norm"),
    [
        ((1, 1), 3.0),
        ((2, 2), 0.5),
        ((7, 7), 1e-9),
        ((16, 16), 8.0),
        ((3, 5, 5), 30.0),
        ((2, 2, 9, 9), 2.0),
        ((40, 40), 60.0),
    ],
)
def test_value_matches_matrix_exp(shape, norm, skew, dtype):
    a = _rand(shape, norm, skew=skew, dtype=dtype)
    ref = torch.linalg.matrix_exp(a.double())
    out = expm(a)
    assert out.dtype == dtype and out.shape == a.shape
    tol = 1e-12 if dtype == F64 else 2e-5
    assert _rel(out, ref) < tol * max(1.0, norm)


def test_batch_members_get_their_own_scaling():
    # One tiny and one huge matrix in a batch: each must match its own exponential.
    a = torch.stack([_rand((6, 6), 1e-3, gen_seed=1), _rand((6, 6), 80.0, gen_seed=2)])
    out = expm(a)
    for i in range(2):
        assert _rel(out[i], torch.linalg.matrix_exp(a[i])) < 1e-12


def test_skew_gives_orthogonal_float32():
    a = _rand((128, 128), 20.0, skew=True, dtype=torch.float32)
    x = expm(a)
    err = (x.mT @ x - torch.eye(128)).abs().max().item()
    err_torch = (lambda y: (y.mT @ y - torch.eye(128)).abs().max().item())(
        torch.linalg.matrix_exp(a)
    )
    assert err < 5 * 128 * torch.finfo(torch.float32).eps
    assert err <= 2 * err_torch + 1e-6


def test_huge_norm_float32_power_overflow():
    # ‖A‖⁶ overflows float32: the powers are recomputed from a pre-scaled A.
    a = torch.tensor([[0.0, 3e6], [-3e6, 0.0]])
    ref = torch.linalg.matrix_exp(a.double())
    err = (expm(a).double() - ref).abs().max().item()
    err_torch = (torch.linalg.matrix_exp(a).double() - ref).abs().max().item()
    assert err < 0.1 and err <= err_torch  # measured 0.03 vs torch's 2.2


def test_edge_cases():
    assert torch.equal(expm(torch.zeros(5, 5, dtype=F64)), torch.eye(5, dtype=F64))
    assert expm(torch.zeros(0, 0)).shape == (0, 0)
    assert expm(torch.zeros(3, 0, 0)).shape == (3, 0, 0)
    a = torch.tensor([[1.7]], dtype=F64)
    assert torch.allclose(expm(a), a.exp(), rtol=1e-15, atol=0)
    h = expm(_rand((4, 4), 1.0).half())
    assert h.dtype == torch.float16
    with pytest.raises(ValueError):
        expm(torch.zeros(2, 3))
    with pytest.raises(TypeError):
        expm(torch.zeros(2, 2, dtype=torch.int64))
    bad = torch.full((3, 3), float("nan"), dtype=F64)
    assert torch.isnan(expm(bad)).all()
    c = torch.randn(4, 4, dtype=torch.complex128)
    assert torch.allclose(expm(c), torch.linalg.matrix_exp(c), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_sync_free_mode_marks_matrices_beyond_its_squarings_nan(dtype):
    """``max_squarings=k`` cannot raise (that would need a host read): a matrix that needs more
    than k squarings comes out as NaN, not as a finite wrong value (at ρ = 1e4 and k = 10,
    10 squarings give a relative error of 0.8 with ``max|XᵀX - I|`` = 6e-5), and only that
    matrix of a batch."""
    a = _rand((6, 6), 1.0, skew=True, dtype=dtype)
    radii = [1e4, 2.0, 1e3]  # 1e3 needs 8 squarings in float32, 1e4 needs 12
    batch = torch.stack([r * a for r in radii])
    out = expm(batch, max_squarings=10)
    assert out[0].isnan().all()
    g = torch.randn_like(batch)
    grad = _grad(lambda x: expm(x, max_squarings=10), batch, g)
    ref = torch.linalg.matrix_exp(batch.double())
    ref_grad = _grad(torch.linalg.matrix_exp, batch.double(), g.double())
    eps = torch.finfo(dtype).eps
    for i in (1, 2):  # within range: exact to the conditioning (≈ ρ·eps)
        assert _rel(out[i], ref[i]) < 100 * radii[i] * eps
        assert _rel(grad[i], ref_grad[i]) < 100 * radii[i] * eps
    assert not expm(batch).isnan().any()  # the default mode reads the norms: no limit


def test_default_mode_without_data_takes_the_fixed_squarings():
    """Meta and fake tensors hold no numbers to read on the host: ``expm`` and the orthogonal
    map take the sync-free squarings there (shape propagation, ``module.to("meta")``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import manifoldparam as mp

    assert expm(torch.empty(3, 5, 5, device="meta")).shape == (3, 5, 5)
    layer = mp.orthogonal(torch.nn.Linear(6, 4, bias=False)).to("meta")
    assert layer.weight.is_meta and layer.weight.shape == (4, 6)
    with FakeTensorMode():
        a = torch.randn(2, 5, 5)
        assert expm(a).shape == (2, 5, 5)
        assert expm_skew(a).shape == (2, 5, 5)


def test_no_checked_solve(monkeypatch):
    """The solves skip their error checks (``lu_factor_ex``, ``solve_ex``): the checked ones
    read ``info`` on the host, a device sync on a GPU. Forward, backward, double backward and
    jvp of the Padé path with fixed squarings, and the Cayley map, never call them."""
    import manifoldparam as mp

    def checked(*args, **kwargs):
        raise AssertionError("a checked solve (it syncs on a GPU)")

    a = _rand((5, 5), 3.0, skew=True).requires_grad_()  # Padé, squarings
    layer = mp.orthogonal(torch.nn.Linear(5, 5, bias=False).double(), map="cayley")
    monkeypatch.setattr(torch.linalg, "lu_factor", checked)
    monkeypatch.setattr(torch.linalg, "solve", checked)
    fn = lambda x: expm(x, max_squarings=4)  # noqa: E731
    assert gradcheck(fn, (a,)) and gradgradcheck(fn, (a,))
    torch.func.jvp(fn, (a.detach(),), (torch.ones_like(a),))
    layer.weight.sum().backward()


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize(
    ("shape", "norm", "skew"),
    [
        ((1, 1), 2.0, False),
        ((2, 2), 1.0, True),
        ((2, 2), 0.3, False),
        ((5, 5), 50.0, False),
        ((6, 6), 50.0, True),
        ((3, 4, 4), 7.0, False),
        ((8, 8), 1e-6, False),
    ],
)
def test_gradcheck(shape, norm, skew):
    a = _rand(shape, norm, skew=skew).requires_grad_()
    assert gradcheck(expm, (a,))


def test_gradcheck_mixed_batch_and_complex():
    a = torch.stack([_rand((4, 4), 1e-2, gen_seed=3), _rand((4, 4), 40.0, gen_seed=4)])
    assert gradcheck(expm, (a.requires_grad_(),))
    c = torch.randn(3, 3, dtype=torch.complex128, generator=torch.Generator().manual_seed(5))
    assert gradcheck(expm, (c.requires_grad_(),))


@pytest.mark.parametrize(("shape", "norm"), [((2, 2), 1.0), ((2, 3, 3), 12.0), ((4, 4), 0.2)])
def test_gradgradcheck(shape, norm):
    a = _rand(shape, norm).requires_grad_()
    assert gradgradcheck(expm, (a,))


def test_hessian_vector_product_matches_matrix_exp():
    a = _rand((6, 6), 5.0, skew=True).requires_grad_()
    v = _rand((6, 6), 1.0, gen_seed=7)
    w = _rand((6, 6), 1.0, gen_seed=8)

    def hvp(fn):
        x = a.detach().clone().requires_grad_()
        loss = (fn(x) * w).sum() ** 2
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        (h,) = torch.autograd.grad((g * v).sum(), x)
        return h

    assert _rel(hvp(expm), hvp(torch.linalg.matrix_exp)) < 1e-11


@pytest.mark.parametrize("skew", [True, False])
def test_gradient_matches_scipy_frechet(skew):
    for n, norm in [(3, 0.1), (30, 4.0), (50, 40.0)]:
        a = _rand((n, n), norm, skew=skew, gen_seed=n)
        g = _rand((n, n), 1.0, gen_seed=n + 1)
        assert _rel(_grad(expm, a, g), _frechet_adjoint_scipy(a, g)) < 1e-12


@pytest.mark.parametrize("skew", [True, False])
def test_float32_gradient_no_worse_than_matrix_exp(skew):
    """Relative error of float32 gradients against a float64 reference, ours vs torch."""
    ours, theirs = [], []
    for k, (n, norm) in enumerate([(16, 0.5), (64, 5.0), (64, 40.0), (96, 2.0)]):
        a = _rand((n, n), norm, skew=skew, gen_seed=10 + k)
        g = _rand((n, n), 1.0, gen_seed=20 + k)
        ref = _grad(torch.linalg.matrix_exp, a, g)
        ours.append(_rel(_grad(expm, a.float(), g.float()), ref))
        theirs.append(_rel(_grad(torch.linalg.matrix_exp, a.float(), g.float()), ref))
    # Measured (torch 2.13 CPU): ours 2e-7..2e-6, torch's 2e-7..2e-5.
    assert np.mean(ours) <= 1.25 * np.mean(theirs), (ours, theirs)
    assert max(ours) < 1e-5


def _rotation_generator(n: int, rho: float, seed: int) -> torch.Tensor:
    """A skew matrix ``Q (⊕ θ_j J) Qᵀ`` with θ_j ∈ [ρ/2, ρ] in random coordinates: ρ(A) = ρ, and
    ``‖A‖₁`` about √n·ρ (the case where the 1-norm bound on d₃ is loosest). Exactly skew."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    theta = rho * (0.5 + 0.5 * torch.rand(n // 2, generator=g, dtype=F64))
    theta[0] = rho
    b = torch.zeros(n, n, dtype=F64)
    idx = torch.arange(0, n - 1, 2)
    b[idx, idx + 1], b[idx + 1, idx] = theta, -theta
    m = q @ b @ q.T
    return (m - m.T) / 2


@pytest.mark.parametrize(
    ("dtype", "rho", "bent_choice"),
    [(torch.float32, 0.5, (7, 0)), (torch.float64, 0.05, (8, 2))],
)
def test_skew_matrices_are_scaled_by_their_spectral_radius(dtype, rho, bent_choice):
    """A skew A is scaled from ``‖A²‖₁^{1/2} ≥ ρ(A)`` (every d_k of a normal matrix is ρ in
    the 2-norm), not from ``‖A‖₁``: T8 with one squaring, where the same matrix made non-skew
    by a 1e-6 perturbation needs T8 with two (float64) or Padé 7 (float32); values and
    gradients as accurate as before (float64: against matrix_exp and scipy's Fréchet
    derivative; float32: no worse than torch's own matrix_exp against the float64 reference)."""
    from manifoldparam.linalg._scheme import _forward

    a = _rotation_generator(64, rho, seed=3)
    assert torch.equal(a, -a.T)
    bent = a.clone()
    bent[0, 1] += 1e-6 * rho
    (_, _, (m, s, _)), (_, _, (m_bent, s_bent, _)) = (
        _forward(x.to(dtype), None) for x in (a, bent)
    )
    # Skew: T8 with one squaring; bent: T8 with two (float64) or, in float32, where T8 takes
    # at most one, Padé 7.
    assert (m, s) == (8, 1) and (m_bent, s_bent) == bent_choice, (m, s, m_bent, s_bent)
    g = _rand((64, 64), 1.0, gen_seed=4)
    ref = torch.linalg.matrix_exp(a)
    grad_ref = _frechet_adjoint_scipy(a, g)
    x, gx = expm(a.to(dtype)), _grad(expm, a.to(dtype), g.to(dtype))
    if dtype == F64:
        assert _rel(x, ref) < 1e-14 and _rel(gx, grad_ref) < 1e-13
    else:
        x_t = torch.linalg.matrix_exp(a.float())
        gx_t = _grad(torch.linalg.matrix_exp, a.float(), g.float())
        assert _rel(x, ref) <= 2 * _rel(x_t, ref) + 1e-7
        assert _rel(gx, grad_ref) <= 2 * _rel(gx_t, grad_ref) + 1e-7


@pytest.mark.parametrize(("n", "rho"), [(256, 0.9), (512, 1.2)])
def test_float32_taylor_takes_at_most_one_squaring(n, rho):
    """In float32, T8 with two squarings loses 3-10x more to rounding than Padé 7 without
    squarings: a skew "star" matrix (‖A‖₁ = √(n-1)·ρ, ‖A²‖₁^½ ≈ ρ) whose bound allows T8 with
    two squarings takes Padé 7, within 1e-6 of the float64 exponential (T8 s=2: 1.2e-6 to
    6.7e-6, torch 4.6e-6 / 2.2e-6), and so does its gradient."""
    from manifoldparam.linalg._scheme import _forward

    a = torch.zeros(n, n, dtype=F64)
    a[0, 1:], a[1:, 0] = 1.0, -1.0
    a = a * (rho / (n - 1) ** 0.5)
    assert _forward(a.float(), None)[2][:2] == (7, 0)
    g = _rand((n, n), 1.0, gen_seed=5)
    assert _rel(expm(a.float()), torch.linalg.matrix_exp(a)) < 1e-6
    assert _rel(_grad(expm, a.float(), g.float()), _frechet_adjoint_scipy(a, g)) < 1e-6


# ----------------------------------------------------------------------------- transforms
def _loss(x):
    return (expm(x) ** 2).sum()


def test_func_grad_and_vmap_per_sample_gradients():
    a = torch.stack([_rand((5, 5), r, skew=True, gen_seed=i) for i, r in enumerate([0.1, 3, 30])])
    x = a.clone().requires_grad_()
    _loss(x).backward()
    assert torch.allclose(torch.func.grad(_loss)(a), x.grad, rtol=1e-12, atol=1e-12)
    per_sample = torch.func.vmap(torch.func.grad(_loss))(a)
    assert torch.allclose(per_sample, x.grad, rtol=1e-12, atol=1e-12)
    # vmap over a batched input, nested vmap, and vmap over a non-leading dim.
    ref = torch.linalg.matrix_exp(a)
    assert torch.allclose(torch.func.vmap(expm)(a), ref, rtol=1e-12, atol=1e-12)
    b = a[None].expand(2, 3, 5, 5)
    assert torch.allclose(torch.func.vmap(torch.func.vmap(expm))(b), ref.expand_as(b), atol=1e-12)
    out = torch.func.vmap(expm, in_dims=1, out_dims=1)(b)
    assert torch.allclose(out, ref.expand_as(b), atol=1e-12)


def test_jacrev_and_grad_of_grad():
    a = _rand((3, 3), 2.0)
    j = torch.func.jacrev(expm)(a)
    jt = torch.func.jacrev(torch.linalg.matrix_exp)(a)
    assert _rel(j, jt) < 1e-12
    gg = torch.func.grad(lambda x: torch.func.grad(_loss)(x).sum())(a)
    ggt = torch.func.grad(
        lambda x: torch.func.grad(lambda y: (torch.linalg.matrix_exp(y) ** 2).sum())(x).sum()
    )(a)
    assert _rel(gg, ggt) < 1e-11


def test_forward_mode_jvp_jacfwd_hessian():
    for a in (_rand((4, 4), 0.1), _rand((4, 4), 20.0, gen_seed=1), _rand((2, 3, 3), 3.0)):
        e = torch.randn_like(a)
        _, t1 = torch.func.jvp(expm, (a,), (e,))
        _, t2 = torch.func.jvp(torch.linalg.matrix_exp, (a,), (e,))
        assert _rel(t1, t2) < 1e-12
        # The jvp is the Fréchet derivative L(A, E): compare with scipy as well.
        if a.dim() == 2:
            ref = scipy.linalg.expm_frechet(a.numpy(), e.numpy(), compute_expm=False)
            assert _rel(t1, torch.from_numpy(np.asarray(ref))) < 1e-12
    a = _rand((3, 3), 4.0)
    assert _rel(torch.func.jacfwd(expm)(a), torch.func.jacrev(torch.linalg.matrix_exp)(a)) < 1e-12
    h = torch.func.hessian(_loss)(a)
    ht = torch.func.hessian(lambda y: (torch.linalg.matrix_exp(y) ** 2).sum())(a)
    assert _rel(h, ht) < 1e-11
    assert gradcheck(expm, (a.clone().requires_grad_(),), check_forward_ad=True)


def test_torch_compile_inductor():
    a = _rand((2, 4, 4), 3.0)

    def f(x):
        return (expm(x, max_squarings=3) ** 2).sum()

    torch._dynamo.reset()
    cf = torch.compile(f, backend="inductor", fullgraph=True)
    x1 = a.clone().requires_grad_()
    y1 = cf(x1)
    y1.backward()
    x2 = a.clone().requires_grad_()
    y2 = _loss(x2)
    y2.backward()
    assert torch.allclose(y1, y2, rtol=1e-12)
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-10, atol=1e-12)


def test_torch_compile_default_mode_graph_break():
    # The default mode reads the norms on the host: a graph break, still correct.
    a = _rand((4, 4), 20.0)
    torch._dynamo.reset()
    cf = torch.compile(_loss, backend="aot_eager")
    x1 = a.clone().requires_grad_()
    cf(x1).backward()
    x2 = a.clone().requires_grad_()
    _loss(x2).backward()
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- host syncs
@contextlib.contextmanager
def _count_host_reads():
    names = ["item", "tolist", "__bool__", "__int__", "__float__", "__index__"]
    orig = {k: getattr(torch.Tensor, k) for k in names}
    calls: list[str] = []

    def wrap(k):
        def f(self, *args, **kwargs):
            calls.append(k)
            return orig[k](self, *args, **kwargs)

        return f

    for k in names:
        setattr(torch.Tensor, k, wrap(k))
    try:
        yield calls
    finally:
        for k, v in orig.items():
            setattr(torch.Tensor, k, v)


def test_taylor8_is_the_degree_8_taylor_polynomial():
    from manifoldparam.linalg._scheme import _taylor8

    a = _rand((7, 7), 0.9, gen_seed=11)
    taylor = sum(torch.linalg.matrix_power(a, k) / math.factorial(k) for k in range(9))
    assert float((_taylor8(a, a @ a)[0] - taylor).abs().max()) < 1e-15


# No functorch fallback warnings (an in-place op without a batching rule would raise here).
@pytest.mark.filterwarnings("error:There is a performance drop:UserWarning")
@pytest.mark.parametrize(("norm", "squarings"), [(0.01, 0), (0.05, 1), (0.1, 2)])
def test_taylor_path_value_and_every_derivative(norm, squarings):
    """Small float64 norms take the Taylor path (m = 8) with 0, 1, 2 squarings: value, gradient,
    double backward, forward mode and vmap agree with matrix_exp / finite differences."""
    from manifoldparam.linalg._scheme import _forward

    a = _rand((2, 5, 5), norm, gen_seed=12)
    a[1] *= 0.5  # the second matrix needs fewer squarings: masked
    _, _, (m, s_max, _) = _forward(a, None)
    assert (m, s_max) == (8, squarings)
    assert _rel(expm(a), torch.linalg.matrix_exp(a)) < 1e-14
    x = a.clone().requires_grad_()
    assert gradcheck(expm, (x,), check_forward_ad=True)
    assert gradgradcheck(expm, (x,))
    e = torch.randn_like(a)
    _, t1 = torch.func.jvp(expm, (a,), (e,))
    _, t2 = torch.func.jvp(torch.linalg.matrix_exp, (a,), (e,))
    assert _rel(t1, t2) < 1e-13
    assert _rel(torch.func.vmap(torch.func.grad(_loss))(a), torch.func.grad(_loss)(a)) < 1e-13


def test_host_reads():
    a = _rand((2, 6, 6), 30.0, skew=True).requires_grad_()
    g = torch.randn(2, 6, 6, dtype=F64)
    small = _rand((2, 6, 6), 0.01, skew=True)
    with _count_host_reads() as calls:
        expm(small)
    assert calls == ["tolist"]  # ‖A‖, ‖A²‖: Taylor T8, nothing else
    with _count_host_reads() as calls:
        y = expm(a)
    # ‖A‖, ‖A²‖ (too large for T8), ‖A⁴‖ (still too large), then Padé's norms.
    assert calls == ["tolist", "tolist", "tolist"]
    with _count_host_reads() as calls:
        y.backward(g)
    assert calls == []
    with _count_host_reads() as calls:
        z = expm(a.detach().requires_grad_(), max_squarings=5)
        z.backward(g)
    assert calls == []
    assert _rel(z, y) < 1e-13


def test_sharper_d4_keeps_taylor_where_the_a2_bound_fails():
    """Skew A (float64, n = 32, ρ = 0.12): ‖A²‖₁^½ = 0.177 asks for 3 squarings of T_8 (more
    than the 2 allowed, hence Padé 13 before), ‖A⁴‖₁^¼ = 0.146 (also a bound on ρ) for 2:
    T_8 it is, after a second host read, with the value and gradient of matrix_exp."""
    from manifoldparam.linalg._scheme import _forward

    gen = torch.Generator().manual_seed(5)
    low = torch.randn(32, 32, generator=gen, dtype=F64).tril(-1)
    a = low - low.mT
    a = a * (0.12 / torch.linalg.matrix_norm(a, 2))
    assert _forward(a, None)[2][:2] == (8, 2)
    with _count_host_reads() as calls:
        y = expm(a)
    assert calls == ["tolist", "tolist"]
    assert _rel(y, torch.linalg.matrix_exp(a)) < 1e-14
    g = torch.randn(32, 32, generator=gen, dtype=F64)
    assert _rel(_grad(expm, a, g), _grad(torch.linalg.matrix_exp, a, g)) < 1e-12


@pytest.mark.parametrize("projected", [False, True])
def test_frobenius_bound_keeps_taylor_without_a4(projected):
    """A float32 skew A whose spectrum is dominated by a few eigenvalue pairs (as a trained
    RNN kernel's): ‖A²‖₁^½ > 0.88 would need two squarings of T_8 (float32 allows one), but
    ρ(A)² ≤ ‖A²‖_F gives 0.75: T_8 with one squaring, chosen after one host read (no A⁴), with
    matrix_exp's value and gradient (the projected variant: its skew part)."""
    from manifoldparam.linalg._scheme import _forward
    from manifoldparam.linalg.expm import expm_projected

    n = 64
    gen = torch.Generator().manual_seed(8)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    theta = torch.cat([torch.tensor([0.6, 0.45, 0.3]), 0.2 * torch.rand(n // 2 - 3, generator=gen)])
    block = torch.zeros(n, n, dtype=F64)
    i = torch.arange(0, n, 2)
    block[i + 1, i], block[i, i + 1] = theta.double(), -theta.double()
    a64 = q @ block @ q.mT
    a = (a64 - a64.mT).float() / 2  # exactly skew in float32
    a2 = (a @ a).double()
    assert float(a2.abs().sum(0).max()) ** 0.5 > 0.88 > float(torch.linalg.matrix_norm(a2)) ** 0.5
    assert _forward(a, None, skew=projected)[2][:2] == (8, 1)
    fn = expm_projected if projected else expm
    with _count_host_reads() as calls:
        y = fn(a)
    assert calls == ["tolist"]
    assert _rel(y.double(), torch.linalg.matrix_exp(a.double())) < 1e-6
    g = torch.randn(n, n, generator=gen, dtype=F64)
    x = a.double().requires_grad_()
    (ref,) = torch.autograd.grad(torch.linalg.matrix_exp(x), x, g)
    got = _grad(fn, a, g.float()).double()
    if projected:  # only the skew part is the gradient
        got, ref = got - got.mT, ref - ref.mT
    assert _rel(got, ref) < 1e-5


def test_projected_reads_the_one_norm_when_the_frobenius_bound_fails():
    """expm_projected reads ‖A²‖_F first; for a flat spectrum (a random skew A) ‖A²‖₁ is the
    sharper bound and is read second: T_8 with one squaring after two reads, no A⁴."""
    from manifoldparam.linalg._scheme import _forward
    from manifoldparam.linalg.expm import expm_projected

    gen = torch.Generator().manual_seed(9)
    low = torch.randn(96, 96, generator=gen).tril(-1)
    a = low - low.mT
    a2 = (a @ a).double()
    a = a * (0.85 / float(a2.abs().sum(0).max()) ** 0.5)  # ‖A²‖₁^½ = 0.85
    a2 = (a @ a).double()
    assert float(torch.linalg.matrix_norm(a2)) ** 0.5 > 0.88 > float(a2.abs().sum(0).max()) ** 0.5
    assert _forward(a, None, skew=True)[2][:2] == (8, 1)
    with _count_host_reads() as calls:
        y = expm_projected(a)
    assert calls == ["tolist", "tolist"]
    assert _rel(y, torch.linalg.matrix_exp(a.double())) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex128])
def test_host_choice_is_the_device_formula(dtype):
    """The default mode chooses (m, s) on the host from the read norms; the sync-free mode
    evaluates the same formula on the device. Same s for every matrix of a batch spanning
    many orders of magnitude (m = 7 when every float64 matrix is below theta_7)."""
    from manifoldparam.linalg._scheme import _THETA7, _choose

    torch.manual_seed(0)
    # Dense in scale, so that any change of a norm estimate moves some s across a power of 2.
    # (float32 stops at 1e3: beyond, the device's products of norms overflow to inf and it
    # falls back to a cruder bound, so its s is larger; the host computes them in float64.)
    top = 3 if dtype == torch.float32 else 5
    scales = torch.logspace(-6, top, 801, dtype=torch.float64)
    a = torch.randn(801, 6, 6, dtype=dtype) * scales[:, None, None].to(dtype)
    # Non-normal members (strictly upper triangular plus a small diagonal): their powers decay
    # fast, so d4, d6, d8, d10 differ and each enters the choice.
    a[1::2] = a[1::2].triu(1) * 30 + 0.1 * a[1::2].diagonal(dim1=-2, dim2=-1).diag_embed()
    # Skew(-Hermitian) members: chosen from the bound on ρ(A) (see expm._skew).
    a[::4] = a[::4] - a[::4].mH
    for batch in (a, a[:3]):
        a2 = batch @ batch
        a4, a6 = a2 @ a2, a2 @ a2 @ a2
        m, s, s_max, uniform, overflow, beyond = _choose(batch, a2, a4, a6, None)
        assert beyond is None
        m_dev, s_dev, *_ = _choose(batch, a2, a4, a6, 1000)
        assert not overflow and s_max == int(s.max()) and uniform == bool((s == s.max()).all())
        single = dtype == torch.float32
        d6 = torch.linalg.matrix_norm(a6, 1) ** (1 / 6)
        if not single and bool((d6 <= _THETA7).all()) and s_max == 0:
            assert m == 7
            continue
        assert m == m_dev
        assert torch.equal(s, s_dev)


def test_max_squarings_mode_matches_default():
    a = torch.stack([_rand((5, 5), r, gen_seed=i) for i, r in enumerate([1e-3, 1.0, 40.0])])
    g = torch.randn_like(a)
    ref = _grad(expm, a, g)
    assert _rel(_grad(lambda x: expm(x, max_squarings=6), a, g), ref) < 1e-12
    assert gradcheck(lambda x: expm(x, max_squarings=4), (a.clone().requires_grad_(),))


# ----------------------------------------------------------------------------- properties
_norms = st.floats(min_value=-8.0, max_value=2.0).map(lambda e: 10.0**e)


@seed(20240517)
@settings(max_examples=40, deadline=None, derandomize=True)
@given(n=st.integers(1, 64), log_norm=_norms, skew=st.booleans(), s=st.integers(0, 2**16))
def test_property_value_and_gradient(n, log_norm, skew, s):
    a = _rand((n, n), log_norm, skew=skew, gen_seed=s)
    g = _rand((n, n), 1.0, gen_seed=s + 1)
    out = expm(a)
    ref = torch.linalg.matrix_exp(a)
    assert _rel(out, ref) < 1e-12 * max(1.0, log_norm)
    grad = _grad(expm, a, g)
    assert _rel(grad, _frechet_adjoint_scipy(a, g)) < 1e-12 * max(1.0, log_norm)


# --------------------------------------------------------------------------- expm_skew


def _lower(shape, seed: int = 0, dtype=F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64).tril(-1).to(dtype)


def _via_expm(low: torch.Tensor) -> torch.Tensor:
    return expm(low - low.mT)


# Taylor with 0 / 1 / 2 squarings, Padé 7, Padé 13 without and with (4) squarings (checked
# with _forward's method); a batch mixing paths is in the gradcheck below.
SKEW_CASES = [
    ((6, 6), 0.01),
    ((6, 6), 0.02),
    ((6, 6), 0.03),
    ((6, 6), 0.1),
    ((6, 6), 0.4),
    ((5, 5), 12.0),
]


@pytest.mark.parametrize(("shape", "norm"), SKEW_CASES)
def test_expm_skew_is_expm_of_l_minus_lt_value_and_gradient(shape, norm):
    """Same value as ``expm(L - Lᵀ)`` and the same gradient w.r.t. ``L`` (float64, to
    round-off), on every path (its backward uses the projected last step)."""
    low = _lower(shape) * norm
    g = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    assert _rel(expm_skew(low), _via_expm(low)) < 1e-14
    assert _rel(_grad(expm_skew, low, g), _grad(_via_expm, low, g)) < 1e-12
    # Any square L, not only a triangle: the gradient is exact w.r.t. every entry.
    full = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(2)) * norm
    assert _rel(_grad(expm_skew, full, g), _grad(_via_expm, full, g)) < 1e-12


@pytest.mark.parametrize(("shape", "norm"), SKEW_CASES)
def test_expm_projected_gradient_is_exact_in_its_skew_part_only(shape, norm):
    """``expm_projected(A)``: the value of ``expm(A)``; the gradient w.r.t. ``A`` is not ``Ā``
    (one product is skipped), but its skew part ``P(Y) = Y - Yᵀ`` is ``P(Ā)``: what a caller
    whose construction of ``A`` applies ``P`` (``L - Lᵀ``, ``Orthogonal.skew``) receives."""
    low = _lower(shape) * norm
    a = low - low.mT
    g = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    y, ref = _grad(expm_projected, a, g), _grad(expm, a, g)
    assert _rel(expm_projected(a), expm(a)) < 1e-14
    assert _rel(y - y.mT, ref - ref.mT) < 1e-12
    assert _rel(y, ref) > 1e-3  # not the full gradient: the skipped product is real


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_expm_skew_half_precision_subtracts_in_float32(dtype):
    """``L - Lᴴ`` is formed after the upcast (rounding it in half precision would change A):
    a full square L, whose entries above and below the diagonal are both nonzero."""
    gen = torch.Generator().manual_seed(3)
    low = (torch.randn(6, 6, generator=gen) * 0.7).to(dtype)
    ref = expm_skew(low.float()).to(dtype)
    assert torch.equal(expm_skew(low), ref)


def test_expm_skew_mixed_batch_gradcheck_and_gradgradcheck():
    low = torch.stack([_lower((4, 4), i) * r for i, r in enumerate([0.02, 0.3, 9.0])])
    low.requires_grad_()
    assert gradcheck(expm_skew, (low,))
    assert gradgradcheck(expm_skew, (low,))


def test_expm_skew_under_torch_func():
    low = torch.stack([_lower((5, 5), i) * r for i, r in enumerate([0.05, 2.0])])
    # Not a function of row or column sums of squares (those are constant on O(n)).
    weight = torch.randn(5, 5, dtype=F64, generator=torch.Generator().manual_seed(3))

    def loss(x):
        return (expm_skew(x) ** 3 * weight).sum()

    def loss_ref(x):
        return (_via_expm(x) ** 3 * weight).sum()

    assert (
        _rel(
            torch.func.vmap(torch.func.grad(loss))(low),
            torch.func.vmap(torch.func.grad(loss_ref))(low),
        )
        < 1e-12
    )
    e = torch.randn_like(low)
    _, t = torch.func.jvp(expm_skew, (low,), (e,))
    _, t_ref = torch.func.jvp(_via_expm, (low,), (e,))
    assert _rel(t, t_ref) < 1e-12
    h = torch.func.hessian(loss)(low[0])
    assert _rel(h, torch.func.hessian(loss_ref)(low[0])) < 1e-10


def _count_products(fn) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (
                torch.ops.aten.mm.default,
                torch.ops.aten.bmm.default,
                torch.ops.aten.addmm.default,
                torch.ops.aten.addmm_.default,
                torch.ops.aten.baddbmm.default,
            ):
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


@pytest.mark.parametrize("norm", [0.01, 1.0])  # Taylor, Padé 7
def test_expm_skew_backward_saves_one_product(norm):
    low = (_lower((8, 8)) * norm).requires_grad_()
    g = torch.randn(8, 8, dtype=F64)
    ours = expm_skew(low)
    ref = _via_expm(low)
    n_ours = _count_products(lambda: torch.autograd.grad(ours, low, g))
    n_ref = _count_products(lambda: torch.autograd.grad(ref, low, g))
    assert n_ours == n_ref - 1
