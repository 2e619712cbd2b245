"""What a checkpoint must satisfy before anything is loaded from it.

Every loader of :mod:`.checkpoint` checks all it will load before it changes anything (model,
optimizer, multipliers, RNG), so a checkpoint that does not fit cannot leave a half-loaded run
behind. Errors are RuntimeErrors (as torch's ``load_state_dict`` raises) naming the first
offending key.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from manifoldparam._device import value_readable
from manifoldparam.hard.registration import check_loaded_state


def nested_tensors(obj: Any, path: str) -> list[tuple[str, Tensor]]:
    """``(path, tensor)`` for every tensor nested in dicts, lists and tuples of ``obj``."""
    if isinstance(obj, Tensor):
        return [(path, obj)]
    if isinstance(obj, Mapping):
        return [t for k, v in obj.items() for t in nested_tensors(v, f"{path}[{k!r}]")]
    if isinstance(obj, list | tuple):
        return [t for i, v in enumerate(obj) for t in nested_tensors(v, f"{path}[{i}]")]
    return []


def check_values(where: str, t: Tensor, *, finite: bool) -> None:
    """No NaN in a floating ``t`` (and no Inf either where ``finite``): a NaN is never a value
    to resume from; an Inf can be (a running maximum starting at -Inf), but not in a parameter
    or an optimizer's per-parameter state."""
    if not (t.is_floating_point() or t.is_complex()) or not value_readable(t):
        return
    bad = int((~torch.isfinite(t)).sum()) if finite else int(torch.isnan(t).sum())
    if bad:
        what = "NaN/Inf" if finite else "NaN"
        raise RuntimeError(
            f"{where} holds {bad} {what} entries of {t.numel()}: the run that saved it had "
            "diverged. Load an earlier checkpoint. Nothing was loaded."
        )


def checked_module_state(
    module: nn.Module, sd: Any, where: str, *, strict: bool
) -> Mapping[str, Any]:
    """``sd`` (a module's state dict) checked against ``module`` before anything is loaded.

    Checks, in ``module.state_dict()``'s key order so the error names the first offending key:
    with ``strict``, the same keys; each entry a tensor of the module's shape; parameters
    finite, other floating tensors free of NaN; for every constrained attribute what its
    constraints check (:func:`~manifoldparam.hard.registration.check_loaded_state`: coordinates,
    bounds equal to the declared ones, base points on the set). Returns a shallow copy of
    ``sd`` (with its ``_metadata``) to load, in which accepted bounds are the declared ones.
    """
    if not isinstance(sd, Mapping):
        raise TypeError(f"{where}: expected a state dict (a mapping), got {type(sd).__name__}")
    own = module.state_dict(keep_vars=True)
    out: OrderedDict[str, Any] = OrderedDict(sd)
    if hasattr(sd, "_metadata"):  # versions that modules' loaders read (BatchNorm)
        out._metadata = sd._metadata  # type: ignore[attr-defined]
    if strict:
        missing = [k for k in own if k not in out]
        unexpected = [k for k in out if k not in own]
        if missing or unexpected:
            raise RuntimeError(
                f"{where}: missing keys {missing}, unexpected keys {unexpected}: this "
                f"{type(module).__name__} is not built as the one saved (other layers or "
                "constraints). Build it as it was when saved. Nothing was loaded."
            )
    plists = {
        f"{path}.": m
        for path, m in module.named_modules()
        if isinstance(m, parametrize.ParametrizationList)
    }
    checked: set[str] = set()
    for key, mine in own.items():
        if key not in out:
            continue
        value = out[key]
        if not isinstance(value, Tensor):
            raise RuntimeError(
                f"{where}[{key!r}] is a {type(value).__name__}, expected a tensor of shape "
                f"{tuple(mine.shape)}. Nothing was loaded."
            )
        lazy = isinstance(mine, nn.parameter.UninitializedTensorMixin)
        if not lazy and value.shape != mine.shape:
            raise RuntimeError(
                f"{where}[{key!r}] has shape {tuple(value.shape)}, this "
                f"{type(module).__name__}'s {tuple(mine.shape)}: the checkpoint is of another "
                f"{type(module).__name__} (other sizes). Build it as it was when saved. Nothing "
                "was loaded."
            )
        check_values(f"{where}[{key!r}]", value, finite=isinstance(mine, nn.Parameter))
        prefix = max((p for p in plists if key.startswith(p)), key=len, default=None)
        if prefix is not None and prefix not in checked:  # once per attribute, at its 1st key
            checked.add(prefix)
            try:
                check_loaded_state(plists[prefix], out, prefix)
            except RuntimeError as e:
                raise RuntimeError(f"{where}: {e} Nothing was loaded.") from None
    return out


#: torch.optim per-parameter state of the parameter's shape (Adafactor's factored moments and
#: LBFGS's flat history vectors are not: they are checked for finiteness only).
_ELEMENTWISE = frozenset(
    {
        "exp_avg",
        "exp_avg_sq",
        "max_exp_avg_sq",
        "exp_inf",
        "momentum_buffer",
        "square_avg",
        "grad_avg",
        "acc_delta",
        "sum",
        "ax",
        "prev",
        "step_size",
    }
)


def checked_optimizer_state(
    optimizer: torch.optim.Optimizer, saved: Any, where: str
) -> dict[str, Any]:
    """The optimizer state dict to load (bound to ``optimizer``'s tensors, see
    :func:`bind_to`), checked before anything is loaded: a ``torch.optim`` state dict has as
    many groups as ``optimizer``, each with as many parameters, per-parameter moments of their
    parameter's shape and finite; any other (torchzero) no NaN."""
    if not isinstance(saved, Mapping):
        raise TypeError(f"{where}: expected a state dict (a mapping), got {type(saved).__name__}")
    bound = bind_to(optimizer, saved)
    groups, state = bound.get("param_groups"), bound.get("state")
    name = type(optimizer).__name__
    if not (isinstance(groups, list) and isinstance(state, Mapping)):
        for path, t in nested_tensors({k: v for k, v in bound.items() if k != "params"}, where):
            check_values(path, t, finite=False)  # (its "params" are the model's own)
        return bound
    mine = optimizer.param_groups
    if len(groups) != len(mine):
        raise RuntimeError(
            f"{where}['param_groups'] has {len(groups)} groups, this {name} {len(mine)}. "
            "Build the optimizer with the same parameter groups as when saved. Nothing was "
            "loaded."
        )
    ids: list[Any] = []
    for i, (group, own) in enumerate(zip(groups, mine, strict=True)):
        params = group.get("params") if isinstance(group, Mapping) else None
        if not isinstance(params, list) or len(params) != len(own["params"]):
            found = f"{len(params)} parameters" if isinstance(params, list) else "no 'params'"
            raise RuntimeError(
                f"{where}['param_groups'][{i}] has {found}, this {name}'s group {i} "
                f"{len(own['params'])}. Build the optimizer on the same parameters, in the "
                "same order, as when saved. Nothing was loaded."
            )
        ids += params
    by_id = dict(zip(ids, (p for g in mine for p in g["params"]), strict=True))
    for k, entry in state.items():
        param = by_id.get(k)
        for path, t in nested_tensors(entry, f"{where}['state'][{k!r}]"):
            key = path.rsplit("[", 1)[-1].strip("]'\"")
            if param is not None and key in _ELEMENTWISE and t.shape != param.shape:
                raise RuntimeError(
                    f"{path} has shape {tuple(t.shape)}, its parameter {tuple(param.shape)}: "
                    "the state is of another model. Nothing was loaded."
                )
            check_values(path, t, finite=True)
    for path, t in nested_tensors(groups, f"{where}['param_groups']"):
        check_values(path, t, finite=False)  # (a tensor lr, ...)
    return bound


def check_rng(saved: Any, where: str) -> None:
    """The generator states set on a throwaway generator first: torch validates them there
    (size, mt19937 consistency) without touching the global ones."""
    cpu = saved.get("cpu") if isinstance(saved, Mapping) else None
    try:
        if not isinstance(cpu, Tensor):
            raise TypeError(f"got {type(cpu).__name__}")
        torch.Generator().set_state(cpu.cpu())
    except (RuntimeError, TypeError) as e:
        raise RuntimeError(
            f"{where}['cpu'] is not a CPU generator state ({e}); save it with "
            "training_state(...), or pass rng=False to keep this process's. Nothing was "
            "loaded."
        ) from None
    if "cuda" in saved and torch.cuda.is_available():
        states = saved["cuda"]
        if not isinstance(states, list | tuple):
            raise RuntimeError(
                f"{where}['cuda'] is a {type(states).__name__}, expected a list of generator "
                "states (torch.cuda.get_rng_state_all()). Nothing was loaded."
            )
        for i, t in enumerate(states[: torch.cuda.device_count()]):
            try:
                if not isinstance(t, Tensor):
                    raise TypeError(f"got {type(t).__name__}")
                torch.Generator(device=f"cuda:{i}").set_state(t.cpu())
            except (RuntimeError, TypeError) as e:
                raise RuntimeError(
                    f"{where}['cuda'][{i}] is not a CUDA generator state ({e}); pass "
                    "rng=False to keep this process's. Nothing was loaded."
                ) from None


def bind_to(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]) -> dict[str, Any]:
    """``saved`` with the tensors it carries replaced by ``optimizer``'s own.

    torchzero's state dict holds the parameters themselves (``"params"``, with the per-module
    state keyed by their old ``id``) and its ``load_state_dict`` adopts them: after a
    ``torch.load`` those are copies, and training would update the copies. Handing it the
    optimizer's current parameters (same order, checked shapes) binds the loaded state to
    the model. A ``torch.optim`` state dict (``"state"`` / ``"param_groups"``) is returned
    unchanged.
    """
    carried = saved.get("params")
    if not (isinstance(carried, list) and all(isinstance(t, Tensor) for t in carried)):
        return dict(saved)
    own = [p for g in optimizer.param_groups for p in g["params"]]
    shapes = [tuple(t.shape) for t in carried]
    if shapes != [tuple(p.shape) for p in own]:
        raise RuntimeError(
            f"load_training_state: the checkpoint's {type(optimizer).__name__} optimized "
            f"tensors of shapes {shapes}, this one {[tuple(p.shape) for p in own]}; build "
            "the optimizer on the same parameters, in the same order, as when it was saved."
        )
    return {**saved, "params": own}
