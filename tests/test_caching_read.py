"""The fast read path of a constrained attribute (``manifoldparam.caching.read``).

The getter the constructors install must be indistinguishable from torch's own -- same value,
same gradients, same hooks, chains and ``parametrize.cached()`` behaviour -- while skipping the
``ParametrizationList`` module on the plain read. Float64, seeded.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

import manifoldparam as mp
from manifoldparam.caching import cached
from manifoldparam.hard.registration import register

DT = torch.float64
TOL = {"atol": 1e-12, "rtol": 0.0}

CONSTRUCTORS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "orthogonal": lambda m: mp.orthogonal(m),
    "spd": lambda m: mp.spd(m),
    "bounded": lambda m: mp.bounded(m, "weight", low=-0.3, high=0.7),
    "nonnegative": lambda m: mp.nonnegative(m),
}


def layer(kind: str, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    m = nn.Linear(5, 5).to(DT)
    if kind == "spd":
        with torch.no_grad():
            m.weight.copy_(m.weight @ m.weight.T + torch.eye(5, dtype=DT))
    CONSTRUCTORS[kind](m)
    with torch.no_grad():  # move away from the initial point
        m.parametrizations.weight.original.add_(
            0.1 * torch.randn_like(m.parametrizations.weight.original)
        )
    return m


def torch_read(m: nn.Module, name: str = "weight") -> Tensor:
    """What torch's own property returns: the ParametrizationList called as a module."""
    return m.parametrizations[name]()


class Count(nn.Module):
    """A parametrization that counts its calls and doubles its input."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return 2 * x


@pytest.fixture
def list_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of ``ParametrizationList.forward`` (torch's read path)."""
    calls: list[int] = []
    orig = parametrize.ParametrizationList.forward

    def counting(self: parametrize.ParametrizationList) -> Tensor:
        calls.append(1)
        return orig(self)

    monkeypatch.setattr(parametrize.ParametrizationList, "forward", counting)
    return calls


@pytest.mark.parametrize("kind", list(CONSTRUCTORS))
def test_value_and_gradients_equal_torchs_read(kind: str, list_calls: list[int]) -> None:
    m = layer(kind)
    list_calls.clear()  # registration evaluates the parametrization once
    x = m.parametrizations.weight.original
    w = m.weight
    assert not list_calls  # the fast path: torch's ParametrizationList was not called
    ref = torch_read(m)
    assert list_calls
    torch.testing.assert_close(w, ref, **TOL)
    g = torch.randn_like(w)
    (gx,) = torch.autograd.grad(w, x, g)
    (gx_ref,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(gx, gx_ref, **TOL)
    with cached():
        first = m.weight
        assert m.weight is first  # the cache is reached through the fast path too


def test_setter_is_torchs_right_inverse() -> None:
    m = layer("orthogonal")
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=DT))
    m.weight = q
    torch.testing.assert_close(m.weight, q, atol=1e-10, rtol=0.0)
    with pytest.raises(ValueError, match=r"Linear\.weight = X"):
        m.weight = torch.randn(5, 5, dtype=DT)


def test_chain_added_later_takes_torchs_path() -> None:
    m = layer("bounded")
    base = m.weight.detach().clone()
    count = Count()
    parametrize.register_parametrization(m, "weight", count)
    before = count.calls
    torch.testing.assert_close(m.weight, 2 * base, **TOL)
    assert count.calls == before + 1


@pytest.mark.parametrize("where", ["list", "parametrization", "global"])
def test_hooks_are_called(where: str) -> None:
    m = layer("nonnegative")
    seen: list[str] = []

    def hook(module: nn.Module, args: object, out: Tensor) -> Tensor:
        seen.append(type(module).__name__)
        return out + 1

    if where == "list":
        handle = m.parametrizations.weight.register_forward_hook(hook)
    elif where == "parametrization":
        handle = m.parametrizations.weight[0].register_forward_hook(hook)
    else:
        handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        w = m.weight
    finally:
        handle.remove()
    assert seen
    torch.testing.assert_close(w, torch_read(m) + len(seen), **TOL)


def test_instance_forward_is_called() -> None:
    m = layer("orthogonal")
    plist = m.parametrizations.weight
    plist.forward = lambda: torch.zeros(5, 5, dtype=DT)  # type: ignore[method-assign]
    assert torch.equal(m.weight, torch.zeros(5, 5, dtype=DT))


def test_subclass_overriding_forward_is_called() -> None:
    """The fast getter calls the cache directly only for ``Parametrization.forward`` itself; a
    subclass that overrides ``forward`` is read through torch's path, so its forward runs."""

    class Shifted(mp.Orthogonal):
        def forward(self, x: Tensor) -> Tensor:
            return super().forward(x) + 1.0

    m = nn.Linear(5, 5, bias=False).double()
    register(m, "weight", Shifted)
    w = m.weight
    plain = m.parametrizations.weight[0].map(m.parametrizations.weight.original)
    torch.testing.assert_close(w, plain + 1.0, **TOL)


def test_torch_cached_keeps_torchs_behaviour(list_calls: list[int]) -> None:
    m = layer("orthogonal")
    list_calls.clear()
    with parametrize.cached():
        a = m.weight
        b = m.weight
    assert a is b and len(list_calls) == 1  # torch's cache, through torch's getter


def test_failure_6_torch_cached_serves_a_deep_copy_the_originals_value() -> None:
    """torch keys its cache by ``id`` of the module the property was made for; a deep copy
    shares that class, so inside ``parametrize.cached()`` the copy reads the original's value."""

    class Double(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return 2 * x

    def pair(register: Callable[[nn.Linear], object]) -> tuple[nn.Linear, nn.Linear]:
        torch.manual_seed(0)
        m = nn.Linear(4, 4).to(DT)
        register(m)
        twin = copy.deepcopy(m)
        with torch.no_grad():
            twin.parametrizations.weight.original.mul_(0.5)
        return m, twin

    m, twin = pair(lambda m: parametrize.register_parametrization(m, "weight", Double()))
    expected = twin.weight.detach().clone()
    with parametrize.cached():
        m.weight  # noqa: B018
        stale = twin.weight
    assert not torch.allclose(stale, expected)  # torch: the original's value
    torch.testing.assert_close(stale, m.weight, **TOL)

    m, twin = pair(mp.nonnegative)
    expected = twin.weight.detach().clone()
    with cached():
        m.weight  # noqa: B018
        got = twin.weight
    torch.testing.assert_close(got, expected, **TOL)


def test_remove_and_register_again() -> None:
    m = layer("orthogonal")
    w = m.weight.detach().clone()
    parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    assert type(m) is nn.Linear and isinstance(m.weight, nn.Parameter)
    torch.testing.assert_close(m.weight.detach(), w, **TOL)
    mp.orthogonal(m)
    torch.testing.assert_close(m.weight, w, atol=1e-12, rtol=0.0)
    torch.testing.assert_close(m.weight, torch_read(m), **TOL)


def test_two_attributes_and_a_deep_copy_read_their_own() -> None:
    torch.manual_seed(0)
    m = nn.Linear(4, 4).to(DT)
    mp.nonnegative(m, "weight")
    mp.bounded(m, "bias", low=-1.0, high=1.0)
    twin = copy.deepcopy(m)
    assert type(twin) is type(m)  # the shared class, and so the shared properties
    with torch.no_grad():
        twin.parametrizations.weight.original.add_(1.0)
        twin.parametrizations.bias.original.add_(1.0)
    for mod in (m, twin):
        torch.testing.assert_close(mod.weight, torch_read(mod, "weight"), **TOL)
        torch.testing.assert_close(mod.bias, torch_read(mod, "bias"), **TOL)
    assert not torch.allclose(m.weight, twin.weight)


def test_fx_symbolic_trace_records_the_parametrization() -> None:
    """torch.fx replaces ``nn.Module.__call__`` while tracing; the read then takes torch's path,
    so the graph calls the parametrization (it is not baked in as a constant) and follows later
    changes of the original."""
    m = layer("nonnegative")
    gm = torch.fx.symbolic_trace(m)
    nodes = [(n.op, n.target) for n in gm.graph.nodes]
    assert ("call_module", "parametrizations.weight") in nodes
    assert not any(op == "get_attr" and "constant" in str(t) for op, t in nodes)
    x = torch.randn(2, 5, dtype=DT)
    with torch.no_grad():
        m.parametrizations.weight.original.add_(1.0)
    torch.testing.assert_close(gm(x), m(x), **TOL)


class _Deep(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return False  # trace into the ParametrizationList and the parametrization


@pytest.mark.parametrize("mode", ["off", "auto", "cached"])
def test_fx_tracing_into_the_parametrization_with_caching_on(mode: str) -> None:
    """A tracer that enters the parametrization passes an fx Proxy as ``original``: the cache
    steps aside (no store, no bool() of a Proxy) and the traced map equals the module."""
    m = layer("nonnegative")
    if mode == "auto":
        mp.auto_cache(m)
    with cached() if mode == "cached" else contextlib.nullcontext():
        graph = _Deep().trace(m)
    gm = torch.fx.GraphModule(m, graph)
    assert not any(n.op == "call_module" for n in graph.nodes)
    x = torch.randn(2, 5, dtype=DT)
    torch.testing.assert_close(gm(x), m(x), **TOL)


@pytest.mark.parametrize("kind", list(CONSTRUCTORS))
def test_jit_script_says_why_it_cannot_run(kind: str) -> None:
    """torch.jit.script compiles module properties: like torch's own parametrizations, a
    constrained model scripts, and running it raises an error that names the alternatives."""
    scripted = torch.jit.script(layer(kind))
    with pytest.raises(Exception, match=r"torch\.jit\.script.*torch\.compile"):
        scripted(torch.randn(2, 5, dtype=DT))
