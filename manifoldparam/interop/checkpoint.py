"""Checkpoints of constrained models: plain checkpoints in, full training state round trip.

* :func:`load_plain_state_dict` loads a checkpoint of the *unconstrained* model
  (``fc.weight``) into a constrained one (whose state has ``fc.parametrizations.weight.original``
  and buffers such as the orthogonal base point). Each constrained value is assigned through
  the constraint: moved to the nearest point of its set first (orthogonal: polar factor; SPD:
  eigenvalues lifted; box/orthant: clamp). The returned :class:`PlainLoadReport` says what
  moved and by how much, and a :class:`ProjectedOnLoadWarning` is issued when anything moved.
* :func:`training_state` / :func:`load_training_state`: model + multipliers + optimizer (+ the
  RNG state) in one dict of tensors and plain containers. It loads with
  ``torch.load(path, weights_only=True)`` and training resumes bit-for-bit.

Example::

    plain = torch.load("pretrained_linear.pt", weights_only=True)     # {"weight", "bias"}
    report = manifoldparam.interop.load_plain_state_dict(mp.orthogonal(nn.Linear(8, 8)), plain)
    print(report)                 # weight: moved 0.41 onto orthogonal (was 0.87 off the set)

    torch.save(manifoldparam.interop.training_state(model, optimizer, mdmm), "ckpt.pt")
    manifoldparam.interop.load_training_state(
        torch.load("ckpt.pt", weights_only=True), model, optimizer, mdmm
    )
"""

from __future__ import annotations

import warnings
from collections import ChainMap, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from manifoldparam._device import value_readable
from manifoldparam.hard.base import owner_name
from manifoldparam.hard.registration import check_loaded_state, constraints_of

__all__ = [
    "PlainLoadReport",
    "ProjectedOnLoadWarning",
    "load_plain_state_dict",
    "load_training_state",
    "training_state",
]

_MARK = "parametrizations."


class ProjectedOnLoadWarning(UserWarning):
    """A loaded value was off its constraint set and was moved to the nearest point."""


@dataclass(frozen=True)
class Projected:
    """One constrained value loaded from a plain checkpoint."""

    key: str
    owner: str
    distance: float  # how far the checkpoint's value was from the set (the set's metric)
    change: float  # max |loaded - checkpoint| after projection
    moved: bool  # whether the value was off the set beyond the constraint's tolerance


@dataclass
class PlainLoadReport:
    """What :func:`load_plain_state_dict` did; ``print`` it for a summary."""

    projected: list[Projected] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    stripped_prefix: str = ""

    @property
    def moved(self) -> list[Projected]:
        """The values that were off their set and were moved onto it."""
        return [p for p in self.projected if p.moved]

    def __str__(self) -> str:
        lines = [
            f"loaded {len(self.loaded)} tensors, {len(self.projected)} through a constraint"
            + (f" (stripped prefix {self.stripped_prefix!r})" if self.stripped_prefix else "")
        ]
        for p in self.projected:
            what = (
                f"moved by up to {p.change:.3e} onto the set (it was {p.distance:.3e} off)"
                if p.moved
                else "on the set already"
            )
            lines.append(f"  {p.key} -> {p.owner}: {what}")
        if self.missing_keys:
            lines.append(f"  missing: {self.missing_keys}")
        if self.unexpected_keys:
            lines.append(f"  unexpected: {self.unexpected_keys}")
        return "\n".join(lines)


def _parametrized_attributes(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Plain state-dict key (``fc.weight``) -> (module, name) for every parametrized tensor."""
    out: dict[str, tuple[nn.Module, str]] = {}
    for path, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for name in module.parametrizations:
                out[f"{path}.{name}" if path else name] = (module, name)
    return out


def _strip_prefix(keys: list[str], own: set[str]) -> str:
    """A wrapper prefix (DDP's ``module.``, compile's ``_orig_mod.``) on every key, if any."""
    for prefix in ("module.", "_orig_mod."):
        if (
            keys
            and all(k.startswith(prefix) for k in keys)
            and not any(k.startswith(prefix) for k in own)
        ):
            return prefix
    return ""


@torch.no_grad()
def load_plain_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    *,
    strict: bool = True,
    warn: bool = True,
) -> PlainLoadReport:
    """Load a checkpoint of the unconstrained model into the constrained ``model``.

    A key naming a constrained tensor (``fc.weight`` where ``fc.weight`` is parametrized) is
    assigned through the constraint, after moving the value to the nearest point of the set
    (:func:`manifoldparam.project`); every other key loads as in
    :meth:`torch.nn.Module.load_state_dict`. Keys of the constrained model itself
    (``fc.parametrizations.weight.original``, buffers) load unchanged too, so a mix works.
    A ``module.`` (DDP) or ``_orig_mod.`` (``torch.compile``) prefix on every key is stripped.

    Args:
        model: the constrained model; modified in place.
        state_dict: the checkpoint, e.g. ``torch.load(path, weights_only=True)``.
        strict: raise (before anything is modified) on missing or unexpected keys, like torch.
        warn: issue a :class:`ProjectedOnLoadWarning` naming every value that was moved.

    Returns a :class:`PlainLoadReport`: which values went through a constraint, how far each
    was from its set and how much it changed.

    Example::

        model = mp.orthogonal(nn.Linear(8, 8))
        report = load_plain_state_dict(model, nn.Linear(8, 8).state_dict())
        report.moved[0].change        # how much the weight moved to become orthogonal
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"load_plain_state_dict: expected a mapping of tensors (a state_dict), got "
            f"{type(state_dict).__name__}"
        )
    own = model.state_dict(keep_vars=True)
    keys = list(state_dict.keys())
    prefix = _strip_prefix(keys, set(own))
    sd = {k[len(prefix) :]: v for k, v in state_dict.items()}
    attrs = _parametrized_attributes(model)

    plain_part: dict[str, Any] = {}
    constrained: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for k, v in sd.items():
        if k in attrs:
            constrained[k] = v
        elif k in own:
            plain_part[k] = v
        else:
            unexpected.append(k)
    missing: list[str] = []
    for k in own:
        if k in plain_part:
            continue
        if _MARK in k and _plain_of(k) in attrs:
            plain_key = _plain_of(k)
            if plain_key in constrained:
                continue  # assigned through the constraint from the plain key
            family = _constrained_prefix(plain_key)
            if any(j.startswith(family) for j in plain_part):
                missing.append(k)  # a partial constrained entry: name the exact key
            elif plain_key not in missing:
                missing.append(plain_key)
            continue
        missing.append(k)
    if strict and (missing or unexpected):
        hint = ""
        if any(_MARK in k for k in unexpected):
            hint = (
                " The checkpoint is of a constrained model: register the same constraints on "
                "this model first, or load manifoldparam.export(constrained_model)'s state."
            )
        raise RuntimeError(
            f"load_plain_state_dict({type(model).__name__}): missing keys {missing}, "
            f"unexpected keys {unexpected}.{hint} Pass strict=False to load the rest."
        )

    # Everything is checked before anything is modified: the model's own keys (shapes,
    # finiteness, the constraints' checks), then each constrained value and its target.
    plain_part = dict(
        _checked_module_state(model, plain_part, "load_plain_state_dict: state_dict", strict=False)
    )
    targets: list[tuple[str, nn.Module, str, Tensor, Tensor, float, bool]] = []
    for k, v in constrained.items():
        module, name = attrs[k]
        current = getattr(module, name)
        if not isinstance(v, Tensor) or v.shape != current.shape:
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise RuntimeError(
                f"load_plain_state_dict: {k!r} has shape {shape} but "
                f"{owner_name(module, name)} has shape {tuple(current.shape)}. Nothing was "
                "loaded."
            )
        value = v.detach().to(device=current.device, dtype=current.dtype)
        # (after the cast: a float64 1e300 is Inf in float32) no nearest point to NaN/Inf
        _check_values(f"load_plain_state_dict: state_dict[{k!r}]", value, finite=True)
        found = constraints_of(module, name)
        if found:
            p = found[-1]
            distance = float(p.distance(value))
            on_set = bool(p.check(value))
            target = value if on_set else p.project(value)
            ok, why = p.check(target, explain=True)
            if not ok:  # what the assignment would refuse, after the rest was loaded
                raise RuntimeError(
                    f"load_plain_state_dict: {k!r}: its nearest point is not {p.set_name} "
                    f"within the tolerance ({why}); register {owner_name(module, name)} with a "
                    "larger atol= or load it in a wider dtype. Nothing was loaded."
                )
        else:  # a parametrization of another library: its right_inverse decides
            distance, on_set, target = 0.0, True, value
        targets.append((k, module, name, value, target, distance, on_set))

    report = PlainLoadReport(stripped_prefix=prefix)
    if plain_part:
        model.load_state_dict(plain_part, strict=False)
        report.loaded.extend(plain_part)
    for k, module, name, value, target, distance, on_set in targets:
        setattr(module, name, target)
        change = float((getattr(module, name) - value).abs().amax()) if value.numel() else 0.0
        report.projected.append(
            Projected(k, owner_name(module, name), distance, change, not on_set)
        )
        report.loaded.append(k)
    report.missing_keys.extend(missing)
    report.unexpected_keys.extend(unexpected)
    if warn and report.moved:
        items = "; ".join(
            f"{p.key} ({p.owner}) was {p.distance:.3e} off its set, moved by up to {p.change:.3e}"
            for p in report.moved
        )
        warnings.warn(
            f"load_plain_state_dict: {len(report.moved)} value(s) were off their constraint "
            f"set and were moved to the nearest point: {items}. The loaded model differs "
            "from the checkpoint there; fine-tune it to recover.",
            ProjectedOnLoadWarning,
            stacklevel=2,
        )
    return report


def _constrained_prefix(plain_key: str) -> str:
    head, _, name = plain_key.rpartition(".")
    return f"{head}.{_MARK}{name}." if head else f"{_MARK}{name}."


def _plain_of(key: str) -> str:
    head, _, tail = key.partition(_MARK)
    return head + tail.split(".", 1)[0]


# ------------------------------------------------------------------------ validation
# Every loader here checks all it will load before it changes anything (model, optimizer,
# multipliers, RNG), so a checkpoint that does not fit cannot leave a half-loaded run behind.
# Errors are RuntimeErrors (as torch's load_state_dict raises) naming the first offending key.


def _tensors(obj: Any, path: str) -> list[tuple[str, Tensor]]:
    """``(path, tensor)`` for every tensor nested in dicts, lists and tuples of ``obj``."""
    if isinstance(obj, Tensor):
        return [(path, obj)]
    if isinstance(obj, Mapping):
        return [t for k, v in obj.items() for t in _tensors(v, f"{path}[{k!r}]")]
    if isinstance(obj, list | tuple):
        return [t for i, v in enumerate(obj) for t in _tensors(v, f"{path}[{i}]")]
    return []


def _check_values(where: str, t: Tensor, *, finite: bool) -> None:
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


def _checked_module_state(
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
        _check_values(f"{where}[{key!r}]", value, finite=isinstance(mine, nn.Parameter))
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


def _checked_optimizer_state(
    optimizer: torch.optim.Optimizer, saved: Any, where: str
) -> dict[str, Any]:
    """The optimizer state dict to load (bound to ``optimizer``'s tensors, see
    :func:`_bind_to`), checked before anything is loaded: a ``torch.optim`` state dict has as
    many groups as ``optimizer``, each with as many parameters, per-parameter moments of their
    parameter's shape and finite; any other (torchzero) no NaN."""
    if not isinstance(saved, Mapping):
        raise TypeError(f"{where}: expected a state dict (a mapping), got {type(saved).__name__}")
    bound = _bind_to(optimizer, saved)
    groups, state = bound.get("param_groups"), bound.get("state")
    name = type(optimizer).__name__
    if not (isinstance(groups, list) and isinstance(state, Mapping)):
        for path, t in _tensors({k: v for k, v in bound.items() if k != "params"}, where):
            _check_values(path, t, finite=False)  # (its "params" are the model's own)
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
        for path, t in _tensors(entry, f"{where}['state'][{k!r}]"):
            key = path.rsplit("[", 1)[-1].strip("]'\"")
            if param is not None and key in _ELEMENTWISE and t.shape != param.shape:
                raise RuntimeError(
                    f"{path} has shape {tuple(t.shape)}, its parameter {tuple(param.shape)}: "
                    "the state is of another model. Nothing was loaded."
                )
            _check_values(path, t, finite=True)
    for path, t in _tensors(groups, f"{where}['param_groups']"):
        _check_values(path, t, finite=False)  # (a tensor lr, ...)
    return bound


def _check_rng(saved: Any, where: str) -> None:
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


# ------------------------------------------------------------------------ training state
def _portable(obj: Any) -> Any:
    """An optimizer state dict in types ``torch.load(weights_only=True)`` accepts.

    torchzero (0.4) stores its parameter groups as ``ChainMap`` objects (group settings over
    the defaults) and, through ``locals()``, each module's class under ``"__class__"``: the
    ``ChainMap`` becomes the ``dict`` it reads as, the class is dropped (nothing reads it).
    Everything else is kept as it is.
    """
    if isinstance(obj, ChainMap):
        obj = dict(obj)
    if isinstance(obj, dict):
        return {
            k: _portable(v)
            for k, v in obj.items()
            if not (k == "__class__" and isinstance(v, type))
        }
    if isinstance(obj, list):
        return [_portable(v) for v in obj]
    return obj


def _bind_to(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]) -> dict[str, Any]:
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


def training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    mdmm: nn.Module | None = None,
    *,
    rng: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """Everything needed to resume training bit-for-bit, as tensors and plain containers.

    Keys: ``"model"`` (its ``state_dict``: coordinates and buffers such as orthogonal base
    points), ``"optimizer"``, ``"multipliers"`` (an ``MDMM``'s ``state_dict``), ``"rng"`` (the
    CPU generator's state, and CUDA's when initialised) and ``extra`` (e.g. ``step=``). Save
    it with :func:`torch.save`; it loads with ``torch.load(..., weights_only=True)``, a
    torchzero optimizer's state included (its ``ChainMap`` groups are stored as dicts)::

        torch.save(training_state(model, opt, mdmm, step=step), "ckpt.pt")
    """
    state: dict[str, Any] = {"model": model.state_dict()}
    if optimizer is not None:
        state["optimizer"] = _portable(optimizer.state_dict())
    if mdmm is not None:
        state["multipliers"] = mdmm.state_dict()
    if rng:
        state["rng"] = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
    if extra:
        state["extra"] = dict(extra)
    return state


def load_training_state(
    state: Mapping[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    mdmm: nn.Module | None = None,
    *,
    rng: bool = True,
) -> dict[str, Any]:
    """Restore what :func:`training_state` saved; returns its ``extra`` dict.

    Build ``model`` (with the same constraints), ``mdmm`` and ``optimizer`` as for a fresh
    run, then call this. Atomic: everything is checked before anything changes, and a
    checkpoint that does not fit raises a :class:`RuntimeError` naming its first offending
    entry (``state['model']['fc.parametrizations.weight.0.base']``) with the model,
    optimizer, multipliers and RNG left bit-identical. Checked: the parts are there (else a
    :class:`KeyError`); model and multipliers have the same keys, shapes, finite parameters,
    no NaN elsewhere, and fit their constraints (bounds equal to the declared ones, base
    points on the set, finite coordinates); the optimizer has the same groups and parameter
    counts, per-parameter moments of their parameter's shape and finite; the RNG states are
    valid generator states. The optimizer loads first: one that, loading, replaces the tensors
    it optimizes with other ones (some third-party optimizers rebind to the checkpoint's
    tensors and would train copies) is put back as it was and the load raises. torchzero's
    optimizers, which carry the parameters in their state dict, are bound to the optimizer's
    current parameters first.
    """
    if not isinstance(state, Mapping):
        raise TypeError(
            f"load_training_state: expected the dict training_state(...) made, got "
            f"{type(state).__name__}"
        )
    for key, obj in (("model", model), ("optimizer", optimizer), ("multipliers", mdmm)):
        if obj is not None and key not in state:
            raise KeyError(
                f"load_training_state: the checkpoint has no {key!r} entry (it has "
                f"{sorted(state)}); save it with training_state(model, optimizer, mdmm)."
            )
    where = "load_training_state: state"
    model_sd = _checked_module_state(model, state["model"], f"{where}['model']", strict=True)
    mdmm_sd = None
    if mdmm is not None:
        mdmm_sd = _checked_module_state(
            mdmm, state["multipliers"], f"{where}['multipliers']", strict=True
        )
    optimizer_sd = None
    if optimizer is not None:
        optimizer_sd = _checked_optimizer_state(
            optimizer, state["optimizer"], f"{where}['optimizer']"
        )
    load_rng = rng and "rng" in state
    if load_rng:
        _check_rng(state["rng"], f"{where}['rng']")
    extra = state.get("extra", {})
    if not isinstance(extra, Mapping):
        raise TypeError(f"{where}['extra'] is a {type(extra).__name__}, expected a dict")

    # Nothing has changed so far. The optimizer first: only its own load can fail now.
    if optimizer is not None and optimizer_sd is not None:
        _load_optimizer(optimizer, optimizer_sd)
    model.load_state_dict(model_sd)
    if mdmm is not None:
        mdmm.load_state_dict(mdmm_sd)
    if load_rng:
        # torch.load(..., map_location="cuda") moves the saved generator states to the GPU;
        # torch takes them as CPU byte tensors. A checkpoint from a machine with more GPUs sets
        # the ones this process has.
        torch.set_rng_state(state["rng"]["cpu"].cpu())
        if "cuda" in state["rng"] and torch.cuda.is_available():
            saved = [t.cpu() for t in state["rng"]["cuda"]]
            torch.cuda.set_rng_state_all(saved[: torch.cuda.device_count()])
    return dict(extra)


def _load_optimizer(optimizer: torch.optim.Optimizer, sd: Mapping[str, Any]) -> None:
    """``optimizer.load_state_dict(sd)``; if it raises or rebinds to other tensors than the
    ones it optimizes, ``optimizer`` is put back as it was and a RuntimeError raised."""
    # torch.optim's load_state_dict replaces ``state`` and ``param_groups`` by new objects
    # (it writes into neither), so the old attributes are a snapshot that costs nothing.
    snapshot = dict(optimizer.__dict__)
    before = [id(p) for g in optimizer.param_groups for p in g["params"]]
    try:
        optimizer.load_state_dict(dict(sd))
        rebound = [id(p) for g in optimizer.param_groups for p in g["params"]] != before
    except BaseException:
        optimizer.__dict__.clear()
        optimizer.__dict__.update(snapshot)
        raise
    if rebound:
        optimizer.__dict__.clear()
        optimizer.__dict__.update(snapshot)
        restored = [id(p) for g in optimizer.param_groups for p in g["params"]] == before
        raise RuntimeError(
            f"load_training_state: {type(optimizer).__name__}.load_state_dict replaced the "
            "tensors it optimizes with other ones, so further steps would not train the "
            "model. Rebuild the optimizer on model.parameters() and load only its state "
            "(per-parameter buffers) instead. "
            + (
                "The optimizer was put back as it was; nothing was loaded."
                if restored
                else "The optimizer could not be put back: rebuild it. Nothing else was loaded."
            )
        )
