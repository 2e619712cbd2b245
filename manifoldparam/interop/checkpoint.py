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
from collections import ChainMap
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from manifoldparam.hard.base import owner_name
from manifoldparam.hard.registration import constraints_of
from manifoldparam.interop._validate import (
    check_rng,
    check_values,
    checked_module_state,
    checked_optimizer_state,
)

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
    r"""Load a checkpoint of the unconstrained model into the constrained ``model``.

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

    Returns:
        A :class:`PlainLoadReport`: which values went through a constraint, how far each was
        from its set (:math:`d(w, M)`) and how much it changed
        (:math:`\max|\Pi_M(w) - w|`).

    Raises:
        TypeError: ``state_dict`` is not a mapping.
        RuntimeError: with ``strict``, missing or unexpected keys; a value that does not fit
            (shape, NaN); nothing is modified.

    Example:
        >>> import warnings
        >>> model = mp.orthogonal(nn.Linear(3, 3))
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", mp.interop.ProjectedOnLoadWarning)
        ...     report = mp.interop.load_plain_state_dict(model, nn.Linear(3, 3).state_dict())
        >>> [p.key for p in report.moved]           # moved onto the set: the polar factor
        ['weight']
        >>> W = model.weight
        >>> bool(torch.allclose(W @ W.T, torch.eye(3), atol=1e-6))
        True
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
        checked_module_state(model, plain_part, "load_plain_state_dict: state_dict", strict=False)
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
        check_values(f"load_plain_state_dict: state_dict[{k!r}]", value, finite=True)
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
    torchzero optimizer's state included (its ``ChainMap`` groups are stored as dicts).

    Args:
        model: the (constrained) model.
        optimizer: its optimizer, if any.
        mdmm: the ``MDMM`` holding the multipliers, if any.
        rng: include the random generators' states.
        **extra: anything else to restore with it (``step=``), as plain values or tensors.

    Returns:
        A dict of tensors and plain containers; :func:`load_training_state` restores it.

    Example:
        >>> import io
        >>> model = mp.orthogonal(nn.Linear(3, 3))
        >>> opt = torch.optim.Adam(model.parameters())
        >>> buffer = io.BytesIO()
        >>> torch.save(mp.interop.training_state(model, opt, step=7), buffer)
        >>> _ = buffer.seek(0)
        >>> state = torch.load(buffer, weights_only=True)
        >>> sorted(state)
        ['extra', 'model', 'optimizer', 'rng']
        >>> mp.interop.load_training_state(state, model, opt)
        {'step': 7}
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

    Args:
        state: what :func:`training_state` returned (e.g. after ``torch.load(path,
            weights_only=True)``).
        model: the model, built with the same constraints as when saved.
        optimizer: its optimizer, built as for a fresh run (if it was saved).
        mdmm: the ``MDMM``, built as for a fresh run (if it was saved).
        rng: restore the random generators' states.

    Returns:
        The ``extra`` dict given to :func:`training_state` (``{}`` if none).

    Raises:
        KeyError: a part asked for (optimizer, multipliers) is not in ``state``.
        RuntimeError: something does not fit (the message names the first offending
            entry); nothing was changed.
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
    model_sd = checked_module_state(model, state["model"], f"{where}['model']", strict=True)
    mdmm_sd = None
    if mdmm is not None:
        mdmm_sd = checked_module_state(
            mdmm, state["multipliers"], f"{where}['multipliers']", strict=True
        )
    optimizer_sd = None
    if optimizer is not None:
        optimizer_sd = checked_optimizer_state(
            optimizer, state["optimizer"], f"{where}['optimizer']"
        )
    load_rng = rng and "rng" in state
    if load_rng:
        check_rng(state["rng"], f"{where}['rng']")
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
