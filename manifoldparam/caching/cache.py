r"""Caching of constrained weights that is never stale.

Every constrained value ``module.weight`` is made by :func:`value_of` (``Parametrization.forward``
calls it). With caching off it is just ``p.compute(x)``. With caching on -- inside a
:func:`cached` block, or for a parametrization put in automatic mode (:func:`auto_cache`) --
the value is computed once and reused for as long as nothing it depends on has changed.

What is keyed (the contract)
----------------------------
``f = p.compute`` is a pure function of ``x`` (the ``original`` tensor passed in; under
``torch.func.functional_call`` that is the substituted tensor) and of ``p``'s own tensors
(buffers such as ``Orthogonal.base``, and parameters if a subclass has any). A stored value
``y = f(x)`` is returned for a later read only if all of the following are unchanged:

* the *objects*: the read passes the same tensor ``x`` (checked by identity through a weak
  reference, so a tensor substituted by ``functional_call`` is a miss, a freed tensor whose
  ``id`` is recycled can never match, and a replaced original is not kept alive) and ``p``
  holds the same buffer objects (held by the entry, so a re-assigned buffer is a miss, also
  one written straight into ``p._buffers`` as ``functional_call`` does); assigning any
  attribute of a parametrization (``p.base = B``, also a setting such as ``p.method = "cayley"``)
  drops its entries (``Parametrization.__setattr__``).
  ``torch.utils.swap_tensors`` (``module.to()`` and ``load_state_dict`` with
  ``swap_module_params_on_conversion``) refuses a weakly referenced tensor or one a live
  graph holds, so ``module.to()`` and, for the constructors, ``load_state_dict`` drop the
  parametrization's cache before they touch ``x``;
* their *contents*: ``x._version`` and every buffer's ``_version`` (bumped by every in-place
  change made through autograd-visible ops: ``optimizer.step()``, ``copy_``/``add_`` under
  ``no_grad``, :func:`~manifoldparam.rebase`, assignment ``module.weight = Q``), plus
  ``x.data_ptr()``, the view (shape, strides, storage offset), ``dtype``, ``device``,
  ``requires_grad`` (which catch ``x.data = ...``, also ``x.data = x.data.t()`` with its
  unchanged address and version, and ``module.to(...)``; the entry holds an alias of the
  storage it was made from, so that storage's address cannot be recycled by a later
  ``x.data = ...`` while the entry lives);
* no ``torch.optim.Optimizer.step()`` has finished since (a process-wide step counter,
  advanced by a global optimizer step hook): fused optimizers (``Adam(fused=True)`` and
  friends) update parameters without bumping their version counters, and third-party
  optimizers may write through ``.data``;
* the returned tensor itself was not modified in place (``y._version``);
* the *mode* the value was made in: grad mode, inference mode and the autocast state of
  ``x``'s device. Values made under ``torch.no_grad()`` have no graph, so they are stored
  apart from values made with grad and never returned to a grad-mode read;
* the *scope*: each outermost :func:`cached` block has its own entries (dropped when it
  exits); automatic mode has its own.

The one change nothing sees is an in-place write outside an optimizer step through a tensor
that shares the original's storage but not its version counter: ``p.data.add_(...)``, a
``p.data.view(-1)`` kept and written to, or the flat vector of
``torch.nn.utils.vector_to_parameters`` (which sets ``p.data`` to slices of it) updated in
place. Call :func:`invalidate` after such writes. (FSDP2's ``fully_shard`` gathers its shards
into the same unsharded parameters at every forward with their versions kept: the cache
watches the shards' versions instead, see :func:`.read._watch_shards`.)

Gradients
---------
A value read ``T`` times builds one graph for ``f``, not ``T``. The stored value returned to a
grad-mode read is the output of a small autograd node, :class:`_Reuse`, whose backward runs
``torch.autograd.grad(y, (x, ...), g, retain_graph=True)`` on ``f``'s own graph. Autograd sums
the gradients of all ``T`` reads into ``g`` first, so the backward through ``f`` runs once per
backward pass (``∂L/∂x = J_f(x)ᵀ Σ_t ∂L/∂y_t``, equal to the uncached sum up to round-off), and
``f``'s graph is never consumed by a backward: a second backward (gradient accumulation, two
losses built from one forward, an LBFGS closure) works exactly as without a cache. A backward
with ``create_graph=True`` (Hessian-vector products) differentiates through ``f``'s graph and
then retires the entry, since a later double backward may free that graph; the next read
recomputes. In automatic mode, every backward through an entry retires it (its graph is
released as soon as the last tensor built on it dies), so the cache never holds a graph
across an optimizer step.

Where it stays out of the way
-----------------------------
Caching is bypassed (the map is evaluated every time, as without a cache) inside ``torch.func``
transforms (``grad``, ``vmap``, ``jvp``, ...), forward-mode AD levels, ``torch.compile`` /
``torch.export`` tracing, ``torch.jit`` tracing, CUDA graph capture (the graph must record the
map, not read a value stored before it), under active ``TorchDispatchMode`` s (fake
and meta tensors, flop counters), and under saved-tensor hooks (activation checkpointing,
``save_on_cpu``): a checkpointed region must save the same tensors when it is recomputed
during backward as in its forward, which a cache filled before the region would break.

State lives on each parametrization instance (an attribute holding a :class:`_Slot`), not in a
process-global table: ``copy.deepcopy`` gives the copy an empty cache (with the same automatic
flag), pickling stores no tensors, and nothing keeps a module alive.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrize import ParametrizationList

from manifoldparam import _torch
from manifoldparam._device import cuda_capturing

__all__ = ["cached_forward", "note_change", "value_of"]

#: Attribute of a parametrization that holds its cache slot.
_SLOT_ATTR = "_manifoldparam_cache"


class _Scope:
    """One outermost :func:`cached` block: its identity tags the entries made inside it."""

    __slots__ = ("__weakref__", "slots")

    def __init__(self) -> None:
        # The slots that stored an entry tagged with this scope (weakly: a module may die first).
        self.slots: list[weakref.ref[_Slot]] = []

    def close(self) -> None:
        for ref in self.slots:
            slot = ref()
            if slot is not None:
                slot.drop_scope(self)
        self.slots.clear()


class _AutoToken:
    """The scope tag of automatic-mode entries."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<auto>"


_AUTO = _AutoToken()

_SCOPE: ContextVar[_Scope | None] = ContextVar("manifoldparam_cache_scope", default=None)


class _StepCounter:
    """Counts finished optimizer steps (any ``torch.optim.Optimizer``), through torch's global
    step post-hook, installed the first time caching is used. Entries made before a step are
    stale after it, even when the step did not bump version counters (fused optimizers)."""

    __slots__ = ("count", "handle")

    def __init__(self) -> None:
        self.count = 0
        self.handle: Any = None

    def install(self) -> None:
        if self.handle is None:
            from torch.optim.optimizer import register_optimizer_step_post_hook

            self.handle = register_optimizer_step_post_hook(self._bump)

    def _bump(self, *_: object) -> None:
        self.count += 1


def note_change() -> None:
    """Make every stored value stale: a setting of a parametrization changed (which no
    tensor's version shows). Called by ``Parametrization.__setattr__``: a parametrization in a
    chain is cached with its chain, whose entries it cannot reach."""
    _STEPS.count += 1


_STEPS = _StepCounter()


#: ``t._version`` without a Python frame (raises for inference tensors; see :func:`_version`).
_VERSION: Callable[[Tensor], int] = operator.attrgetter("_version")


def _version(t: Tensor) -> int:
    """``t._version``; -1 for inference tensors, which keep no version counter."""
    try:
        return t._version
    except RuntimeError:  # "Inference tensors do not track version counter"
        return -1


class _Entry:
    """One stored value and everything it was computed from.

    Read on every access of a cached weight (an RNN reads it at each time step), so
    :meth:`matches` is one short-circuiting expression over plain attributes.
    """

    __slots__ = (
        "__weakref__",
        "dtype",
        "epoch",
        "out",
        "plain",
        "requires_grad",
        "state",
        "storage",
        "tracked",
        "versions",
        "x",
    )

    def __init__(
        self, x: Tensor, state: tuple[Tensor | None, ...], plain: bool, out: Tensor
    ) -> None:
        # Weak: a stale entry must not keep a replaced original (and its .grad) alive.
        # Module._apply and load_state_dict drop the cache before torch.utils.swap_tensors,
        # which refuses a weakly referenced tensor.
        self.x = weakref.ref(x)
        self.epoch = _STEPS.count
        # Keeps the storage alive (no other tensor can get its address while this entry lives:
        # half() then float() could otherwise land the new data at the old address) and records
        # the view over it: ``x.data = x.data.t()`` keeps the address and the version counter
        # but changes the value. Compared with ``x.is_set_to(self.storage)``. A detached alias
        # shares x's version counter (also after ``x.data = ...``, which keeps x's counter).
        self.storage = x.detach()
        self.dtype = x.dtype
        self.requires_grad = x.requires_grad
        # p's own tensors (read before the map ran), held strongly (they belong to p, which
        # holds this entry), compared by identity: a re-assigned buffer is a miss even if its
        # id were recycled. Also written straight into ``p._buffers`` (torch.func.functional_call
        # does), so compared on each read. ``plain`` (p has buffers only): ``state`` is then
        # ``tuple(p._buffers.values())``, compared without calling _state_tensors.
        self.state = state
        self.plain = plain
        self.out = out
        # One tuple of versions for x (its alias shares x's counter), the returned value and
        # p's tensors: any in-place change of one of them is a miss. (Compared as a tuple, not
        # a sum: torch.utils.swap_tensors can lower a counter.)
        self.tracked = (self.storage, out, *(t for t in state if t is not None))
        self.versions = tuple(map(_version, self.tracked))

    def matches(self, x: Tensor, p: nn.Module) -> bool:
        # Read on every hit: plain attribute reads and C calls, cheapest first. ``is_set_to``:
        # the same storage (so the same device), offset, shape and strides as the alias this
        # entry holds: one call for what ``x.data = ...`` can change.
        try:
            unchanged = tuple(map(_VERSION, self.tracked)) == self.versions
        except RuntimeError:  # an inference tensor (no version counter): the careful way
            unchanged = tuple(map(_version, self.tracked)) == self.versions
        return (
            unchanged
            and self.x() is x
            and self.epoch == _STEPS.count
            and x.is_set_to(self.storage)
            and x.dtype is self.dtype
            and x.requires_grad is self.requires_grad
            and self._same_state(p)
        )

    def _same_state(self, p: nn.Module) -> bool:
        if self.plain:  # still buffers only (a parameter or submodule added since is a miss)
            if p._parameters or p._modules:
                return False
            state = p._buffers.values()
        else:
            state = _state_tensors(p)
        return len(state) == len(self.state) and all(map(operator.is_, state, self.state))


class _Slot:
    """The cache of one parametrization: its automatic flag and its entries.

    ``entries`` maps ``(scope, grad_enabled, inference_mode, autocast)`` to an :class:`_Entry`;
    an entry is returned only if :meth:`_Entry.matches` the current read. A copy
    (``copy.deepcopy``) or an unpickled slot keeps the flag and starts empty.
    """

    __slots__ = ("__weakref__", "auto", "entries")

    def __init__(self, auto: bool = False) -> None:
        self.auto = auto
        self.entries: dict[tuple[Any, ...], _Entry] = {}

    def drop_scope(self, scope: object) -> None:
        for key in [k for k in self.entries if k[0] is scope]:
            del self.entries[key]

    def discard(self, entry: _Entry) -> None:
        for key in [k for k, e in self.entries.items() if e is entry]:
            del self.entries[key]

    def clear(self) -> None:
        self.entries.clear()

    def __deepcopy__(self, memo: dict[int, Any]) -> _Slot:
        return _Slot(self.auto)

    def __copy__(self) -> _Slot:
        return _Slot(self.auto)

    def __reduce__(self) -> tuple[type[_Slot], tuple[bool]]:
        return (_Slot, (self.auto,))

    def __repr__(self) -> str:
        return f"_Slot(auto={self.auto}, entries={len(self.entries)})"


class _GraphState:
    """What :class:`_Reuse` needs in backward: ``y = f(x)`` with its graph, and its cache slot."""

    __slots__ = ("drop_on_backward", "entry", "inner", "inputs", "slot")

    def __init__(
        self, inner: Tensor, inputs: tuple[Tensor, ...], slot: _Slot, drop_on_backward: bool
    ) -> None:
        self.inner = inner
        self.inputs = inputs
        self.slot = weakref.ref(slot)
        self.entry: weakref.ref[_Entry] | None = None
        self.drop_on_backward = drop_on_backward

    def retire(self) -> None:
        slot = self.slot()
        entry = self.entry() if self.entry is not None else None
        if slot is not None and entry is not None:
            slot.discard(entry)


class _Reuse(torch.autograd.Function):
    """Identity on a stored value ``y = f(x)`` whose backward differentiates ``f``'s own graph.

    ``forward`` returns ``y`` detached; ``backward(g)`` returns
    ``torch.autograd.grad(y, inputs, g, retain_graph=True, create_graph=<grad mode>)``, so
    ``f``'s graph survives any number of backward passes (see the module docstring).
    """

    @staticmethod
    def forward(ctx: Any, state: _GraphState, *inputs: Tensor) -> Tensor:  # type: ignore[override]
        ctx.state = state
        return state.inner.detach()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        state: _GraphState = ctx.state
        create_graph = torch.is_grad_enabled()
        grads = torch.autograd.grad(
            state.inner,
            state.inputs,
            grad,
            retain_graph=True,
            create_graph=create_graph,
            allow_unused=True,
        )
        if create_graph or state.drop_on_backward:
            state.retire()
        return (None, *grads)


# --------------------------------------------------------------------------- the hook


def _state_tensors(p: nn.Module) -> tuple[Tensor | None, ...]:
    """The tensors of ``p`` (buffers, parameters) its map may read besides ``x``; for a
    ``ParametrizationList`` (a chain, or a parametrization that is not ours), those of its
    modules, not its own originals."""
    if isinstance(p, ParametrizationList):
        return tuple(t for m in p._modules.values() for t in (*m.buffers(), *m.parameters()))
    if p._modules:
        return (*p.buffers(), *p.parameters())
    if p._parameters:
        return (*p._buffers.values(), *p._parameters.values())
    return tuple(p._buffers.values())


_peek_transform = _torch.peek_transform
_dispatch_depth = _torch.dispatch_depth
_saved_tensor_hooks = _torch.saved_tensor_hooks
_is_tracing = _torch.is_tracing
_forward_ad = torch.autograd.forward_ad
_grad_enabled = torch.is_grad_enabled
_inference_mode = torch.is_inference_mode_enabled
_any_autocast = _torch.any_autocast
_is_compiling = torch.compiler.is_compiling


def _tensor_bypass(x: Tensor) -> bool:
    """Whether ``x`` itself must not be cached (meta, functorch-wrapped, not a tensor). Checked
    only when an entry would be stored: a hit needs the very object an entry was stored for."""
    # Not a tensor: a torch.fx Proxy (symbolic_trace into the parametrization). A DTensor:
    # sharded coordinates (fully_shard outside its forward), gathered by each read (a
    # collective every rank makes, so none may skip it by a hit).
    return (
        not isinstance(x, Tensor)
        or x.is_meta
        or _torch.is_functorch_wrapped(x)
        or _torch.dtensor_of(x) is not None
    )


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


@torch.jit.unused
def cached_forward(self: nn.Module, x: Tensor) -> Tensor:
    """``forward`` of a manifoldparam parametrization: its value through the cache. The read
    path (:mod:`.read`) recognises the class by this very function."""
    return value_of(self, x)


def _compute(p: nn.Module, x: Tensor) -> Tensor:
    """The value without the cache: ``p.compute(x)`` for ours; for a ``ParametrizationList``,
    its chain applied to ``x`` (ours through ``compute``, so an entry is not nested in
    another; the others called as torch calls them)."""
    if not isinstance(p, ParametrizationList):
        return p.compute(x)  # type: ignore[operator]
    for m in p._modules.values():
        x = m.compute(x) if type(m).forward is cached_forward else m(x)  # type: ignore[operator]
    return x


def value_of(p: nn.Module, x: Tensor) -> Tensor:
    """``f(x)``, reused while nothing it depends on has changed (when caching is on).

    ``p`` is a manifoldparam parametrization (``f = p.compute``) or the
    ``ParametrizationList`` of an attribute whose chain is not a single one of ours (``f`` the
    chain). The single entry point through which every cached value is made. Caching is on
    inside :func:`~.api.cached` and for parametrizations in automatic mode
    (:func:`~.api.auto_cache`); otherwise this is exactly ``f(x)``. See the module docstring for
    what is keyed. A hit is read at every access of a cached weight (an RNN reads it at each
    time step): the hit path is a handful of C calls and attribute reads.
    """
    if _is_compiling():  # first: dynamo cannot trace ContextVar.get
        return _compute(p, x)
    scope = _SCOPE.get()
    slot: _Slot | None = p.__dict__.get(_SLOT_ATTR)
    token: object
    if scope is None:
        if slot is None or not slot.auto:
            return _compute(p, x)
        token = _AUTO
    else:
        token = scope
    # Caching steps aside for torch.func transforms, dispatch modes, forward-mode AD,
    # saved-tensor hooks, torch.jit tracing and CUDA graph capture (a graph that read a stored
    # value would replay it, stale, instead of the map): one C call each, inlined (run on
    # every read).
    if (
        _peek_transform() is not None
        or _dispatch_depth() > 0
        or _forward_ad._current_level >= 0
        or _saved_tensor_hooks(False) is not None
        or _is_tracing()
        or (isinstance(x, Tensor) and x.is_cuda and cuda_capturing())  # (not an fx Proxy)
    ):
        return _compute(p, x)
    key = (
        token,
        _grad_enabled(),
        _inference_mode(),
        _autocast_dtype(x) if _any_autocast() else None,
    )
    if slot is not None:
        entry = slot.entries.get(key)
        if entry is not None and entry.matches(x, p):
            return entry.out
    if _tensor_bypass(x):
        return _compute(p, x)
    if slot is None:
        slot = _Slot()
        p.__dict__[_SLOT_ATTR] = slot
        _STEPS.install()

    state = _state_tensors(p)
    plain = not (p._modules or p._parameters)
    inner = _compute(p, x)
    inputs = tuple(t for t in (x, *state) if t is not None and t.requires_grad)
    if inner.requires_grad and inputs:
        graph = _GraphState(inner, inputs, slot, drop_on_backward=token is _AUTO)
        out = _Reuse.apply(graph, *inputs)
        entry = _Entry(x, state, plain, out)
        graph.entry = weakref.ref(entry)
    else:
        out = inner
        entry = _Entry(x, state, plain, out)
    if scope is not None and not any(k[0] is scope for k in slot.entries):
        scope.slots.append(weakref.ref(slot))
    slot.entries[key] = entry
    return out
