r"""The read path of a constrained attribute: ``module.weight`` in a few microseconds.

:func:`torch.nn.utils.parametrize.register_parametrization` makes ``module.weight`` a property
of the class it creates for ``module`` (``ParametrizedLinear``, one per parametrized module
and shared only with its deep copies). Its getter calls the ``ParametrizationList`` module,
whose ``forward`` calls the parametrization module and then probes ``hasattr(self, "1")``
(an ``AttributeError`` raised and caught on every read) to look for a chain: about 15 µs of
Python per read before the cache is even consulted. An RNN reads its kernel at every time
step, so with ``T = 100`` that is most of what a cache costs.

:func:`install` replaces that property, on the same class and only for the attributes a
``manifoldparam`` constructor registered, with one whose getter goes straight to
:meth:`Parametrization.forward` (and so to the cache) when the read is the plain case, and
otherwise calls torch's own getter, so every behaviour of ``parametrize`` is kept:

* the plain case: one ``original`` tensor, no forward/backward hooks on the
  ``ParametrizationList`` or on the parametrizations (nor global module hooks but the
  adoption hook below), no compiled ``__call__`` or instance ``forward``, ``nn.Module.__call__``
  not replaced (``torch.fx.symbolic_trace`` does so while tracing), and
  ``torch.nn.utils.parametrize.cached()`` not active (inside it, torch's getter and its cache
  decide). One parametrization of ours goes straight to the cache; any other chain (torch's
  own ``orthogonal``, a user's module, several parametrizations) is cached as a whole while
  caching is on for it, and otherwise computed by torch;
* anything else (hooks added later, ...) takes torch's path, checked at every read.

:func:`adopt` installs the getter on every parametrized attribute below a module. Inside
:func:`~manifoldparam.cached` blocks a global forward pre-hook adopts each module the first time
it is called (then returns at once: one weak-set lookup per module call), so attributes
registered with torch's own ``register_parametrization`` are cached too.

The setter is torch's (``module.weight = W`` calls ``right_inverse``). The class object stays
the same (no class swap) and nothing global is patched; ``remove_parametrizations`` deletes
the property as before.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn

from manifoldparam._torch import fsdp_shard_versions, only_forward, torch_cache_enabled
from manifoldparam.caching.cache import _SCOPE, _SLOT_ATTR, cached_forward, value_of

__all__ = ["adopt", "adopting", "install"]


def _getter(name: str, torch_get: Callable[[nn.Module], Tensor]) -> Callable[[nn.Module], Tensor]:
    @torch.jit.unused
    def read(self: nn.Module) -> Tensor:
        # Read at every time step of an RNN: one expression, cheapest tests first. Under
        # torch.compile or jit tracing the fast path is also taken (value_of steps aside there).
        try:
            plist = self._modules["parametrizations"]._modules[name]  # type: ignore[union-attr]
            chain = plist._modules  # type: ignore[union-attr]
            x = plist._parameters["original"]  # type: ignore[union-attr]
            if x is None or torch_cache_enabled():
                return torch_get(self)
            if len(chain) == 1:
                p = chain["0"]
                if type(p).forward is cached_forward and only_forward(plist, p, _ADOPTION.hooks):  # type: ignore[arg-type]
                    return value_of(p, x)  # p.forward(x)
            # Not a single one of ours: cached as a whole while caching is on for it.
            slot = plist.__dict__.get(_SLOT_ATTR)
            if (_SCOPE.get() is None and not (slot is not None and slot.auto)) or not all(
                only_forward(plist, m, _ADOPTION.hooks)  # type: ignore[arg-type]
                for m in chain.values()
            ):
                return torch_get(self)
        except KeyError:  # a tensor list (several originals), or not set up as torch expects
            return torch_get(self)
        return value_of(plist, x)  # type: ignore[arg-type]

    def get(self: nn.Module) -> Tensor:
        # TorchScript compiles module properties: it gets this line and a stub for ``read``, so
        # scripting succeeds and running says why it cannot work (as torch's own getter does).
        if torch.jit.is_scripting():
            raise RuntimeError(
                "manifoldparam constraints do not work under torch.jit.script (nor do torch's "
                "own parametrizations); use torch.compile, torch.export or torch.jit.trace."
            )
        return read(self)

    get.__name__ = get.__qualname__ = name
    get.__doc__ = f"``{name}``, read through its parametrization (and manifoldparam's cache)."
    return get


def install(module: nn.Module, name: str) -> None:
    """Give the parametrized attribute ``module.<name>`` the cache's getter.

    Does nothing if the attribute is not a parametrize property (or already has it).
    """
    cls = type(module)
    prop = cls.__dict__.get(name)
    if not isinstance(prop, property) or prop.fget is None:
        return
    if getattr(prop.fget, "_manifoldparam", False):
        return
    fast = property(_getter(name, prop.fget), prop.fset, prop.fdel, prop.__doc__)
    setattr(cls, name, fast)
    # A marker on the getter: a property object takes no attributes.
    fast.fget._manifoldparam = True  # type: ignore[union-attr]


class _Adoption:
    """The modules whose parametrized attributes have the getter (with the class they had
    then: ``fully_shard`` swaps it, and is adopted anew), and the global forward pre-hook that
    adopts modules called inside :func:`~manifoldparam.cached` blocks (installed while at least
    one block is open, in any thread)."""

    def __init__(self) -> None:
        # module -> a weak reference to its class (a strong one would keep the class alive)
        self.done: weakref.WeakKeyDictionary[nn.Module, weakref.ref[type]] = (
            weakref.WeakKeyDictionary()
        )
        self.blocks = 0
        self.hooks = 0  # global forward pre-hooks of ours (0 or 1): _plain allows them
        self.handle: torch.utils.hooks.RemovableHandle | None = None
        self.lock = threading.Lock()


_ADOPTION = _Adoption()


def adopt(root: nn.Module) -> None:
    """Give every parametrized attribute of ``root`` and its submodules the cache's getter,
    and every ``fully_shard`` module among them the watch of its shards (:func:`_watch_shards`)."""
    done = _ADOPTION.done
    for m in root.modules():
        if _adopted(m):
            continue
        plists = m.__dict__["_modules"].get("parametrizations")
        if isinstance(plists, nn.ModuleDict):
            for name in plists:
                install(m, name)
        if _SHARDS not in m.__dict__ and fsdp_shard_versions(m) is not None:
            m.__dict__[_SHARDS] = None
            m.register_forward_pre_hook(_watch_shards)
        done[m] = weakref.ref(type(m))


def _adopted(m: nn.Module) -> bool:
    cls = _ADOPTION.done.get(m)
    return cls is not None and cls() is type(m)


#: Attribute of a ``fully_shard`` module: its shards' versions at its last forward.
_SHARDS = "_manifoldparam_shards"


def _watch_shards(module: nn.Module, args: object) -> None:
    """Forward pre-hook of a ``fully_shard`` module: FSDP2 gathers the shards into the same
    unsharded parameter objects at every forward and keeps their version counters, so a write
    to the shards outside an optimizer step (an EMA update, a load into the shards) would leave
    a cached value that looks current. When the shards' versions moved, the entries of every
    parametrization below ``module`` (where its shards live) are dropped; otherwise the cache
    keeps its hits (gradient accumulation: one map per step)."""
    versions = fsdp_shard_versions(module)
    if versions != module.__dict__.get(_SHARDS):
        module.__dict__[_SHARDS] = versions
        for m in module.modules():
            slot = m.__dict__.get(_SLOT_ATTR)
            if slot is not None:
                slot.clear()


def _adopt_on_call(module: nn.Module, args: object) -> None:
    if _adopted(module) or torch.compiler.is_compiling():
        return
    adopt(module)


def adopting(on: bool) -> None:
    """Open (``True``) or close a block: the adoption hook lives while a block is open."""
    a = _ADOPTION
    with a.lock:
        a.blocks += 1 if on else -1
        if a.blocks > 0 and a.handle is None:
            a.handle = nn.modules.module.register_module_forward_pre_hook(_adopt_on_call)
            a.hooks = 1
        elif a.blocks == 0 and a.handle is not None:
            a.handle.remove()
            a.handle, a.hooks = None, 0
