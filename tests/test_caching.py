"""Caching that is never stale: ``manifoldparam.cached()``, automatic mode, the closure helper.

Every test compares values and gradients against the same code run with no cache, in float64,
to 1e-12. Each of the five failure modes of ``torch.nn.utils.parametrize.cached()`` (ANCHORS)
is reproduced against torch's cache first -- the test documents torch's failure -- and then
shown to be absent from ours.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import weakref
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils import parametrize

import manifoldparam as mp
from manifoldparam.caching import (
    auto_cache,
    cached,
    cached_closure,
    invalidate,
    is_auto,
    set_auto,
)
from manifoldparam.hard.base import Parametrization
from manifoldparam.hard.registration import register
from tests.conftest import RNN, TOL, assert_same, counting, grads, loss_of

DT = torch.float64
T = 12  # time steps


def make(seed: int = 0, **kw: object) -> RNN:
    torch.manual_seed(seed)
    return RNN(**kw).to(DT)  # type: ignore[arg-type]


def data(seed: int = 1, batch: int = 5) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, batch, 3, generator=g, dtype=DT), torch.randn(
        batch, 2, generator=g, dtype=DT
    )


def params(model: nn.Module) -> dict[str, Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def original_of(model: RNN) -> Tensor:
    return model.rec.parametrizations.weight.original


# ============================================================================ evaluates once


@pytest.mark.parametrize("mode", ["cached", "auto"])
def test_t_step_forward_evaluates_the_map_once(mode: str) -> None:
    xs, y = data()
    ref = make()
    with counting() as calls:
        loss_ref = loss_of(ref, xs, y)
        loss_ref.backward()
    assert calls[0] == T  # uncached: once per time step

    model = make()
    ctx = cached() if mode == "cached" else contextlib.nullcontext()
    if mode == "auto":
        auto_cache(model)
    with counting() as calls, ctx:
        loss = loss_of(model, xs, y)
        loss.backward()
    assert calls[0] == 1  # forward once, and the backward recomputes nothing
    torch.testing.assert_close(loss, loss_ref, **TOL)
    assert_same(grads(model), grads(ref))


def test_cayley_map_and_bounded_weight_also_cached() -> None:
    xs, y = data()
    ref, model = make(map="cayley"), make(map="cayley")
    loss_of(ref, xs, y).backward()
    with counting(mp.Bounded) as calls, cached():
        loss_of(model, xs, y).backward()
        loss_of(model, xs, y).backward()
    assert calls[0] == 1
    loss_of(ref, xs, y).backward()
    assert_same(grads(model), grads(ref))


# ============================================================================ torch's failures


def train(
    model: nn.Module,
    ctx: contextlib.AbstractContextManager[object],
    opt_factory: Callable[..., torch.optim.Optimizer],
    steps: int = 4,
) -> list[Tensor]:
    xs, y = data()
    opt = opt_factory(model.parameters())
    losses = []
    with ctx:
        for _ in range(steps):
            opt.zero_grad()
            loss = loss_of(model, xs, y)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
    return losses


def test_failure_1_torch_stale_after_optimizer_step() -> None:
    xs, y = data()
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with parametrize.cached():
        before = model.rec.weight.detach().clone()
        loss_of(model, xs, y).backward()
        opt.step()
        after = model.rec.weight.detach().clone()
    fresh = model.rec.weight.detach()
    assert torch.equal(after, before)  # torch: stale, silently
    assert not torch.allclose(fresh, before)

    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with cached():
        loss_of(model, xs, y).backward()
        opt.step()
        after = model.rec.weight.detach().clone()
    torch.testing.assert_close(after, model.rec.weight.detach(), **TOL)
    torch.testing.assert_close(after, fresh, **TOL)


@pytest.mark.parametrize(
    "opt_factory",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.9),
        lambda ps: torch.optim.Adam(ps, lr=0.05, foreach=True),
        lambda ps: torch.optim.Adam(ps, lr=0.05, foreach=False),
        lambda ps: torch.optim.AdamW(ps, lr=0.05, fused=True),
        lambda ps: torch.optim.RMSprop(ps, lr=0.01),
    ],
    ids=["sgd-momentum", "adam-foreach", "adam-forloop", "adamw-fused", "rmsprop"],
)
@pytest.mark.parametrize("mode", ["cached", "auto"])
def test_training_loop_equals_uncached(
    opt_factory: Callable[..., torch.optim.Optimizer], mode: str
) -> None:
    ref = make()
    losses_ref = train(ref, contextlib.nullcontext(), opt_factory)
    model = make()
    if mode == "auto":
        auto_cache(model)
    with counting() as calls:
        losses = train(
            model, cached() if mode == "cached" else contextlib.nullcontext(), opt_factory
        )
    assert calls[0] == len(losses)  # once per step, T reads each
    torch.testing.assert_close(torch.stack(losses), torch.stack(losses_ref), **TOL)
    assert_same(params(model), params(ref))
    assert_same(grads(model), grads(ref))


def test_failure_2_torch_loses_gradient_after_no_grad_read() -> None:
    xs, y = data()

    def run(model: nn.Module, ctx: contextlib.AbstractContextManager[object]) -> None:
        with ctx:
            with torch.no_grad():
                model(xs)  # e.g. a validation pass first
            loss_of(model, xs, y).backward()

    theirs = make()
    run(theirs, parametrize.cached())
    assert original_of(theirs).grad is None  # torch: silently no gradient

    ref, ours = make(), make()
    run(ref, contextlib.nullcontext())
    with counting() as calls:
        run(ours, cached())
    assert calls[0] == 2  # one no-grad value, one with graph
    assert original_of(ours).grad is not None
    assert_same(grads(ours), grads(ref))


def perturbed(
    model: nn.Module, scale: float = 0.3, only_originals: bool = False
) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        k: (p.detach() + scale * torch.randn(p.shape, generator=g, dtype=p.dtype)).requires_grad_()
        for k, p in model.named_parameters()
        if k.endswith(".original") or not only_originals
    }


def test_failure_3_torch_functional_call_ignores_passed_weights() -> None:
    xs, _ = data()
    model = make()
    new = perturbed(model, only_originals=True)  # new values for the constrained weights
    expected = functional_call(model, new, (xs,))
    with parametrize.cached():
        own = model(xs)
        theirs = functional_call(model, new, (xs,))
    assert torch.equal(theirs, own)  # torch: the cached weight, not the passed one
    assert not torch.allclose(theirs, expected)

    with cached():
        own2 = model(xs)
        ours = functional_call(model, new, (xs,))
        again = model(xs)
    torch.testing.assert_close(ours, expected, **TOL)
    torch.testing.assert_close(own2, own, **TOL)
    torch.testing.assert_close(again, own, **TOL)


@pytest.mark.parametrize("mode", ["cached", "auto"])
def test_functional_call_gradients_and_substituted_buffers(mode: str) -> None:
    xs, y = data()
    model = make()
    new = perturbed(model)
    base_key = "rec.parametrizations.weight.0.base"
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=DT))
    new_with_base = {**new, base_key: q}

    def run() -> tuple[list[Tensor], list[Tensor]]:
        outs, gs = [], []
        for sub in (new, new_with_base, new):
            out = functional_call(model, sub, (xs,))
            (g,) = torch.autograd.grad(
                ((out - y) ** 2).mean(), [sub["rec.parametrizations.weight.original"]]
            )
            outs.append(out.detach())
            gs.append(g)
        return outs, gs

    outs_ref, gs_ref = run()
    assert not torch.allclose(outs_ref[0], outs_ref[1])  # the base buffer matters
    if mode == "auto":
        auto_cache(model)
    with cached() if mode == "cached" else contextlib.nullcontext():
        outs, gs = run()
    for a, b in zip(outs + gs, outs_ref + gs_ref, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_failure_4_torch_second_backward_raises() -> None:
    xs, y = data()
    x2, y2 = data(seed=2)
    theirs = make()
    with parametrize.cached(), pytest.raises(RuntimeError, match="second time"):
        loss_of(theirs, xs, y).backward()
        loss_of(theirs, x2, y2).backward()

    ref, ours = make(), make()
    loss_of(ref, xs, y).backward()
    loss_of(ref, x2, y2).backward()
    with counting() as calls, cached():
        loss_of(ours, xs, y).backward()
        loss_of(ours, x2, y2).backward()
    assert calls[0] == 1  # gradient accumulation reuses the value
    assert_same(grads(ours), grads(ref))


@pytest.mark.parametrize("mode", ["cached", "auto"])
def test_two_losses_built_before_either_backward(mode: str) -> None:
    """Uncached code builds one graph per read; ours shares one graph and still allows this."""
    xs, y = data()
    x2, y2 = data(seed=2)
    theirs = make()
    with parametrize.cached():
        l1, l2 = loss_of(theirs, xs, y), loss_of(theirs, x2, y2)
    l1.backward()
    with pytest.raises(RuntimeError, match="second time"):
        l2.backward()

    ref, ours = make(), make()
    l1, l2 = loss_of(ref, xs, y), loss_of(ref, x2, y2)
    l1.backward()
    l2.backward()
    if mode == "auto":
        auto_cache(ours)
    with cached() if mode == "cached" else contextlib.nullcontext():
        l1, l2 = loss_of(ours, xs, y), loss_of(ours, x2, y2)
    l1.backward()
    l2.backward()
    assert_same(grads(ours), grads(ref))


def test_backward_with_retain_graph_twice() -> None:
    xs, y = data()
    ref, ours = make(), make()
    loss = loss_of(ref, xs, y)
    loss.backward(retain_graph=True)
    loss.backward()
    with cached():
        loss = loss_of(ours, xs, y)
        loss.backward(retain_graph=True)
        loss.backward()
    assert_same(grads(ours), grads(ref))


def lbfgs_run(
    model: nn.Module,
    wrap: Callable[[Callable[[], Tensor]], Callable[[], Tensor]],
    ctx: contextlib.AbstractContextManager[object],
    steps: int = 2,
) -> list[float]:
    xs, y = data()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=6, history_size=5)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = loss_of(model, xs, y)
        loss.backward()
        return loss

    out = []
    with ctx:
        for _ in range(steps):
            out.append(float(opt.step(wrap(closure)).detach()))
    return out


def test_failure_4_lbfgs_closure() -> None:
    theirs = make()
    with pytest.raises(RuntimeError, match="second time"):
        lbfgs_run(theirs, lambda c: c, parametrize.cached())

    ref = make()
    ref_losses = lbfgs_run(ref, lambda c: c, contextlib.nullcontext())
    for wrap, ctx in [
        (lambda c: c, cached()),  # the whole optimisation inside one block
        (cached_closure, contextlib.nullcontext()),  # a fresh cache per evaluation
    ]:
        ours = make()
        with counting() as calls:
            losses = lbfgs_run(ours, wrap, ctx)
        assert calls[0] < T * 8  # without a cache: T per evaluation
        assert losses == pytest.approx(ref_losses, abs=1e-12, rel=0)
        assert_same(params(ours), params(ref))


def bounded_regression(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return mp.bounded(nn.Linear(4, 1).to(DT), "weight", low=-0.3, high=0.3)


def test_failure_5_torchmin_trust_region_create_graph() -> None:
    """torchmin's Newton/trust-region methods differentiate with ``create_graph=True`` and write
    the parameters with ``copy_`` between evaluations."""
    torchmin = pytest.importorskip("torchmin")
    xs, y = data()
    g = torch.Generator().manual_seed(3)
    x4, y4 = torch.randn(20, 4, generator=g, dtype=DT), torch.randn(20, 1, generator=g, dtype=DT)

    def run(
        model: nn.Module,
        ctx: contextlib.AbstractContextManager[object],
        wrap: Callable[[Callable[[], Tensor]], Callable[[], Tensor]] = lambda c: c,
        method: str = "trust-ncg",
    ) -> float:
        inputs, target = (xs, y) if isinstance(model, RNN) else (x4, y4)
        opt = torchmin.Minimizer(model.parameters(), method=method, max_iter=3)

        def closure() -> Tensor:
            opt.zero_grad()
            return ((model(inputs) - target) ** 2).mean()

        with ctx:
            opt.step(wrap(closure))
        return float(((model(inputs) - target) ** 2).mean())

    final_ref = run(bounded_regression(), contextlib.nullcontext())
    final_theirs = run(bounded_regression(), parametrize.cached())
    assert abs(final_theirs - final_ref) > 1e-3  # torch: stale weight, silently a worse answer

    for make_model, method in [(bounded_regression, "trust-ncg"), (make, "trust-exact")]:
        ref = make_model()
        final_ref = run(ref, contextlib.nullcontext(), method=method)
        for ctx, wrap in [(cached(), lambda c: c), (contextlib.nullcontext(), cached_closure)]:
            ours = make_model()
            assert run(ours, ctx, wrap, method) == pytest.approx(final_ref, abs=1e-12, rel=0)
            assert_same(params(ours), params(ref))


@pytest.mark.parametrize("mode", ["cached", "auto"])
def test_create_graph_hessian_vector_products(mode: str) -> None:
    xs, y = data()

    def hvps(model: nn.Module) -> list[Tensor]:
        ps = list(model.parameters())
        vs = [torch.ones_like(p) for p in ps]
        out = []
        for _ in range(2):
            loss = loss_of(model, xs, y)
            gs = torch.autograd.grad(loss, ps, create_graph=True)
            dot = sum((g * v).sum() for g, v in zip(gs, vs, strict=True))
            hv = torch.autograd.grad(dot, ps)
            out += [g.detach() for g in gs] + list(hv)
            with torch.no_grad():  # move, then evaluate again
                for p, g in zip(ps, gs, strict=True):
                    p.sub_(0.1 * g)
        return out

    ref = hvps(make())
    model = make()
    if mode == "auto":
        auto_cache(model)
    with cached() if mode == "cached" else contextlib.nullcontext():
        ours = hvps(model)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_torchzero_closure_with_backward_argument() -> None:
    tz = pytest.importorskip("torchzero")
    xs, y = data()

    def run(model: nn.Module, wrap: Callable[..., Tensor]) -> dict[str, Tensor]:
        opt = tz.Optimizer(model.parameters(), tz.m.LBFGS(), tz.m.Backtracking())

        def closure(backward: bool = True) -> Tensor:
            loss = loss_of(model, xs, y)
            if backward:
                opt.zero_grad()
                loss.backward()
            return loss

        for _ in range(3):
            opt.step(wrap(closure))
        return params(model)

    ref = run(make(), lambda c: c)
    with counting() as calls:
        ours = run(make(), cached_closure)
    assert calls[0] > 0
    assert_same(ours, ref)


# ============================================================================ automatic mode


def test_auto_invalidation_by_step_backward_grad_mode_and_invalidate() -> None:
    xs, y = data()
    model = auto_cache(make())
    assert all(is_auto(p) for p in model.modules() if isinstance(p, Parametrization))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with counting() as calls:
        w1 = model.rec.weight
        assert model.rec.weight is w1 and calls[0] == 1  # reads reuse
        with torch.no_grad():
            w_ng = model.rec.weight  # grad-mode change: its own value, no graph
        assert calls[0] == 2 and w_ng.grad_fn is None and w1.grad_fn is not None
        loss_of(model, xs, y).backward()  # a backward retires the entry
        assert calls[0] == 2
        model.rec.weight  # noqa: B018
        assert calls[0] == 3
        opt.step()  # in-place change of the original
        w2 = model.rec.weight
        assert calls[0] == 4 and not torch.allclose(w2, w1)
        original_of(model).data.add_(0.01)  # invisible to version counters ...
        assert model.rec.weight is w2
        invalidate(model)  # ... hence the explicit call
        w3 = model.rec.weight
        assert calls[0] == 5 and w3 is not w2


def test_auto_off_and_set_auto_per_parametrization() -> None:
    model = make()
    auto_cache(model)
    auto_cache(model, enabled=False)
    with counting() as calls:
        model.rec.weight  # noqa: B018
        model.rec.weight  # noqa: B018
    assert calls[0] == 2
    p = model.rec.parametrizations.weight[0]
    set_auto(p)
    assert is_auto(p) and not is_auto(model.head.parametrizations.weight[0])
    with counting() as calls:
        model.rec.weight  # noqa: B018
        model.rec.weight  # noqa: B018
    assert calls[0] == 1


def test_assignment_rebase_and_dtype_change_invalidate() -> None:
    model = auto_cache(make())
    w = model.rec.weight.detach().clone()
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=DT))
    model.rec.weight = q  # new base buffer, original zeroed
    torch.testing.assert_close(model.rec.weight, q, atol=1e-10, rtol=0)
    with torch.no_grad():
        original_of(model).add_(0.1)
    moved = model.rec.weight.detach().clone()
    mp.rebase(model)
    torch.testing.assert_close(model.rec.weight, moved, atol=1e-10, rtol=0)
    assert not torch.allclose(moved, w)
    model.float()
    assert model.rec.weight.dtype == torch.float32


def test_changed_setting_and_in_place_buffer_edit_are_misses() -> None:
    """A setting (``p.map``) changes the map with no tensor changing: assigning it drops the
    entries. An in-place edit of a buffer bumps its version: the next read recomputes."""
    model = auto_cache(make())
    p = model.rec.parametrizations.weight[0]
    with torch.no_grad():
        original_of(model).add_(0.3)
    w_expm = model.rec.weight
    p.method = "cayley"
    w_cayley = model.rec.weight
    assert not torch.allclose(w_cayley, w_expm)
    torch.testing.assert_close(w_cayley, p.map(original_of(model)), **TOL)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=DT))
    with torch.no_grad():
        p.base.copy_(q)  # in place: a version bump of a buffer, not of the original
    torch.testing.assert_close(model.rec.weight, p.map(original_of(model)), **TOL)
    assert not torch.allclose(model.rec.weight, w_cayley)


def test_swapped_buffer_with_a_lower_version_and_an_edited_original_is_a_miss() -> None:
    """``torch.utils.swap_tensors`` gives a buffer the other tensor's version counter, which can
    be lower: with an in-place edit of the original at the same time, a *sum* of versions would
    be unchanged. Versions are compared one by one."""
    model = make()
    p = model.rec.parametrizations.weight[0]
    x = original_of(model)
    with torch.no_grad():
        p.base.mul_(1.0)  # base version 0 -> 1
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=DT))
    with cached(), torch.no_grad():
        model.rec.weight  # noqa: B018
        torch.utils.swap_tensors(p.base, q.clone())  # same object, version 1 -> 0
        x.add_(0.1)  # version + 1
        torch.testing.assert_close(model.rec.weight, p.map(x), **TOL)


class _Lazy(Parametrization):
    """Registers a buffer on its first map (a pattern torch's own parametrizations allow)."""

    def map(self, x: Tensor) -> Tensor:
        if "u" not in self._buffers:
            self.register_buffer("u", torch.ones_like(x))
        return x * self.u

    def inverse(self, w: Tensor) -> Tensor:
        return w

    def project(self, w: Tensor) -> Tensor:
        return w

    def distance(self, w: Tensor) -> Tensor:
        return w.new_zeros(())

    @property
    def dim(self) -> int:
        return self.shape.numel()


def test_buffer_registered_by_the_map_is_watched() -> None:
    m = register(nn.Linear(3, 3, bias=False).double(), "weight", _Lazy)
    p = m.parametrizations.weight[0]
    x = m.parametrizations.weight.original
    p._buffers.pop("u", None)
    with cached(), torch.no_grad():
        m.weight  # noqa: B018  (registers u, then stores the value)
        p.u.mul_(3.0)
        torch.testing.assert_close(m.weight, x * 3.0, **TOL)


def test_train_and_eval_keep_the_cache() -> None:
    model = make()
    with cached(), counting() as calls:
        w = model.rec.weight
        model.eval()
        assert model.rec.weight is w
        model.train()
        assert model.rec.weight is w and calls[0] == 1


def test_data_rebound_to_a_view_of_the_same_memory_is_a_miss() -> None:
    """``original.data = original.data.t()`` keeps the address and the version counter and
    changes the value: the entry also keys the view (shape, strides, offset)."""
    torch.manual_seed(0)
    layer = auto_cache(mp.bounded(nn.Linear(5, 5).to(DT), "weight", low=-0.5, high=0.5))
    x = layer.parametrizations.weight.original
    before = layer.weight.detach().clone()
    version, ptr = x._version, x.data_ptr()
    with torch.no_grad():
        x.data = x.data.t()
    assert (x._version, x.data_ptr()) == (version, ptr)  # what the older keys saw: no change
    torch.testing.assert_close(layer.weight, before.t(), **TOL)


@pytest.mark.parametrize("grad", [False, True])
def test_swapping_conversion_and_load_after_cached_reads(grad: bool) -> None:
    """With ``swap_module_params_on_conversion`` torch swaps ``original`` in place
    (``torch.utils.swap_tensors``), which refuses a tensor that is weakly referenced or held
    by a live graph. A cache entry must hold neither across ``.to()`` / ``load_state_dict``:
    both work after cached reads in either grad mode, as they do with no cache."""
    xs, _ = data()
    model = auto_cache(make())
    state = copy.deepcopy(model.state_dict())
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        with torch.set_grad_enabled(grad):
            model(xs)  # entries (holding graphs when grad is on), no backward
        model.float()
        assert original_of(model).dtype == torch.float32
        with torch.set_grad_enabled(grad):
            model(xs.float())
        model.double()
        with torch.set_grad_enabled(grad):
            model(xs)
        model.load_state_dict(state)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    torch.testing.assert_close(model(xs), make()(xs), **TOL)


def test_in_place_edit_of_returned_value_is_not_served_again() -> None:
    model = make()
    with cached():
        with torch.no_grad():
            w = model.rec.weight
            w.mul_(2.0)
            w2 = model.rec.weight
    torch.testing.assert_close(w2, model.rec.weight, **TOL)


def test_inference_mode_then_training() -> None:
    xs, y = data()
    ref, ours = make(), make()
    loss_of(ref, xs, y).backward()
    with cached():
        with torch.inference_mode():
            ours(xs)
        loss_of(ours, xs, y).backward()
    assert_same(grads(ours), grads(ref))


def test_inference_mode_reads_hit_and_see_updates() -> None:
    """Values made in inference mode are inference tensors (no version counter): they are still
    reused, and an in-place update of the original is still seen."""
    model = make()
    with counting() as calls, cached(), torch.inference_mode():
        w1 = model.rec.weight
        model.rec.weight  # noqa: B018
        assert calls[0] == 1
        with torch.no_grad():
            model.rec.parametrizations.weight.original.add_(0.1)
        w2 = model.rec.weight
        assert calls[0] == 2
    assert not torch.equal(w1, w2)


# ============================================================================ scope and lifetime


def slot_entries(model: RNN) -> int:
    slot = model.rec.parametrizations.weight[0].__dict__.get("_manifoldparam_cache")
    return 0 if slot is None else len(slot.entries)


def test_block_exit_drops_entries_and_nesting() -> None:
    model = make()
    with counting() as calls:
        with cached():
            model.rec.weight  # noqa: B018
            with cached():
                model.rec.weight  # noqa: B018  (nested: shares the outer entries)
            assert calls[0] == 1
            with cached(fresh=True):
                model.rec.weight  # noqa: B018  (fresh: its own)
            assert calls[0] == 2
            assert slot_entries(model) == 1
            invalidate()
            assert slot_entries(model) == 0
        assert slot_entries(model) == 0
        model.rec.weight  # noqa: B018  outside: no caching
        model.rec.weight  # noqa: B018
        assert calls[0] == 4


def test_decorator_form() -> None:
    model = make()

    @cached()
    def reads() -> bool:
        return model.rec.weight is model.rec.weight

    assert reads() and reads()
    assert model.rec.weight is not model.rec.weight


def test_deepcopy_and_no_leak() -> None:
    xs, y = data()
    model = auto_cache(make())
    loss_of(model, xs, y)  # leaves entries holding graphs
    twin = copy.deepcopy(model)
    assert slot_entries(twin) == 0
    assert is_auto(twin.rec.parametrizations.weight[0])
    torch.testing.assert_close(twin(xs), model(xs), **TOL)

    ref = weakref.ref(model)
    p_ref = weakref.ref(model.rec.parametrizations.weight[0])
    del model, twin
    gc.collect()
    assert ref() is None and p_ref() is None


# ============================================================================ torch.func


def test_torch_func_transforms_bypass_the_cache() -> None:
    xs, y = data()
    model = make()
    ps = {k: p.detach() for k, p in model.named_parameters()}

    def f(ps: dict[str, Tensor]) -> Tensor:
        return loss_of_fc(model, ps, xs, y)

    g_ref = torch.func.grad(f)(ps)
    auto_cache(model)
    with cached():
        g = torch.func.grad(f)(ps)
        per_sample = torch.func.vmap(
            lambda x: functional_call(model, ps, (x.unsqueeze(1),)), in_dims=1
        )(xs)
    for k in g_ref:
        torch.testing.assert_close(g[k], g_ref[k], **TOL)
    torch.testing.assert_close(per_sample.squeeze(1), model(xs), **TOL)


def loss_of_fc(model: nn.Module, ps: dict[str, Tensor], xs: Tensor, y: Tensor) -> Tensor:
    return ((functional_call(model, ps, (xs,)) - y) ** 2).mean()


def test_torch_compile_traces_the_map() -> None:
    model = auto_cache(make())
    with cached():
        compiled = torch.compile(lambda: model.rec.weight, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(), model.rec.weight, **TOL)


def test_autocast_value_is_kept_apart() -> None:
    model = make()
    with cached():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.rec.weight  # noqa: B018
        w = model.rec.weight
    assert w.dtype == DT
    torch.testing.assert_close(w, model.rec.weight, **TOL)


@pytest.mark.parametrize("mode", ["cached", "auto"])
def test_activation_checkpointing(mode: str) -> None:
    from torch.utils.checkpoint import checkpoint

    xs, y = data()

    def run(model: RNN) -> None:
        out = checkpoint(model, xs, use_reentrant=False)
        ((out - y) ** 2).mean().backward()

    ref, ours = make(), make()
    run(ref)
    if mode == "auto":
        auto_cache(ours)
    with counting() as calls, cached() if mode == "cached" else contextlib.nullcontext():
        run(ours)
    assert calls[0] == 2 * T  # inside a checkpointed region the cache steps aside
    assert_same(grads(ours), grads(ref))
