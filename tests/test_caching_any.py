"""The cache for every parametrization, ours or not: torch's own ``orthogonal``, a user's plain
``nn.Module``, a chain of two, registered through torch's API or ``mp.register``. Computed once
per step under ``mp.cached()`` / ``auto_cache`` / ``cached_closure``, with values and gradients
equal to the uncached code (float64, 1e-12), and fresh in torch's five stale situations."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal as torch_orthogonal

import manifoldparam as mp
from tests.conftest import TOL, assert_same, grads

DT = torch.float64
T = 12  # time steps: the kernel is read T times per forward


class Symmetric(nn.Module):
    """A user's parametrization in torch's sense: forward and right_inverse, nothing else."""

    def forward(self, x: Tensor) -> Tensor:
        return x.triu() + x.triu(1).mT

    def right_inverse(self, w: Tensor) -> Tensor:
        return w.triu()


class Scale(nn.Module):
    """A parametrization with a learnable parameter of its own (its gradient must flow)."""

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.tensor(0.9, dtype=DT))

    def forward(self, x: Tensor) -> Tensor:
        return self.s * x


def _torch_orthogonal(m: nn.Module) -> None:
    torch_orthogonal(m)


def _symmetric(m: nn.Module) -> None:
    parametrize.register_parametrization(m, "weight", Symmetric())


def _chain(m: nn.Module) -> None:  # ours, then a module of torch's kind, on one attribute
    mp.orthogonal(m)
    parametrize.register_parametrization(m, "weight", Scale())


def _registered(m: nn.Module) -> None:  # a plain module through mp.register
    mp.register(m, "weight", Symmetric())


KINDS: dict[str, Callable[[nn.Module], None]] = {
    "torch-orthogonal": _torch_orthogonal,
    "user-module": _symmetric,
    "chain": _chain,
    "mp.register(module)": _registered,
}
COUNTED = (Symmetric, type(torch_orthogonal(nn.Linear(2, 2)).parametrizations.weight[0]), Scale)


class Net(nn.Module):
    def __init__(self, kind: str, n: int = 5) -> None:
        super().__init__()
        self.inp = nn.Linear(3, n)
        self.rec = nn.Linear(n, n, bias=False)
        KINDS[kind](self.rec)
        self.head = nn.Linear(n, 2)

    def forward(self, xs: Tensor) -> Tensor:
        h = xs.new_zeros(xs.shape[1], self.rec.in_features)
        for x in xs:
            h = torch.tanh(self.inp(x) + self.rec(h))
        return self.head(h)


def make(kind: str) -> Net:
    torch.manual_seed(0)
    return Net(kind).to(DT)


def data(seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, 4, 3, generator=g, dtype=DT), torch.randn(4, 2, generator=g, dtype=DT)


def loss_of(model: nn.Module, xs: Tensor, y: Tensor) -> Tensor:
    return ((model(xs) - y) ** 2).mean()


@contextlib.contextmanager
def counting() -> Iterator[list[int]]:
    """Count the evaluations of the first module of the kernel's chain."""
    calls = [0]
    saved = {cls: cls.forward for cls in COUNTED}
    first = {Symmetric, COUNTED[1]}  # (the chain's first module is ours: count Scale there)

    def wrap(cls: type, forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def counted(self: nn.Module, *args: Tensor) -> Tensor:
            if cls in first or cls is Scale:
                calls[0] += 1
            return forward(self, *args)

        return counted

    for cls, forward in saved.items():
        cls.forward = wrap(cls, forward)  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        for cls, forward in saved.items():
            cls.forward = forward  # type: ignore[method-assign]


MODES = ["cached", "auto"]


def block(mode: str, model: nn.Module) -> contextlib.AbstractContextManager[object]:
    if mode == "auto":
        mp.auto_cache(model)
        return contextlib.nullcontext()
    return mp.cached()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_computed_once_per_step_with_the_uncached_values_and_gradients(kind, mode) -> None:
    """The issue's case: a parametrization that is not ours was recomputed at every read
    inside mp.cached() (T + 1 evaluations for a T-step RNN). Now once per forward, and the loss
    and every gradient (the parametrization's own parameter included) equal the uncached run."""
    xs, y = data()
    ref = make(kind)
    with counting() as calls:
        loss_ref = loss_of(ref, xs, y)
        loss_ref.backward()
    assert calls[0] == T
    model = make(kind)
    with counting() as calls, block(mode, model):
        loss = loss_of(model, xs, y)
        loss.backward()
    assert calls[0] == 1
    torch.testing.assert_close(loss, loss_ref, **TOL)
    assert_same(grads(model), grads(ref))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_fresh_after_an_optimizer_step_inside_the_block(kind, mode) -> None:
    """Failure 1 of torch's cache: after ``optimizer.step()`` a read returned the old weight."""
    xs, y = data()
    ref, model = make(kind), make(kind)
    for net, ctx in ((ref, contextlib.nullcontext()), (model, block(mode, model))):
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        with ctx:
            for _ in range(3):
                opt.zero_grad()
                loss_of(net, xs, y).backward()
                opt.step()
            final = net.rec.weight.detach().clone()
        if net is ref:
            expected = final
    torch.testing.assert_close(final, expected, **TOL)


@pytest.mark.parametrize("kind", list(KINDS))
def test_no_grad_read_then_training_forward(kind) -> None:
    """Failure 2: a ``no_grad`` read first left the training forward without gradients."""
    xs, y = data()
    ref, model = make(kind), make(kind)
    loss_of(ref, xs, y).backward()
    with mp.cached():
        with torch.no_grad():
            model.rec.weight  # noqa: B018
        loss_of(model, xs, y).backward()
    assert_same(grads(model), grads(ref))


@pytest.mark.parametrize("kind", list(KINDS))
def test_functional_call_inside_the_block_uses_the_passed_tensors(kind) -> None:
    """Failure 3: ``functional_call`` inside the block used the cached weight."""
    xs, _ = data()
    model = make(kind)
    key = "rec.parametrizations.weight.original"
    other = {key: 0.5 * model.state_dict()[key]}
    expected = functional_call(model, other, (xs,))
    with mp.cached():
        model(xs)  # fills the cache
        got = functional_call(model, other, (xs,))
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("kind", list(KINDS))
def test_two_backwards_in_one_block(kind) -> None:
    """Failure 4: two backward passes through one cached value ('backward through the graph a
    second time' with torch's cache): gradient accumulation over two batches."""
    xs, y = data()
    x2, y2 = data(seed=2)
    ref, model = make(kind), make(kind)
    loss_of(ref, xs, y).backward()
    loss_of(ref, x2, y2).backward()
    with mp.cached():
        loss_of(model, xs, y).backward()
        loss_of(model, x2, y2).backward()
    assert_same(grads(model), grads(ref))


@pytest.mark.parametrize("kind", list(KINDS))
def test_hessian_vector_products(kind) -> None:
    """Failure 5 (create_graph, as torchmin's Newton methods use): equal to uncached."""
    xs, y = data()

    def hvp(model: nn.Module) -> list[Tensor]:
        ps = list(model.parameters())
        gs = torch.autograd.grad(loss_of(model, xs, y), ps, create_graph=True)
        dot = sum((g * torch.ones_like(g)).sum() for g in gs)
        return [g.detach() for g in gs] + list(torch.autograd.grad(dot, ps))

    ref = hvp(make(kind))
    model = make(kind)
    with mp.cached():
        ours = hvp(model)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("kind", list(KINDS))
def test_lbfgs_with_cached_closure(kind) -> None:
    xs, y = data()

    def run(model: nn.Module, wrap: Callable[..., Callable[[], Tensor]]) -> list[float]:
        opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5, history_size=4)

        def closure() -> Tensor:
            opt.zero_grad()
            loss = loss_of(model, xs, y)
            loss.backward()
            return loss

        return [float(opt.step(wrap(closure)).detach()) for _ in range(2)]

    ref = run(make(kind), lambda c: c)
    model = make(kind)
    with counting() as calls:
        ours = run(model, mp.cached_closure)
    assert ours == pytest.approx(ref, abs=1e-12, rel=0)
    assert calls[0] <= 2 * 5 + 2  # once per evaluation, not T per evaluation


def test_a_setting_of_ours_inside_a_chain_is_seen() -> None:
    """A chain is cached as a whole; changing a setting of our parametrization in it (no tensor
    changes) makes the chain's entry stale too."""
    model = make("chain")
    mp.auto_cache(model)
    with torch.no_grad():
        model.rec.parametrizations.weight.original.add_(0.3)
    w_expm = model.rec.weight.detach().clone()
    model.rec.parametrizations.weight[0].method = "cayley"
    w_cayley = model.rec.weight.detach()
    assert not torch.allclose(w_cayley, w_expm)
    mp.auto_cache(model, enabled=False)
    torch.testing.assert_close(model.rec.weight.detach(), w_cayley, **TOL)


def test_hooks_on_a_foreign_parametrization_take_torchs_path() -> None:
    """A forward hook on the parametrization must run at every read: not cached."""
    model = make("user-module")
    seen = [0]
    model.rec.parametrizations.weight[0].register_forward_hook(
        lambda *_: seen.__setitem__(0, seen[0] + 1)
    )
    xs, _ = data()
    with mp.cached():
        model(xs)
    assert seen[0] == T
