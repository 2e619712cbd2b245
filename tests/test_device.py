"""The library on an accelerator: every test runs on ``device`` = "cpu" and "cuda" (skipped
without a CUDA device), so the CPU run checks the tests' logic and a GPU run checks CUDA.

* orthogonal (expm and Cayley): membership (geoopt), registration keeps the weight, assignment
  round-trips, values and gradients equal a CPU float64 reference of the same coordinates;
* on CUDA the backward of a registered weight never synchronises with the host, nor does the
  forward with ``max_squarings`` or the Cayley map (``torch.cuda.set_sync_debug_mode("error")``),
  and a training step captures in a CUDA graph (which fails on any host read: the default
  switches to the sync-free squarings there);
* ``expm`` / ``expm_projected`` / ``expm_skew`` against ``torch.linalg.matrix_exp`` in float64,
  with norm-based and with fixed masked squarings, and ``gradcheck`` on the device;
* caching: an RNN reading its kernel ``T`` times gives the uncached loss and gradients and is
  fresh after an optimizer step (also a fused one);
* SPD, box and orthant: membership and ``right_inverse`` round trips;
* ``training_state`` / ``load_training_state``: training resumes bit for bit on the device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.autograd import gradcheck

import manifoldparam as mp
from manifoldparam.hard.base import Parametrization
from manifoldparam.linalg.expm import expm, expm_projected, expm_skew
from tests.cases import CASES
from tests.cases import IDS as CASE_IDS
from tests.conftest import (
    RNN,
    assert_on_stiefel,
    assert_same,
    assert_spd,
    atol_for,
    counting,
    grads,
    loss_of,
    solve_lbfgs,
    via_bytes,
)

F64 = torch.float64
DTYPES = [torch.float32, F64]
MAPS = ["expm", "cayley"]
# (rows, cols) of the weight: square, wide (orthonormal rows), tall (orthonormal columns).
SHAPES = [(8, 8), (5, 9), (9, 4)]

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(
    params=[
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")),
    ]
)
def device(request: pytest.FixtureRequest) -> Iterator[torch.device]:
    """The device under test; float32 products in full precision (no TF32) while it runs."""
    dev = torch.device(request.param)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield dev
    finally:
        torch.set_float32_matmul_precision(precision)


# ============================================================================ helpers


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int) -> Tensor:
    """Seeded float64 normal samples on the CPU (the same numbers for every device)."""
    return torch.randn(*shape, generator=gen(seed), dtype=F64)


def orthonormal(rows: int, cols: int, seed: int) -> Tensor:
    """A random float64 matrix with orthonormal columns (tall) or rows (wide), on the CPU."""
    n, k = max(rows, cols), min(rows, cols)
    q, _ = torch.linalg.qr(randn(n, k, seed=seed))
    return q if rows >= cols else q.T


def original(module: nn.Module, name: str = "weight") -> Tensor:
    return module.parametrizations[name].original


def param(module: nn.Module, name: str = "weight") -> Parametrization:
    p = module.parametrizations[name][0]
    assert isinstance(p, Parametrization)
    return p


def set_coords(module: nn.Module, values: Tensor, name: str = "weight") -> None:
    with torch.no_grad():
        original(module, name).copy_(values)


def rel_err(actual: Tensor, ref: Tensor) -> float:
    """``max|actual - ref| / max(1, max|ref|)``, computed in float64 on the CPU."""
    a, r = actual.detach().cpu().double(), ref.detach().cpu().double()
    return float((a - r).abs().max() / r.abs().max().clamp_min(1.0))


def warm_up_off_stream(step: Callable[[], object], times: int) -> None:
    """Run ``step`` on a side stream before a CUDA graph capture (handles, workspaces), as
    torch requires, then make the current stream wait for it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(times):
            step()
    torch.cuda.current_stream().wait_stream(side)


def on_device(t: Tensor, device: torch.device) -> bool:
    return t.device.type == device.type


def orth_linear(
    rows: int, cols: int, device: torch.device | str, dtype: torch.dtype, map: str, **kw: Any
) -> nn.Linear:
    layer = nn.Linear(cols, rows, bias=False, device=device, dtype=dtype)
    return mp.orthogonal(layer, map=map, **kw)  # type: ignore[return-value]


# ============================================================================ 1. orthogonal


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("map", MAPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_orthogonal_weight_on_stiefel(device, dtype, map, shape) -> None:
    rows, cols = shape
    layer = orth_linear(rows, cols, device, dtype, map)
    p = param(layer)
    assert on_device(p.base, device) and on_device(original(layer), device)
    for i, scale in enumerate([0.0, 0.3, 3.0, 30.0]):
        set_coords(layer, scale * randn(p.dim, seed=i))
        w = layer.weight
        assert on_device(w, device) and w.dtype == dtype and w.shape == (rows, cols)
        assert_on_stiefel(w)
        assert p.check(w)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("map", MAPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_orthogonal_keeps_the_initial_weight_and_assignment_round_trips(
    device, dtype, map, shape
) -> None:
    rows, cols = shape
    n = max(rows, cols)
    tol = 1e-12 if dtype == F64 else atol_for(dtype, n)
    layer = nn.Linear(cols, rows, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(orthonormal(rows, cols, seed=1))
    before = layer.weight.detach().clone()
    mp.orthogonal(layer, map=map)
    torch.testing.assert_close(layer.weight, before, atol=tol, rtol=0)

    q = orthonormal(rows, cols, seed=2).to(device=device, dtype=dtype)
    layer.weight = q
    assert on_device(param(layer).base, device)
    assert bool((original(layer) == 0).all())
    torch.testing.assert_close(layer.weight, q, atol=tol, rtol=0)

    # A value off the set is refused and the weight is left as it was.
    current = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="not orthogonal"):
        layer.weight = 1.5 * q
    assert torch.equal(layer.weight, current)


def reference_orthogonal(coords: Tensor, base: Tensor, rows: int, cols: int, map: str) -> Tensor:
    """The documented map in plain torch ops (for float64 on the CPU): ``W = B·φ(A)[:, :k]``,
    transposed when wide, ``A = L - Lᵀ`` with the coordinates in the free entries of ``L``
    (``i > j``, ``j < k``, in ``tril_indices`` order) and ``φ`` = ``matrix_exp`` or Cayley. No
    Newton--Schulz step: on the manifold it is the identity to first order."""
    n, k = max(rows, cols), min(rows, cols)
    ii, jj = torch.tril_indices(n, n, offset=-1)
    keep = jj < k
    low = torch.zeros(n, n, dtype=coords.dtype).index_put((ii[keep], jj[keep]), coords)
    a = low - low.T
    eye = torch.eye(n, dtype=a.dtype)
    if map == "expm":
        e = torch.linalg.matrix_exp(a)
    else:
        e = torch.linalg.solve(eye - 0.5 * a, eye + 0.5 * a)
    t = base @ e[:, :k]
    return t if rows >= cols else t.T


def loss_orth(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return ((torch.tanh(x @ w.T) - y) ** 2).sum()


@pytest.mark.parametrize("scale", [0.3, 3.0])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("map", MAPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_orthogonal_gradient_equals_cpu_float64(device, dtype, map, shape, scale) -> None:
    """Value, loss and gradient w.r.t. the coordinates on ``device`` in ``dtype`` equal those
    of the same coordinates and base point through torch's own ``matrix_exp`` / ``solve`` on
    the CPU in float64 (scale 3: Padé and squarings on the CPU)."""
    rows, cols = shape
    n = max(rows, cols)
    base = orthonormal(n, n, seed=3)  # a base point other than the identity
    layer = orth_linear(rows, cols, device, dtype, map)
    coords = scale * randn(param(layer).dim, seed=4)
    x, y = randn(7, cols, seed=5), randn(7, rows, seed=6)

    leaf = coords.clone().requires_grad_()
    w_ref = reference_orthogonal(leaf, base, rows, cols, map)
    loss_ref = loss_orth(w_ref, x, y)
    loss_ref.backward()
    assert leaf.grad is not None and float(leaf.grad.abs().max()) > 0

    with torch.no_grad():
        param(layer).base.copy_(base)
    set_coords(layer, coords)
    w = layer.weight
    loss = loss_orth(w, x.to(device, dtype), y.to(device, dtype))
    loss.backward()
    grad = original(layer).grad
    assert grad is not None and on_device(grad, device) and grad.dtype == dtype

    tol = 1e-12 if dtype == F64 else 1e-5
    assert rel_err(w, w_ref) < tol
    assert rel_err(loss, loss_ref) < tol
    assert rel_err(grad, leaf.grad) < tol


# ============================================================================ 2. no host sync


def _sync_free_step(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("mode", ["plain", "cached", "auto"])
@pytest.mark.parametrize("map", [*MAPS, "expm, max_squarings"])
def test_orthogonal_forward_backward_do_not_sync_on_cuda(device, map, mode) -> None:
    """The backward never reads anything on the host; the forward does so only for the default
    exponential's norms (one read per evaluation): with ``max_squarings`` (a fixed number of
    masked squarings) and for the Cayley map (the solve skips its error check) a training
    step's forward and backward run with synchronising calls turned into errors.
    Registration (SVD, QR) may sync."""
    if device.type != "cuda":
        pytest.skip("torch.cuda.set_sync_debug_mode exists for CUDA only")
    torch.manual_seed(0)
    kind, squarings = map.split(", ")[0], 10 if "max_squarings" in map else None
    model = nn.Sequential(
        orth_linear(48, 48, device, torch.float32, kind, max_squarings=squarings),  # square
        orth_linear(20, 48, device, torch.float32, kind, max_squarings=squarings),  # wide
        nn.Tanh(),
        orth_linear(30, 20, device, torch.float32, kind, max_squarings=squarings),  # tall
    )
    for i, layer in enumerate(m for m in model if isinstance(m, nn.Linear)):
        set_coords(layer, 2.0 * randn(param(layer).dim, seed=10 + i))  # Padé, squarings
    if mode == "auto":
        mp.auto_cache(model)
    ctx = mp.cached if mode == "cached" else contextlib.nullcontext
    x = randn(16, 48, seed=20).float().to(device)
    y = randn(16, 30, seed=21).float().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with ctx():
        _sync_free_step(model, x, y)  # warm-up: handles, workspaces, the base check
    opt.step()
    torch.cuda.synchronize()
    forward_syncs = squarings is None and kind == "expm"
    losses = []
    for _ in range(2):
        opt.zero_grad()
        with ctx():
            with contextlib.nullcontext() if forward_syncs else _no_sync():
                loss = ((model(x) - y) ** 2).mean()
            with _no_sync():
                loss.backward()
            losses.append(loss.detach())
        opt.step()
    assert all(bool(torch.isfinite(v)) for v in losses)
    for layer in (m for m in model if isinstance(m, nn.Linear)):
        assert_on_stiefel(layer.weight)
        assert bool(torch.isfinite(original(layer).grad).all())


@contextlib.contextmanager
def _no_sync() -> Iterator[None]:
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_sync_debug_mode_catches_a_host_read(device) -> None:
    """The sync test above can fail: a host read (what ``max_squarings=None`` does off the
    CPU) raises under the same mode."""
    if device.type != "cuda":
        pytest.skip("torch.cuda.set_sync_debug_mode exists for CUDA only")
    a = randn(6, 6, seed=0).to(device)
    expm(a)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        expm(a, max_squarings=8)  # sync-free: fine
        with pytest.raises(RuntimeError, match="synchroniz"):
            expm(a)  # the norms are read on the host
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("map", MAPS)
def test_orthogonal_step_captures_in_a_cuda_graph(device, map) -> None:
    """Stricter than the debug mode (a prototype that "does not yet detect all synchronizing
    operations"): a CUDA graph cannot capture any host read or synchronisation, so the default
    exponential takes its sync-free squarings while capturing. The captured forward+backward,
    replayed with new data and new coordinates, equals eager autograd (which reads the norms:
    another approximant of exp, equal to float32 round-off)."""
    if device.type != "cuda":
        pytest.skip("CUDA graphs exist for CUDA only")
    model = nn.Sequential(
        orth_linear(24, 24, device, torch.float32, map),
        nn.Tanh(),
        orth_linear(10, 24, device, torch.float32, map),  # wide
    )
    layers = [m for m in model if isinstance(m, nn.Linear)]
    for i, layer in enumerate(layers):
        set_coords(layer, 2.0 * randn(param(layer).dim, seed=80 + i))
    params = [original(layer) for layer in layers]
    x = randn(8, 24, seed=82).float().to(device)
    y = randn(8, 10, seed=83).float().to(device)

    def loss_fn() -> Tensor:
        return ((model(x) - y) ** 2).mean()

    warm_up_off_stream(lambda: loss_fn().backward(), 3)
    for p in params:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = loss_fn()
        loss.backward()
        static_loss = loss.detach()  # (only the value: the captured autograd graph can go)
    del loss

    for i in range(2):
        with torch.no_grad():  # new data and coordinates, in the captured tensors
            x.copy_(randn(8, 24, seed=84 + i).float())
            y.copy_(randn(8, 10, seed=86 + i).float())
            for j, p in enumerate(params):
                p.copy_(0.5 * (i + 1) * randn(p.numel(), seed=88 + 2 * i + j).float())
        graph.replay()
        loss = loss_fn()
        eager = torch.autograd.grad(loss, params)
        assert rel_err(static_loss, loss) < 1e-5
        for p, g in zip(params, eager, strict=True):
            assert p.grad is not None and float(g.abs().max()) > 0
            assert rel_err(p.grad, g) < 1e-5


# ============================================================================ 3. expm


def rand_matrix(shape: tuple[int, ...], norm: float, *, skew: bool, seed: int) -> Tensor:
    """Random (skew) float64 matrices with spectral norm ``norm`` each, on the CPU."""
    x = randn(*shape, seed=seed)
    if skew:
        x = x - x.mT
    return x / torch.linalg.matrix_norm(x, 2)[..., None, None] * norm


EXPM_CASES = {
    "taylor": ((6, 6), 0.05, False),
    "pade": ((9, 9), 1.5, False),
    "squarings": ((9, 9), 12.0, False),
    "skew-large": ((12, 12), 60.0, True),
    "batch": ((3, 7, 7), 4.0, False),
}


def mixed_batch() -> Tensor:
    """Matrices of very different norms in one batch: each gets its own squarings."""
    return torch.stack(
        [
            rand_matrix((7, 7), 1e-3, skew=False, seed=1),
            rand_matrix((7, 7), 2.0, skew=False, seed=2),
            rand_matrix((7, 7), 40.0, skew=True, seed=3),
        ]
    )


@pytest.mark.parametrize("max_squarings", [None, 10])
@pytest.mark.parametrize("case", [*EXPM_CASES, "mixed-batch"])
def test_expm_matches_matrix_exp_float64(device, case, max_squarings) -> None:
    if case == "mixed-batch":
        a, norm = mixed_batch(), 40.0
    else:
        shape, norm, skew = EXPM_CASES[case]
        a = rand_matrix(shape, norm, skew=skew, seed=7)
    ref = torch.linalg.matrix_exp(a)  # CPU, float64
    out = expm(a.to(device), max_squarings=max_squarings)
    assert on_device(out, device) and out.dtype == F64
    mats = out.reshape(-1, *a.shape[-2:]).cpu()
    for i, (o, r) in enumerate(zip(mats, ref.reshape(-1, *a.shape[-2:]), strict=True)):
        err = float((o - r).norm() / r.norm())
        assert err < 1e-12 * max(1.0, norm), (i, err)


@pytest.mark.parametrize("max_squarings", [None, 10])
@pytest.mark.parametrize("norm", [0.2, 2.0, 60.0])
def test_expm_projected_and_skew_match_matrix_exp_float64(device, norm, max_squarings) -> None:
    lower = torch.tril(randn(2, 10, 10, seed=8), -1)
    lower = lower / torch.linalg.matrix_norm(lower - lower.mT, 2)[..., None, None] * norm
    a = lower - lower.mT
    ref = torch.linalg.matrix_exp(a)
    out = expm_projected(a.to(device), max_squarings=max_squarings)
    out_skew = expm_skew(lower.to(device), max_squarings=max_squarings)
    assert on_device(out, device) and on_device(out_skew, device)
    tol = 1e-12 * max(1.0, norm)
    assert float((out.cpu() - ref).norm() / ref.norm()) < tol
    assert float((out_skew.cpu() - ref).norm() / ref.norm()) < tol

    # The gradient w.r.t. the lower triangle equals matrix_exp's, through the same P(Ā).
    g = randn(2, 10, 10, seed=9)
    low_ref = lower.clone().requires_grad_()
    torch.linalg.matrix_exp(low_ref - low_ref.mT).backward(g)
    low = lower.to(device).requires_grad_()
    expm_skew(low, max_squarings=max_squarings).backward(g.to(device))
    assert low.grad is not None and low_ref.grad is not None
    assert rel_err(low.grad, low_ref.grad) < 1e-11 * max(1.0, norm)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_expm_captures_in_a_cuda_graph(device, dtype) -> None:
    """``expm`` with ``max_squarings=None`` reads norms on the host, which a CUDA graph cannot
    capture: while capturing it takes ``SYNC_FREE_SQUARINGS`` masked squarings instead, so the
    replayed graph is exact for new inputs, also ones that need squarings."""
    if device.type != "cuda":
        pytest.skip("CUDA graphs exist for CUDA only")

    def skew(scale: float, seed: int) -> Tensor:  # spectral radius ≈ 7.3·scale
        x = randn(12, 12, seed=seed)
        return scale * (x - x.mT)

    a = skew(0.1, 90).to(device=device, dtype=dtype).requires_grad_()
    g = randn(12, 12, seed=91).to(device=device, dtype=dtype)
    warm_up_off_stream(lambda: expm(a).backward(g), 2)
    a.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = expm(a)
        y.backward(g)
        out = y.detach()
    del y
    tol = 1e-12 if dtype == F64 else 1e-5
    for i, scale in enumerate([0.1, 6.0]):  # ρ = 0.78 (no squaring), then 44 (several)
        with torch.no_grad():
            a.copy_(skew(scale, 92 + i))
        graph.replay()
        ref = a.detach().cpu().double().requires_grad_()
        want = torch.linalg.matrix_exp(ref)
        want.backward(g.cpu().double())
        assert rel_err(out, want) < tol
        assert a.grad is not None
        assert rel_err(a.grad, ref.grad) < tol


@pytest.mark.parametrize("max_squarings", [None, 6])
@pytest.mark.parametrize("norm", [0.1, 3.0])
def test_expm_gradcheck_on_device(device, norm, max_squarings) -> None:
    a = rand_matrix((5, 5), norm, skew=False, seed=11).to(device).requires_grad_()
    tight = {"atol": 1e-8, "rtol": 1e-6}  # (gradcheck's defaults would pass a 1e-4 error)
    assert gradcheck(lambda t: expm(t, max_squarings=max_squarings), (a,), **tight)
    batch = rand_matrix((2, 4, 4), norm, skew=False, seed=12).to(device).requires_grad_()
    assert gradcheck(lambda t: expm(t, max_squarings=max_squarings), (batch,), **tight)
    low = torch.tril(rand_matrix((5, 5), norm, skew=False, seed=13), -1).to(device)
    low.requires_grad_()
    assert gradcheck(lambda t: expm_skew(t, max_squarings=max_squarings), (low,), **tight)


# ============================================================================ 4. caching

T = 10  # time steps: the recurrent kernel is read T times per forward


def make_rnn(device: torch.device) -> RNN:
    torch.manual_seed(0)
    model = RNN().to(F64)
    with torch.no_grad():  # a kernel away from the identity: Padé with squarings on the CPU
        original(model.rec).copy_(2.0 * randn(param(model.rec).dim, seed=30))
    return model.to(device)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.5),
    # fused: no version counter is bumped, the cache must see the step anyway
    "adam-fused": lambda ps: torch.optim.Adam(ps, lr=0.05, fused=True),
}


@pytest.mark.parametrize("opt_name", OPTIMIZERS)
@pytest.mark.parametrize("mode", ["cached", "auto"])
def test_cached_rnn_equals_uncached_and_is_fresh_after_a_step(device, mode, opt_name) -> None:
    xs = randn(T, 5, 3, seed=31).to(device)
    y = randn(5, 2, seed=32).to(device)
    ref, model = make_rnn(device), make_rnn(device)
    opt_ref = OPTIMIZERS[opt_name](ref.parameters())
    opt = OPTIMIZERS[opt_name](model.parameters())
    if mode == "auto":
        mp.auto_cache(model)
    ctx = mp.cached() if mode == "cached" else contextlib.nullcontext()

    with counting() as uncached_calls:
        loss_ref = loss_of(ref, xs, y)
        loss_ref.backward()
    assert uncached_calls[0] == T

    with ctx:
        for step in range(3):
            with counting() as calls:
                loss = loss_of(model, xs, y)
                loss.backward()
            assert calls[0] == 1, step  # the kernel computed once for T reads
            assert on_device(loss, device)
            torch.testing.assert_close(loss, loss_ref, atol=1e-12, rtol=0)
            got, want = grads(model), grads(ref)
            assert all(v is not None for v in got.values())
            assert_same(got, want)

            with torch.no_grad():  # (no-grad reads are stored apart from the graph's value)
                before = model.rec.weight.clone()
            opt.step()
            opt.zero_grad()
            opt_ref.step()
            opt_ref.zero_grad()
            # The next read is the new weight, not the stored one: compare with the map itself.
            with torch.no_grad():
                after = model.rec.weight.clone()
                fresh = param(model.rec).map(original(model.rec))
            assert not torch.allclose(after, before)
            torch.testing.assert_close(after, fresh, atol=1e-12, rtol=0)
            torch.testing.assert_close(after, ref.rec.weight.detach(), atol=1e-12, rtol=0)
            loss_ref = loss_of(ref, xs, y)
            loss_ref.backward()


# ============================================================================ 5. SPD, box, orthant


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_spd_on_device(device, dtype) -> None:
    n, floor = 6, 0.1
    tol = 1e-12 if dtype == F64 else 2e-5
    layer = mp.spd(nn.Linear(n, n, bias=False, device=device, dtype=dtype), min_eigenvalue=floor)
    p = param(layer)
    ref = mp.spd(nn.Linear(n, n, bias=False, dtype=F64), min_eigenvalue=floor)
    for i, scale in enumerate([0.0, 1.0, 3.0]):
        x = scale * randn(p.dim, seed=40 + i)
        set_coords(layer, x)
        set_coords(ref, x)
        w = layer.weight
        assert on_device(w, device) and w.dtype == dtype
        assert torch.equal(w, w.mT)  # symmetric to the bit
        assert_spd(w.cpu(), floor=floor * 0.99)  # (the oracle works on the CPU)
        assert float(torch.linalg.eigvalsh(w.detach().double()).min()) > floor * 0.99
        assert p.check(w)
        assert rel_err(w, ref.weight) < tol

    # right_inverse: an SPD value assigned is the value read back.
    a = randn(n, n, seed=45)
    w0 = (a @ a.T / n + 0.5 * torch.eye(n, dtype=F64)).to(device=device, dtype=dtype)
    w0 = 0.5 * (w0 + w0.mT)
    layer.weight = w0
    assert rel_err(layer.weight, w0) < tol
    with pytest.raises(ValueError, match="not symmetric positive definite"):
        layer.weight = w0 - 2.0 * torch.eye(n, device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bounded_on_device(device, dtype) -> None:
    low = -0.5
    high = torch.linspace(0.1, 2.0, 4, dtype=F64)[:, None]  # a tensor bound, broadcast, on the CPU
    layer = nn.Linear(3, 4, device=device, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(3.0 * randn(4, 3, seed=50))  # partly outside the box
    before = layer.weight.detach().clone()
    mp.bounded(layer, "weight", low=low, high=high)
    p = param(layer)
    lo, hi = p.low, p.high
    assert on_device(lo, device) and on_device(hi, device) and hi.dtype == dtype
    tol = 1e-12 if dtype == F64 else 1e-6
    torch.testing.assert_close(layer.weight, torch.clamp(before, lo, hi), atol=tol, rtol=0)

    for i, scale in enumerate([0.0, 1.0, 50.0]):  # 50: tanh saturates onto the bounds
        set_coords(layer, scale * randn(4, 3, seed=51 + i))
        w = layer.weight
        assert on_device(w, device) and w.dtype == dtype
        assert bool(((w >= lo) & (w <= hi)).all())
        assert p.check(w)

    u = 0.05 + 0.9 * torch.rand(4, 3, generator=gen(55), dtype=F64)
    w0 = (low + (high - low) * u).to(device=device, dtype=dtype)
    layer.weight = w0
    torch.testing.assert_close(layer.weight, w0, atol=tol, rtol=0)
    with pytest.raises(ValueError, match="inside its bounds"):
        layer.weight = w0 + 3.0


@pytest.mark.parametrize("map", ["softplus", "exp", "square"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonnegative_on_device(device, dtype, map) -> None:
    layer = nn.Linear(5, 4, device=device, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(randn(4, 5, seed=60))
    before = layer.weight.detach().clone()
    mp.nonnegative(layer, map=map)
    tol = 1e-12 if dtype == F64 else 1e-6
    torch.testing.assert_close(layer.weight, before.clamp_min(0), atol=tol, rtol=0)

    p = param(layer)
    for i, scale in enumerate([0.0, 1.0, 50.0]):  # 50: softplus/exp underflow to 0 somewhere
        set_coords(layer, scale * randn(4, 5, seed=61 + i))
        w = layer.weight
        assert on_device(w, device) and w.dtype == dtype
        assert bool((w >= 0).all())
        assert p.check(w)

    w0 = (0.01 + torch.rand(4, 5, generator=gen(65), dtype=F64)).to(device=device, dtype=dtype)
    layer.weight = w0
    torch.testing.assert_close(layer.weight, w0, atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="nonnegative"):
        layer.weight = w0 - 1.0


# ============================================================================ 6. checkpoints


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 5)
        self.drop = nn.Dropout(0.2)  # draws from the device's generator
        self.fc2 = nn.Linear(5, 5, bias=False)
        self.fc3 = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(torch.tanh(self.fc2(self.drop(torch.tanh(self.fc1(x))))))


def make_net(device: torch.device, seed: int) -> tuple[Net, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    net = Net().to(device)
    mp.orthogonal(net.fc1)
    mp.bounded(net.fc1, "bias", low=-0.5, high=0.5)
    mp.spd(net.fc2, min_eigenvalue=0.01)
    mp.nonnegative(net.fc3)
    return net, torch.optim.Adam(net.parameters(), lr=0.05)


def train_net(net: Net, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    device = next(net.parameters()).device
    x = randn(32, 5, seed=70).float().to(device)
    y = randn(32, 2, seed=71).float().to(device)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((net(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_training_state_resumes_bit_for_bit_on_device(device) -> None:
    net, opt = make_net(device, seed=0)
    train_net(net, opt, 4)
    mp.rebase(net, opt)  # a base point that moved during training must be saved too
    train_net(net, opt, 2)  # and Adam state rebuilt for the rebased coordinates
    # map_location=device: the usual way to load on a GPU (the RNG states land there too)
    state = via_bytes(mp.interop.training_state(net, opt, step=6), map_location=device)
    if device.type == "cuda":
        assert "cuda" in state["rng"]  # dropout's generator
    assert all(on_device(t, device) for t in state["model"].values())
    reference = train_net(net, opt, 5)

    net2, opt2 = make_net(device, seed=1)  # a different start: everything comes from the state
    assert mp.interop.load_training_state(state, net2, opt2) == {"step": 6}
    resumed = train_net(net2, opt2, 5)
    assert resumed == reference
    for (k, a), b in zip(net.state_dict().items(), net2.state_dict().values(), strict=True):
        assert on_device(b, device), k
        assert torch.equal(a, b), k
    assert_on_stiefel(net2.fc1.weight)
    assert_spd(net2.fc2.weight.cpu(), floor=0.0)

    # Control: the same weights with a fresh optimizer do not resume (the state matters).
    net3, _ = make_net(device, seed=1)
    mp.interop.load_training_state(state, net3)
    opt3 = torch.optim.Adam(net3.parameters(), lr=0.05)
    assert train_net(net3, opt3, 5) != reference


# ============================================================================ 7. soft constraints


def test_soft_constraint_multipliers_live_beside_the_attribute(device) -> None:
    """``constrain`` puts a constraint's multipliers and bounds on the attribute's device (a
    vector of multipliers on another device than fn's value fails in the Lagrangian), and the
    method of multipliers reaches the known solution there: min ‖W - T‖² with every row of T
    of norm 2, s.t. ‖w_i‖ <= 1: W = T/2, λ_i = -2 (mdmm's sign: ∇f + λ∇c = 0, c = 1 - ‖w_i‖).
    A constraint left on another device is named, with the fix, in the error."""
    from manifoldparam.soft import MDMM, constrain, row_norms, soft_constraints

    layer = nn.Linear(4, 3, bias=False).to(device=device, dtype=F64)
    target = randn(3, 4, seed=100)
    target = (2.0 * target / target.norm(dim=1, keepdim=True)).to(device)
    constrain(layer, "weight", row_norms, max=1.0, damping=5.0)
    mdmm = MDMM(soft_constraints(layer))
    c = mdmm[0]
    assert on_device(c.lmbda, device) and on_device(c.max, device) and c.lmbda.shape == (3,)
    solve_lbfgs(mdmm, [layer.weight], lambda: ((layer.weight - target) ** 2).sum())
    assert on_device(c.lmbda, device)
    assert rel_err(layer.weight, target / 2) < 1e-6
    assert rel_err(c.lmbda, torch.full((3,), -2.0, dtype=F64)) < 1e-5
    mdmm.to("meta")  # a constraint left behind (the model moved, the constraints did not)
    with pytest.raises(ValueError, match=r"mdmm\.to\("):
        mdmm(layer.weight.sum())


# ============================================================================ 8. devices mixed


def test_assignment_from_the_cpu_keeps_the_module_on_its_device(device) -> None:
    """``layer.weight = Q`` with ``Q`` on the CPU for a model on the device: the value moves to
    the device before any state is set (Orthogonal's base was set on the CPU, then torch's
    ``original.set_`` raised, leaving the module broken). A failing assignment from another
    device (a CPU value into a ``meta`` model: no numbers to check) leaves the module as it
    was."""
    q = orthonormal(6, 6, seed=110).float()
    layer = orth_linear(6, 6, device, torch.float32, "expm")
    layer.weight = q
    assert on_device(param(layer).base, device) and on_device(original(layer), device)
    assert rel_err(layer.weight, q) < 1e-6
    box = mp.bounded(nn.Linear(3, 2).to(device), "bias", low=-1.0, high=1.0)
    box.bias = torch.tensor([0.5, -0.25])
    assert on_device(box.bias, device) and rel_err(box.bias, torch.tensor([0.5, -0.25])) < 1e-6
    meta = mp.orthogonal(nn.Linear(6, 6, bias=False)).to("meta")
    with pytest.raises(RuntimeError):
        meta.weight = q
    assert param(meta).base.is_meta and original(meta).is_meta


def test_bounds_given_as_a_number_and_a_device_tensor(device) -> None:
    """``low=0.0`` (a number) with ``high`` a tensor on the device: both bounds on the device
    (broadcasting a CPU 0-dim bound with a CUDA one made a CPU 1-dim view, which CUDA ops
    refuse)."""
    high = torch.full((4,), 2.0, device=device)
    layer = mp.bounded(nn.Linear(3, 4).to(device), "bias", low=0.0, high=high)
    p = layer.parametrizations.bias[0]
    assert on_device(p.low, device) and on_device(p.high, device)
    b = layer.bias
    assert bool(((b > 0) & (b < 2)).all())


def test_mdmm_with_a_cpu_loss_and_device_constraints(device) -> None:
    """A pure feasibility problem, ``mdmm(torch.tensor(0.0))``: a 0-dim CPU loss plus
    constraint terms on the device (an in-place add into the CPU loss's clone failed)."""
    from manifoldparam.soft import MDMM, constrain, rms, soft_constraints

    layer = nn.Linear(4, 3).to(device)
    constrain(layer, "weight", rms, max=0.1, damping=2.0)
    out = MDMM(soft_constraints(layer))(torch.tensor(0.0))
    out.value.backward()
    assert on_device(out.value, device) and float(out.value) > 0
    assert layer.weight.grad is not None and on_device(layer.weight.grad, device)


def test_a_cpu_scalar_multiplier_beside_another_device_warns_once_with_the_fix() -> None:
    """A scalar constraint whose multiplier stayed on the CPU while fn's value lives elsewhere
    (mdmm-style ``EqConstraint(lambda: ...)`` built before the model moved, no ``mdmm.to``)
    still computes (a CPU 0-dim tensor acts as a scalar) but copies across devices at every
    step and breaks NCCL broadcasts and graph capture: a warning names the constraint and the
    fix, once per constraint, and not inside a ``torch.compile(fullgraph=True)`` graph (dynamo
    cannot trace it). A 0-dim tensor on another accelerator is no scalar: that raises, as a
    vector does. On one device there is no warning. (``meta`` stands in for the accelerator.)"""
    import warnings

    from manifoldparam.soft import MDMM, EqConstraint

    w = torch.ones(3, device="meta", requires_grad=True)
    c = EqConstraint(lambda: w.sum(), 1.0)
    assert c.lmbda.device.type == "cpu" and c.lmbda.dim() == 0
    mdmm = MDMM([c])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(5):
            assert mdmm(w.sum()).value.is_meta
    assert len(seen) == 1, [str(x.message) for x in seen]
    assert seen[0].category is UserWarning
    assert str(seen[0].message).startswith("EqConstraint(") and "<lambda>" in str(seen[0].message)
    assert "mdmm.to('meta')" in str(seen[0].message)

    fresh = MDMM([EqConstraint(lambda: w.sum(), 1.0)])  # not warned yet
    compiled = torch.compile(lambda: fresh(w.sum()).value, backend="eager", fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compiled().is_meta

    v = torch.ones(3, requires_grad=True)
    elsewhere = EqConstraint(lambda: v.sum(), 1.0).to("meta")  # a 0-dim multiplier on "meta"
    with pytest.raises(ValueError, match=r"mdmm\.to\('cpu'\)"):
        MDMM([elsewhere])(v.sum())

    c.to("meta")  # the fix
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert MDMM([c])(w.sum()).value.is_meta
        MDMM([EqConstraint(lambda: v.sum(), 1.0)])(v.sum())


def test_check_finite_steps_aside_where_nothing_can_be_read() -> None:
    """MDMM's NaN check reads one value on the host. Where that is impossible (meta and fake
    tensors, CUDA graph capture) it is skipped instead of failing the step; on the CPU (and
    any device with data: CUDA outside capture, MPS, XLA, ...) a non-finite term still
    raises, naming the constraint."""
    from manifoldparam.soft import MDMM, constrain, rms, soft_constraints

    layer = nn.Linear(4, 3).to("meta")
    constrain(layer, "weight", rms, max=0.1, damping=2.0)
    out = MDMM(soft_constraints(layer))(layer.weight.sum())
    assert out.value.is_meta

    cpu = nn.Linear(4, 3)
    constrain(cpu, "weight", rms, max=0.1)
    with torch.no_grad():
        cpu.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"rms.*not finite|non-finite"):
        MDMM(soft_constraints(cpu))(cpu.weight.sum())


def test_cache_steps_aside_during_cuda_graph_capture(device) -> None:
    """A read captured in a CUDA graph records the map, not a value cached before the capture:
    after the coordinates change, the replay gives the new weight (a cached read would have
    baked the old tensor into the graph, stale for good)."""
    if device.type != "cuda":
        pytest.skip("CUDA graphs exist for CUDA only")
    # (max_squarings: the same kernels in the warm-up as in the capture)
    layer = mp.auto_cache(orth_linear(6, 6, device, torch.float32, "expm", max_squarings=10))
    set_coords(layer, 0.5 * randn(param(layer).dim, seed=120))
    with torch.no_grad():
        stored = layer.weight  # an entry, stored before the capture
        assert layer.weight is stored
        warm_up_off_stream(lambda: param(layer).map(original(layer)), 2)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = layer.weight
        before = captured.clone()
        original(layer).add_(0.1)
        graph.replay()
        fresh = layer.weight  # the version changed: recomputed eagerly
    assert float((fresh - before).abs().max()) > 1e-2  # the weight did change
    assert rel_err(captured, fresh) < 1e-5


# ------------------------------------------------------------ mixed precision on the device
# The CPU versions (and their reasons) are in tests/test_precision.py; these run the same
# checks on each device: autocast bf16/fp16 and weights stored in half precision.

HALF = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("cache", ["off", "cached"])
@pytest.mark.parametrize("amp", HALF, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_autocast_on_device(device, case, amp, cache) -> None:
    """Under autocast the weight is the float32 weight, on its set; the layer's output is in
    the autocast dtype; a backward (outside the block) gives finite coordinate gradients."""
    case.skip_if_complex("autocast covers real dtypes only")
    m = case.constrain(case.build()).to(device)
    plain = m.weight.detach().clone()
    x = torch.randn(case.inputs, device=device)
    block = mp.cached() if cache == "cached" else contextlib.nullcontext()
    with torch.autocast(device.type, dtype=amp), block:
        w, y = m.weight, m(x)
    assert w.dtype == torch.float32 and torch.equal(w.detach(), plain)
    case.oracle(w.detach().cpu(), torch.float32)
    assert y.dtype == amp
    (y.float() ** 2).mean().backward()
    g = original(m).grad
    assert g is not None and on_device(g, device) and bool(torch.isfinite(g).all())


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_half_precision_weights_on_device(device, case, dtype) -> None:
    """A module stored in bf16/fp16 on the device: registration, SGD steps and assignment keep
    the weight on its set in that dtype."""
    case.skip_if_complex("there is no complex half precision")
    m = case.constrain(case.build().to(device=device, dtype=dtype))
    case.oracle(m.weight.detach().cpu(), dtype)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(case.inputs, device=device, dtype=dtype)
    for _ in range(5):
        opt.zero_grad()
        (m(x).float() ** 2).mean().backward()
        opt.step()
        assert m.weight.dtype == dtype and on_device(m.weight, device)
        case.oracle(m.weight.detach().cpu(), dtype)
    m.weight = mp.project(m, "weight", torch.randn_like(m.weight))
    case.oracle(m.weight.detach().cpu(), dtype)


def test_orthogonal_named_for_huge_coordinates_on_device(device) -> None:
    """The orthogonal map's host-read path names an overflow on every device (not only where
    Parametrization.compute's CPU check runs), and re-projects a large drift."""
    m = orth_linear(16, 16, device, torch.float32, "expm")
    with torch.no_grad():
        original(m).copy_(randn(original(m).numel(), seed=5).to(device) * 1e6)
    with pytest.warns(RuntimeWarning, match="far from the base point"):
        assert_on_stiefel(m.weight.detach().cpu())
    with torch.no_grad():
        original(m).fill_(3e30)
    with pytest.raises(mp.NonFiniteError, match=r"Linear\.weight"):
        m.weight  # noqa: B018
