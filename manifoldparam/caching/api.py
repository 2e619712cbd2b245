"""The public face of the cache: blocks, automatic mode, invalidation, closures.

* :func:`cached` -- a block (or decorator) in which every parametrized weight is computed once;
* :func:`auto_cache` -- the same without a block, per model;
* :func:`invalidate` -- drop cached values after writes no version counter sees (``.data``);
* :func:`cached_closure` -- a fresh cache for each evaluation of an optimizer closure.

Every parametrized attribute is cached, ours or not: a manifoldparam parametrization by itself,
anything else (torch's own ``orthogonal``, a user's ``nn.Module``, a chain of several) as its
``ParametrizationList``. What a value depends on, and so when it is recomputed, is in
:mod:`.cache`. An attribute registered with torch's own ``register_parametrization`` gets the
cache's read path (:func:`~.read.adopt`) the first time a module above it is called inside a
:func:`cached` block, or from :func:`auto_cache`; those registered through
:func:`manifoldparam.register` have it from the start.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator
from contextvars import Token
from typing import Any, TypeVar

from torch import nn

from manifoldparam.caching import read
from manifoldparam.caching.cache import (
    _AUTO,
    _SCOPE,
    _SLOT_ATTR,
    _STEPS,
    _Scope,
    _Slot,
    cached_forward,
)

__all__ = ["auto_cache", "cached", "cached_closure", "invalidate", "is_auto", "set_auto"]

F = TypeVar("F", bound=Callable[..., Any])


class cached(contextlib.ContextDecorator):
    """Compute every constrained weight once inside the block, reuse it, never go stale.

    Inside the block, a parametrized attribute :math:`W = f(x)` read :math:`T` times costs one
    evaluation of :math:`f` (and one backward through it), not :math:`T`. An entry is reused
    only while what it was computed from is unchanged (the originals' and buffers' version
    counters, grad mode, autocast, the tensors substituted by ``functional_call``), so the
    results -- values and gradients -- equal those of the same code without the block,
    including after ``optimizer.step()`` inside it, after a ``torch.no_grad()`` read, with
    several ``backward()`` calls and with ``create_graph=True`` (the keys are listed in
    :mod:`manifoldparam.caching.cache`). Entries are dropped when the outermost block exits.
    Also usable as a decorator (each call opens a block).

    Args:
        fresh: open a new scope even inside another block (by default a nested block shares
            the outer block's entries).

    Example:
        >>> cell = mp.orthogonal(nn.Linear(8, 8, bias=False))
        >>> cell.weight is cell.weight          # outside a block: each read computes f(x)
        False
        >>> with mp.cached():
        ...     h = torch.zeros(1, 8)
        ...     for t in range(50):              # an RNN reads the kernel 50 times ...
        ...         h = torch.tanh(cell(h) + 1)
        ...     print(cell.weight is cell.weight)   # ... and it is computed once
        True
    """

    def __init__(self, *, fresh: bool = False) -> None:
        self.fresh = fresh
        self._tokens: list[tuple[Token[_Scope | None], _Scope | None]] = []

    def _recreate_cm(self) -> cached:
        return cached(fresh=self.fresh)

    def __enter__(self) -> cached:
        _STEPS.install()
        read.adopting(True)
        opened: _Scope | None = None
        if self.fresh or _SCOPE.get() is None:
            opened = _Scope()
            self._tokens.append((_SCOPE.set(opened), opened))
        else:
            self._tokens.append((_SCOPE.set(_SCOPE.get()), None))
        return self

    def __exit__(self, *exc: object) -> None:
        read.adopting(False)
        token, opened = self._tokens.pop()
        _SCOPE.reset(token)
        if opened is not None:
            opened.close()


def cached_closure(closure: F) -> F:
    """Wrap an optimizer closure so that each evaluation runs in a fresh :func:`cached` block.

    For optimizers that evaluate the objective several times per step: ``torch.optim.LBFGS``
    (``closure()`` with ``backward()`` inside), torchzero (``closure(backward=True)``), torchmin's
    ``Minimizer`` (``closure()`` without backward; it differentiates, with ``create_graph`` for
    the Newton and trust-region methods). Every parametrized weight is computed once per
    evaluation however often the model reads it, and each evaluation sees the parameters the
    optimizer just wrote (even through ``.data``, which version counters cannot see, since
    nothing is carried over between evaluations).

    Args:
        closure: the closure, with any signature; arguments pass through unchanged.

    Returns:
        The wrapped closure.

    Example:
        >>> model = mp.orthogonal(nn.Linear(4, 4))
        >>> x, y = torch.randn(16, 4), torch.randn(16, 4)
        >>> opt = torch.optim.LBFGS(model.parameters(), max_iter=5)
        >>> @mp.cached_closure
        ... def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)
        >>> W = model.weight.detach()
        >>> bool(torch.allclose(W.T @ W, torch.eye(4), atol=1e-5))
        True
    """

    @functools.wraps(closure)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with cached(fresh=True):
            return closure(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


def _units(obj: nn.Module | Iterable[nn.Module]) -> Iterator[nn.Module]:
    """What holds a cache slot in ``obj``: each parametrized attribute's single manifoldparam
    parametrization, or else its ``ParametrizationList``; and any of ours not registered on a
    module. Gives every attribute the read path on the way (:func:`~.read.adopt`)."""
    modules = [obj] if isinstance(obj, nn.Module) else list(obj)
    seen: set[int] = set()
    for root in modules:
        read.adopt(root)
        for m in root.modules():
            units: list[nn.Module] = []
            if type(m).forward is cached_forward:
                units.append(m)
            plists = m.__dict__["_modules"].get("parametrizations")
            if isinstance(plists, nn.ModuleDict):
                for plist in plists.values():
                    chain = list(plist._modules.values())
                    ours = len(chain) == 1 and type(chain[0]).forward is cached_forward
                    units.append(chain[0] if ours else plist)
            for u in units:
                if id(u) not in seen:
                    seen.add(id(u))
                    yield u


def set_auto(p: nn.Module, enabled: bool = True) -> None:
    """Put one parametrization in (or out of) automatic mode; leaving it drops its entries."""
    slot: _Slot | None = p.__dict__.get(_SLOT_ATTR)
    if slot is None:
        slot = _Slot()
        p.__dict__[_SLOT_ATTR] = slot
    slot.auto = bool(enabled)
    _STEPS.install()
    if not enabled:
        slot.drop_scope(_AUTO)


def is_auto(p: nn.Module) -> bool:
    """Whether ``p`` caches automatically (outside :func:`cached` blocks)."""
    slot: _Slot | None = p.__dict__.get(_SLOT_ATTR)
    return bool(slot is not None and slot.auto)


def auto_cache(model: nn.Module | Iterable[nn.Module], enabled: bool = True) -> Any:
    """Automatic caching, without a context, for every constrained weight in ``model``.

    A weight read many times between two optimizer steps is computed once. Any in-place change
    of an original or of a buffer (``optimizer.step()``, ``rebase``, assignment), a backward
    through the value, a grad-mode change, ``functional_call`` with other tensors: the next read
    recomputes. Writes through ``.data`` are invisible to version counters: call
    :func:`invalidate` after them. Under FSDP2, call it after ``fully_shard``: it then watches
    the shards, which FSDP gathers into the same tensors at every forward with their version
    counters kept.

    Args:
        model: a module (every parametrized attribute in it) or an iterable of modules.
        enabled: ``False`` turns automatic mode off again and drops the entries.

    Returns:
        ``model``, so that ``model = auto_cache(model)`` reads as a wrapper.

    Example:
        >>> model = mp.auto_cache(mp.orthogonal(nn.Linear(4, 4)))
        >>> w1 = model.weight
        >>> model.weight is w1                  # read again, no step between: the same tensor
        True
        >>> with torch.no_grad():
        ...     _ = model.parametrizations.weight.original.add_(0.1)   # what a step does
        >>> model.weight is w1                  # recomputed after the write
        False
    """
    for p in _units(model):
        set_auto(p, enabled)
    return model


def invalidate(model: nn.Module | Iterable[nn.Module] | None = None) -> None:
    """Drop cached values that a write no version counter sees would otherwise keep.

    Needed only after writes through ``.data`` (``original.data.copy_(...)``, an in-place write
    into the vector ``vector_to_parameters`` filled the originals from, also of a buffer such as
    ``Orthogonal.base``, whose orthogonality check it drops too). Assigning an attribute of a
    parametrization (``p.base = B``, ``p.method = "cayley"``) drops its cache by itself.

    Args:
        model: drop the entries of every constrained weight in this module (or iterable of
            modules); ``None`` drops every entry of the current :func:`cached` block.

    Example:
        >>> model = mp.auto_cache(mp.orthogonal(nn.Linear(4, 4)))
        >>> w1 = model.weight
        >>> _ = model.parametrizations.weight.original.data.add_(0.1)  # invisible to versions
        >>> mp.invalidate(model)
        >>> bool(torch.equal(model.weight, w1))                    # recomputed
        False
    """
    if model is None:
        scope = _SCOPE.get()
        if scope is not None:
            scope.close()
        return
    for p in _units(model):
        slot: _Slot | None = p.__dict__.get(_SLOT_ATTR)
        if slot is not None:
            slot.clear()
        for m in p.modules():
            if type(m).forward is cached_forward:
                m.forget()  # type: ignore[operator]
