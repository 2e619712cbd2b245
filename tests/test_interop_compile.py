"""torch.compile (inductor): first-order training of a constrained model; second-order refused
with a message that says what to do."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import manifoldparam as mp
from manifoldparam.interop import check_second_order, scipy_minimize
from tests.conftest import assert_on_stiefel, assert_spd


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6, bias=False), nn.Linear(6, 2))
    mp.orthogonal(m[0])
    mp.bounded(m[0], "bias", low=-0.5, high=0.5)
    mp.spd(m[2])
    mp.nonnegative(m[3])
    return m


def test_compiled_training_and_second_order_message() -> None:
    pytest.importorskip("torch._inductor")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=g)
    with torch.no_grad():
        y = _model(seed=5)(x)  # a teacher of the same form: the fit can be good
    model = _model()
    compiled = torch.compile(model)  # inductor

    def loss() -> torch.Tensor:
        return ((compiled(x) - y) ** 2).mean()

    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    with torch.no_grad():
        start = float(((model(x) - y) ** 2).mean())
    for _ in range(20):
        value = loss()
        opt.zero_grad()
        value.backward()
        opt.step()
    with torch.no_grad():
        end = float(loss())
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    assert end < 0.8 * start
    assert_on_stiefel(model[0].weight)
    assert_spd(model[2].weight)
    assert bool(((model[0].bias >= -0.5) & (model[0].bias <= 0.5)).all())
    assert bool((model[3].weight >= 0).all())

    # second order: refused up front when the compiled module is passed ...
    with pytest.raises(TypeError, match=r"compiled\._orig_mod"):
        check_second_order(compiled, "newton-exact")
    # ... and torch's own error (a double backward through the compiled graph) is translated
    # when the objective calls a compiled module the bridge cannot see
    with pytest.raises(TypeError, match=r"torch\.compile.*uncompiled module"):
        scipy_minimize(loss, model, method="trust-ncg", options={"maxiter": 2})
    # the uncompiled module shares the parameters and works
    res = scipy_minimize(
        lambda: ((compiled._orig_mod(x) - y) ** 2).mean(),
        model,
        method="trust-ncg",
        options={"maxiter": 3},
    )
    assert res.fun <= end
    assert_on_stiefel(model[0].weight)


def _recording_backend(graphs: list[str]):  # type: ignore[no-untyped-def]
    """AOTAutograd with compilers that keep each graph's text (forward, then backward)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def keep(gm, inputs):  # type: ignore[no-untyped-def]
        # (with the branches of torch.cond, which are submodules)
        mods = [m for m in gm.modules() if isinstance(m, torch.fx.GraphModule)]
        graphs.append("\n".join(str(m.graph) for m in mods))
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=keep, bw_compiler=keep)


@pytest.mark.parametrize("which", ["orthogonal", "tall", "adapter"])
def test_compiled_graph_uses_our_exponential_and_its_backward(which: str) -> None:
    """Under torch.compile (fullgraph) the orthogonal maps call manifoldparam::expm_v2 (the
    adapter: expm_skew_blocks_v1, in the branch of a torch.cond beside the traced Taylor
    polynomial) in the forward graph and its backward op in the backward graph, never
    matrix_exp (whose backward costs about ten forwards); the gradient equals the eager one."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = nn.Linear(8, 8).double()
    if which == "orthogonal":
        mp.orthogonal(layer)
    elif which == "tall":  # the O(nk²) path: a 2k×2k exponential
        layer = nn.Linear(3, 8).double()
        mp.orthogonal(layer, tall=True)
    else:
        mp.orthogonal_adapter(layer, block_size=4)
    coords = layer.parametrizations.weight.original
    with torch.no_grad():
        coords.copy_(0.3 * torch.randn_like(coords))
    x = torch.randn(5, layer.in_features, dtype=torch.float64)
    layer(x).square().sum().backward()
    eager = coords.grad.clone()
    coords.grad = None
    graphs: list[str] = []
    compiled = torch.compile(layer, backend=_recording_backend(graphs), fullgraph=True)
    compiled(x).square().sum().backward()
    assert len(graphs) == 2
    forward, backward = graphs
    op = "expm_skew_blocks" if which == "adapter" else "expm"  # (OFT's batched blocks)
    assert f"manifoldparam.{op}_v" in forward and "matrix_exp" not in forward
    assert f"manifoldparam.{op}_backward_v" in backward and "matrix_exp" not in backward
    if which == "adapter":  # and the traced Taylor branches beside the ops
        assert "higher_order.cond" in forward and "higher_order.cond" in backward
    torch.testing.assert_close(coords.grad, eager, atol=1e-10, rtol=0)


def test_expm_op_matches_expm_and_gradchecks() -> None:
    """The custom op: torch.library's opcheck (schema, fake tensor, autograd registration), the
    value of expm, and gradcheck of its registered backward in float64 (general and skew)."""
    from manifoldparam.linalg import expm
    from manifoldparam.linalg.op import expm_op

    g = torch.Generator().manual_seed(3)
    a = torch.randn(3, 5, 5, generator=g, dtype=torch.float64)
    for scale in (0.1, 3.0):  # the Taylor path and Padé with squarings
        torch.testing.assert_close(expm_op(scale * a), expm(scale * a), atol=1e-12, rtol=0)
    for scale in (0.01, 1.0):  # the Taylor path (saved intermediates) and Padé (recomputed)
        torch.library.opcheck(torch.ops.manifoldparam.expm_v2, (scale * a, -1, False))
        x = (scale * a).requires_grad_()
        assert torch.autograd.gradcheck(lambda t: expm_op(t), (x,))
        low = scale * torch.randn(2, 4, 4, generator=g, dtype=torch.float64).tril(-1)
        assert torch.autograd.gradcheck(
            lambda t: expm_op(t - t.mT, projected=True), (low.requires_grad_(),)
        )


@pytest.mark.parametrize("scale", [0.01, 3.0])  # the Taylor path, and Padé with squarings
def test_compiled_orthogonal_weight_matches_eager_and_is_orthogonal(scale: float) -> None:
    """float32: compiled, the op adds the Newton--Schulz step where the path is off the Taylor
    floor (Padé, squarings), and the map skips its own step on the Taylor path with an exact
    base, as eager mode does: the same weight to round-off, orthogonal to float32 round-off;
    and the forward graph has no more products than the eager map dispatches."""
    torch._dynamo.reset()
    torch.manual_seed(1)
    layer = mp.orthogonal(nn.Linear(32, 32, bias=False))
    with torch.no_grad():
        coords = layer.parametrizations.weight.original
        coords.copy_(scale * torch.randn_like(coords))
    eye = torch.eye(32)
    x = torch.eye(32)
    eager = layer(x).detach()
    graphs: list[str] = []
    compiled = torch.compile(layer, backend=_recording_backend(graphs), fullgraph=True)
    out = compiled(x).detach()
    torch.testing.assert_close(out, eager, atol=2e-6, rtol=0)
    w = out.T.double()
    assert float((w.T @ w - eye.double()).abs().max()) < 2e-6
    if scale < 0.1:  # Taylor, exact base: B·exp(A) and the layer's x·Wᵀ, no Newton--Schulz
        assert graphs[0].count("aten.mm") + graphs[0].count("aten.addmm") == 2, graphs[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_orthogonal_chooses_its_squarings_in_the_graph(dtype: torch.dtype) -> None:
    """Compiled (inductor), the square orthogonal map's exponential is traced where the skew
    bound allows at most two squarings (the profiler sees no custom op), and the custom op
    beyond; in each case the weight and the coordinates' gradient are eager mode's to round-off
    (eagerly the scheme may take Padé where the trace takes T_8: the same function)."""
    from manifoldparam.linalg._scheme import _ELL8_F64, _THETA
    from manifoldparam.linalg.skew_blocks import rho_bound

    torch._dynamo.reset()
    torch.manual_seed(2)
    layer = mp.orthogonal(nn.Linear(16, 16, bias=False)).to(dtype)
    param = layer.parametrizations.weight
    x = torch.randn(4, 16, dtype=dtype)
    c = torch.randn(4, 16, dtype=dtype)
    compiled = torch.compile(layer, fullgraph=True)
    compiled(x).sum().backward()  # (compiles both graphs outside the profiler)
    # (float64: T_8's derivative within round-off of exp's, as eagerly; 16 ulps of max|g|)
    eps = 2e-6 if dtype == torch.float32 else 16 * torch.finfo(dtype).eps
    theta = _ELL8_F64 if dtype == torch.float64 else _THETA[dtype]
    direction = torch.randn_like(param.original)
    with torch.no_grad():  # (the bound is linear in the scale of the coordinates)
        a = param[0].skew(direction).double()
        a2 = a @ a
        unit = rho_bound(float(a2.square().sum()), float(-(a2 @ a2 @ a2).trace()))
    # the bound just below each branch's limit (and, in float64, where T_8 alone would be
    # accurate but its derivative 60 ulps off: one squaring)
    bounds = [0.99 * theta * 2**s for s in range(4)]
    if dtype == torch.float64:
        bounds.append(0.99 * _THETA[dtype])
    for bound in bounds:
        squarings = max(math.ceil(math.log2(bound / theta)), 0)
        with torch.no_grad():
            param.original.copy_(direction * (bound / unit))
        param.original.grad = None
        (layer(x) * c).sum().backward()
        w, g = layer.weight.detach(), param.original.grad.clone()
        param.original.grad = None
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = compiled(x)
            (out * c).sum().backward()
        ops = {e.name for e in prof.events() if e.name.startswith("manifoldparam::")}
        assert (not ops) == (squarings <= 2), (squarings, ops)
        torch.testing.assert_close(layer.weight.detach(), w, atol=eps, rtol=0)
        scale_g = float(g.abs().max())
        torch.testing.assert_close(param.original.grad, g, atol=eps * scale_g, rtol=0)


def test_compiled_orthogonal_gradient_is_exps_to_round_off_in_float64() -> None:
    """A 2×2 rotation by w, whose derivative is known in closed form: at w just below T_8's
    value threshold (where T_8's own derivative is ρ⁸/8! = 63 ulps off exp's), the compiled map
    takes a squaring, as eager expm does, and its gradient is exp's to a few ulps."""
    from manifoldparam.linalg._scheme import _THETA

    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = mp.orthogonal(nn.Linear(2, 2, bias=False)).double()
    param = layer.parametrizations.weight
    w = 0.999 * _THETA[torch.float64]
    with torch.no_grad():
        param.original.fill_(w)
        sign = float(param[0].skew(param.original)[1, 0]) / w  # A = sign·[[0, -w], [w, 0]]
        base = param[0].base.double()
    c = torch.tensor([[0.3, -1.1], [0.7, 0.5]], dtype=torch.float64)
    d_exp = sign * torch.tensor(
        [[-math.sin(w), -math.cos(w)], [math.cos(w), -math.sin(w)]], dtype=torch.float64
    )
    exact = float(((base @ d_exp).T * c).sum())  # d/dw of sum((x·Wᵀ) ∘ c) at x = I
    (torch.compile(layer, fullgraph=True)(torch.eye(2, dtype=torch.float64)) * c).sum().backward()
    error = abs(float(param.original.grad) - exact) / abs(exact)
    assert error < 8 * torch.finfo(torch.float64).eps, error


@pytest.mark.parametrize("strict", [False, True])
def test_torch_export_of_constrained_layers(strict: bool) -> None:
    """torch.export (strict: Dynamo; non-strict: Python tracing) of an OFT adapter and an
    orthogonal layer gives the eager output; strict export takes the custom ops (torch 2.13
    traces no cond inside a Function there)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(
        mp.orthogonal_adapter(nn.Linear(16, 16), block_size=4), nn.Tanh(),
        mp.orthogonal(nn.Linear(16, 8)),
    )  # fmt: skip
    with torch.no_grad():
        model[0].parametrizations.weight.original.normal_(0.0, 0.3)
    x = torch.randn(5, 16)
    program = torch.export.export(model, (x,), strict=strict)
    torch.testing.assert_close(program.module()(x), model(x), atol=1e-6, rtol=0)
