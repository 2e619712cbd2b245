"""The private torch internals the library reads, in one file: a torch release that moves
one of them breaks here, and nowhere else.

Each is a fast query of the dispatcher's state, used on hot paths (the cache's read, the
finiteness check, the exponential's dispatch) where the public spellings cost a Python frame
or do not exist.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.modules.module as _module_globals
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.nn.utils import parametrize

__all__ = [
    "FakeTensor",
    "any_autocast",
    "dispatch_depth",
    "dtensor_of",
    "forward_ad_active",
    "fsdp_shard_versions",
    "functorch_active",
    "initializing_optimizer_state",
    "is_functorch_wrapped",
    "is_tracing",
    "only_forward",
    "optimized_module_type",
    "peek_transform",
    "removing",
    "saved_tensor_hooks",
    "shard_like",
    "torch_cache_enabled",
    "transferring",
]

#: Whether a tensor is a torch.func wrapper (grad/vmap/jvp level), not a plain tensor.
is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
#: Whether any torch.func transform is active.
functorch_active = torch._C._are_functorch_transforms_active
#: The innermost torch.func interpreter (None outside transforms).
peek_transform = torch._C._functorch.peek_interpreter_stack
#: The depth of the TorchDispatchMode stack (fake tensors, FlopCounter, ...).
dispatch_depth = torch._C._len_torch_dispatch_stack
#: The innermost saved-tensor hooks (activation checkpointing, offloading).
saved_tensor_hooks = torch._C._autograd._top_saved_tensors_default_hooks


def forward_ad_active() -> bool:
    """Whether a forward-mode AD level (``torch.autograd.forward_ad.dual_level``) is open."""
    return torch.autograd.forward_ad._current_level >= 0


def compiling_all_dynamic() -> bool:
    """Whether torch.compile traces with every size symbolic (``dynamic=True``)."""
    return not torch._dynamo.config.assume_static_by_default


#: Whether torch.jit.trace is recording.
is_tracing = torch._C._is_tracing
#: Whether autocast is on for any device.
any_autocast = torch._C._is_any_autocast_enabled


def torch_cache_enabled() -> bool:
    """Whether torch's own ``parametrize.cached()`` block is open."""
    return parametrize._cache_enabled


def optimized_module_type() -> type | None:
    """The class of ``torch.compile``-d modules (None where Dynamo is unavailable)."""
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except Exception:  # pragma: no cover - dynamo unavailable on this platform
        return None
    return OptimizedModule


#: ``nn.Module.__call__`` as torch defines it. torch.fx.symbolic_trace replaces it on the class
#: while tracing (to record ``call_module`` nodes); a read then takes torch's path, so the graph
#: calls the parametrization instead of baking the weight in as a constant.
_CALL = nn.Module.__call__


def only_forward(plist: nn.Module, p: nn.Module, global_pre_hooks: int) -> bool:
    """Whether ``plist(x)`` and ``p(x)`` do nothing but their classes' ``forward``: no hooks (on
    either, nor global module hooks), no compiled call, no ``forward`` set on an instance, and
    ``nn.Module.__call__`` not replaced (``global_pre_hooks``: how many global forward
    pre-hooks are the caller's own). One function (called on every read) of dict reads."""
    a, b, g = plist.__dict__, p.__dict__, _module_globals
    return not (
        a["_forward_pre_hooks"]
        or a["_forward_hooks"]
        or a["_backward_pre_hooks"]
        or a["_backward_hooks"]
        or b["_forward_pre_hooks"]
        or b["_forward_hooks"]
        or b["_backward_pre_hooks"]
        or b["_backward_hooks"]
        or plist._compiled_call_impl is not None
        or p._compiled_call_impl is not None
        or "forward" in a
        or "forward" in b
        or len(g._global_forward_pre_hooks) > global_pre_hooks
        or g._global_forward_hooks
        or g._global_backward_pre_hooks
        or g._global_backward_hooks
        or nn.Module.__call__ is not _CALL
    )


def _frame_running(code: object, depth: int) -> Any:
    """The nearest of the caller's ``depth`` enclosing frames that runs ``code``, or None."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return None
        if frame.f_code is code:
            return frame
        frame = frame.f_back
    return None


def transferring() -> bool:
    """Whether ``parametrize.transfer_parametrizations_and_params`` (also reached from
    ``torch.ao.quantization.prepare_qat``) is registering a parametrization it then gives the
    source's ``original``: the ``right_inverse`` it calls on the shared instance must leave
    the instance's buffers alone (its value is discarded)."""
    return _frame_running(parametrize.transfer_parametrizations_and_params.__code__, 8) is not None


def removing(param: object) -> tuple[nn.Module, bool] | None:
    """``(parametrization_list, leave_parametrized)`` while
    ``parametrize.remove_parametrizations`` registers ``param`` (its ``original``) back on the
    module; None otherwise. Read from the frame of torch's function (no hook exists there)."""
    frame = _frame_running(parametrize.remove_parametrizations.__code__, 6)
    if frame is None:
        return None
    plist = frame.f_locals.get("parametrizations")
    if plist is None or plist._parameters.get("original") is not param:
        return None
    return plist, bool(frame.f_locals.get("leave_parametrized", True))


def dtensor_of(t: object) -> Any:
    """``t`` if it is a DTensor (a sharded parameter of ``fully_shard`` outside its forward, or a
    tensor-parallel one), else None. Never imports ``torch.distributed``: without it loaded, no
    tensor is a DTensor."""
    mod = sys.modules.get("torch.distributed.tensor")
    return t if mod is not None and isinstance(t, mod.DTensor) else None


def shard_like(full: torch.Tensor, like: Any) -> Any:
    """The DTensor with ``like``'s mesh and placements whose full value is ``full``, cut from
    this rank's own ``full`` (no communication: every rank must hold the same ``full``)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def fsdp_shard_versions(module: nn.Module) -> tuple[int, ...] | None:
    """The version counters of the sharded parameters (the DTensors and their local shards)
    that FSDP2's ``fully_shard`` manages on ``module``; None if ``module`` is not one.

    FSDP all-gathers them at each forward into unsharded parameters it keeps (the same objects)
    under ``torch.autograd._unsafe_preserve_version_counter``: a write to the sharded ones
    outside an optimizer step (an EMA, a load into the shards) shows here and nowhere else."""
    get = getattr(module, "_get_fsdp_state", None)
    if get is None:
        return None
    out: list[int] = []
    for group in get()._fsdp_param_groups:
        for fsdp_param in group.fsdp_params:
            t = fsdp_param.sharded_param
            local = getattr(t, "_local_tensor", t)
            out += (t._version, local._version, local.data_ptr())
    return tuple(out)


def initializing_optimizer_state() -> bool:
    """Whether ``torch.distributed.checkpoint``'s ``get_state_dict`` / ``set_state_dict`` is
    making a fresh optimizer's state: one ``step()`` with zero gradients and every ``lr`` set
    to 0, which moves nothing (read from the frame of torch's function; no hook exists there)."""
    mod = sys.modules.get("torch.distributed.checkpoint.state_dict")
    init = getattr(mod, "_init_optim_state", None)
    return init is not None and _frame_running(init.__code__, 8) is not None
