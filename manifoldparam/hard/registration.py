"""Registering a constraint on a module attribute, and the operations on registered ones.

* :func:`register` -- the one way a constraint is put on ``module.<name>`` (the public
  constructors are this one call), after the checks every constraint shares
  (:func:`checked_weight`: dtype, NaN, tied and meta weights, geoopt parameters);
* :func:`check_loaded_state` -- what a checkpoint may load into a constrained attribute;
* :func:`constraints_of`, :func:`project`, :func:`rebase` -- the constraints on an attribute,
  the nearest point of its set, and the dynamic trivialization of a whole model.
"""

from __future__ import annotations

import functools
import gc
import sys
import warnings
from collections.abc import MutableMapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from manifoldparam._device import autocast_off, value_readable
from manifoldparam._torch import dtensor_of, shard_like
from manifoldparam.caching.api import invalidate
from manifoldparam.caching.read import install as install_read

__all__ = [
    "check_loaded_state",
    "checked_weight",
    "constraints_of",
    "project",
    "rebase",
    "register",
]

from manifoldparam.hard.base import (
    LOW_PRECISION,
    Parametrization,
    check_finite,
    compute_dtype,
    owner_name,
)


def checked_weight(module: nn.Module, name: str, complex_weight: bool = False) -> Tensor:
    """``module.<name>`` after the registration-time checks every constraint shares.

    Raises, before anything is touched, on: a missing attribute, an attribute that is already
    parametrized, a geoopt ``ManifoldParameter``, a non-floating or complex dtype (a real one
    where ``complex_weight``: the set lies in complex matrices), NaN/Inf.
    """
    owner = owner_name(module, name)
    if parametrize.is_parametrized(module, name):
        chain = [type(p).__name__ for p in module.parametrizations[name]]
        raise ValueError(
            f"{owner} is already parametrized ({' -> '.join(chain)}); remove it "
            "first with torch.nn.utils.parametrize.remove_parametrizations(module, name)."
        )
    if name not in module._parameters and name not in module._buffers:
        have = [n for n, _ in module.named_parameters(recurse=False)]
        raise AttributeError(
            f"{owner.rsplit('.', 1)[0]} has no parameter or buffer named {name!r} "
            f"(its parameters: {have}); pass the attribute's name, e.g. name='weight'."
        )
    weight = getattr(module, name)
    if weight is None:
        raise AttributeError(f"{owner} is None; there is nothing to constrain.")
    _reject_manifold_parameter(weight, owner)
    if complex_weight and not weight.is_complex():
        raise TypeError(
            f"{owner} has dtype {weight.dtype}; this constraint (unitary) needs a complex "
            f"weight (complex64/complex128): make it complex first, e.g. module.{name} = "
            f"nn.Parameter(module.{name}.detach().to(torch.complex64)), or for a real weight use "
            "manifoldparam.orthogonal(module, name)."
        )
    if not complex_weight and not weight.is_floating_point():
        raise TypeError(
            f"{owner} has dtype {weight.dtype}; constraints need a real floating tensor: "
            "convert the module first, e.g. module.float() or module.double()."
        )
    if weight.numel() == 0:
        raise ValueError(
            f"{owner} has no entries (shape {tuple(weight.shape)}); there is nothing to "
            "constrain. Check the layer's sizes, or skip the constraint for empty layers."
        )
    if not value_readable(weight):
        raise ValueError(
            f"{owner} is on the {weight.device} device (or fake), so it has no values to keep: "
            "registration projects the current weight onto the set and builds the "
            "constraint's buffers from it. Materialise the module first "
            "(module.to_empty(device=...) and its initialisation), then register."
        )
    check_finite(weight.detach(), owner, "weight")
    _reject_tied(module, name, weight, owner)
    return weight


def _reject_tied(module: nn.Module, name: str, weight: Tensor, owner: str) -> None:
    """Raise if another module holds the same Parameter (tied weights, ``dec.weight =
    enc.weight``): registration turns that very tensor into the coordinates, which the other
    module would then silently read as its weight."""
    if _refcount(weight) <= _refs_when_alone():
        return  # nothing else holds it (the usual case: no heap scan)
    others = [
        f"{key!r} of {'the same' if m is module else 'another'} {type(m).__name__}"
        for m, key in _parameter_holders(weight)
        if not (m is module and key == name)
    ]
    if others:
        raise ValueError(
            f"{owner}: this Parameter is also held as {', '.join(others)} (tied weights). "
            "Registering a constraint turns that tensor into the constraint's coordinates, "
            "which the other module would then read as its weight. Constrain one module and "
            "let the other read its weight instead of holding the Parameter, e.g. a decoder "
            "whose forward calls F.linear(h, encoder.weight.T); or untie them first "
            "(other.weight = nn.Parameter(other.weight.detach().clone())) to constrain each "
            "on its own."
        )


def _refcount(t: Tensor) -> int:
    return sys.getrefcount(t)


def _probe_refs(weight: Tensor) -> int:  # stands where _reject_tied stands
    return _refcount(weight)


@functools.cache
def _refs_when_alone() -> int:
    """The reference count :func:`_reject_tied` sees for a Parameter nothing else holds,
    measured once through a call path of the same shape (checked_weight's local, then one
    argument), since the count differs across Python versions."""
    probe = nn.Module()  # (not nn.Linear: its init would draw from the global RNG)
    probe.weight = nn.Parameter(torch.empty(1))
    weight = probe.weight
    return _probe_refs(weight)


def _parameter_holders(t: Tensor) -> list[tuple[nn.Module, str]]:
    """``(module, key)`` for every module whose ``_parameters[key]`` is ``t`` (a heap scan)."""
    found: list[tuple[nn.Module, str]] = []
    for d in gc.get_referrers(t):
        if not isinstance(d, dict):
            continue
        keys = [k for k, v in d.items() if v is t and isinstance(k, str)]
        if not keys:
            continue
        for owner in gc.get_referrers(d):
            # A module's instance dict holds ``_parameters`` (or the module itself, where the
            # interpreter inlines instance dicts).
            if isinstance(owner, nn.Module) and owner.__dict__.get("_parameters") is d:
                found.extend((owner, k) for k in keys)
            elif isinstance(owner, dict) and owner.get("_parameters") is d:
                for m in gc.get_referrers(owner):
                    if isinstance(m, nn.Module) and m.__dict__ is owner:
                        found.extend((m, k) for k in keys)
    return found


def register(
    module: nn.Module,
    name: str,
    constraint: type[Parametrization] | Parametrization | nn.Module,
    **options: Any,
) -> nn.Module:
    r"""Constrain ``module.<name>``: the one way every constraint is registered.

    After registration ``module.<name>`` reads :math:`f(x)`, the constraint's map applied to
    trainable coordinates :math:`x` (``module.parametrizations.<name>.original``), which start
    at :math:`x_0` with :math:`f(x_0) = \Pi_M(w)`, the nearest point of the set to the
    current weight :math:`w`. For a :class:`Parametrization`: the weight is checked
    (:func:`checked_weight`) and :meth:`Parametrization.validate` runs before the module is
    touched; the coordinates must number :attr:`Parametrization.dim` (minimal coordinates);
    checkpoint checks are installed. Every attribute registered here gets the cache's read
    path (:mod:`manifoldparam.caching.read`).

    Args:
        module: the module that holds the attribute.
        name: the attribute to constrain (a parameter or buffer of ``module``).
        constraint: a :class:`Parametrization` subclass (built as
            ``constraint(weight.shape, owner="Linear.weight", **options)``; the public
            constructors such as :func:`manifoldparam.orthogonal` are this one call), an
            instance of one, or any other ``nn.Module`` parametrization in torch's sense
            (``forward`` and ``right_inverse``), registered through torch unchanged.
        **options: keyword arguments of the subclass (``map="cayley"``), or of
            :func:`~torch.nn.utils.parametrize.register_parametrization` for a plain module.

    Returns:
        ``module``, with ``module.<name>`` constrained.

    Raises:
        ValueError: the attribute is already parametrized, empty, on the meta device, holds
            NaN/Inf, is tied to another module's, fails the constraint's ``validate``, or
            ``inverse`` returned more or fewer coordinates than ``dim`` (the module is then
            restored).
        TypeError: a non-floating weight, a geoopt ``ManifoldParameter``, options given with
            an instance, or a ``constraint`` that is neither a parametrization nor a module.
        AttributeError: ``module`` has no attribute ``name``.

    Example:
        >>> layer = mp.register(nn.Linear(4, 4), "weight", mp.Orthogonal, map="cayley")
        >>> W = layer.weight
        >>> bool(torch.allclose(W @ W.T, torch.eye(4), atol=1e-6))
        True
        >>> layer.parametrizations.weight.original.numel()   # n(n-1)/2
        6
    """
    if not isinstance(constraint, Parametrization) and not (
        isinstance(constraint, type) and issubclass(constraint, Parametrization)
    ):
        if not isinstance(constraint, nn.Module):
            raise TypeError(
                f"{owner_name(module, name)}: register() takes a Parametrization subclass, an "
                f"instance of one, or an nn.Module parametrization; got {type(constraint)!r}."
            )
        parametrize.register_parametrization(module, name, constraint, **options)
        install_read(module, name)
        return module
    weight = checked_weight(module, name, getattr(constraint, "complex_weight", False))
    owner = owner_name(module, name)
    if isinstance(constraint, Parametrization):
        if options:
            raise TypeError(f"{owner}: options {sorted(options)} go to the class, not an instance")
        parametrization = constraint
        if parametrization.owner.startswith("<"):
            parametrization.owner = owner
    else:
        parametrization = constraint(weight.shape, owner=owner, **options)
    parametrization.validate(weight)
    with warnings.catch_warnings():  # (torch's note on complex modules: the user's, not ours)
        warnings.filterwarnings("ignore", "Complex modules", UserWarning)
        parametrization.to(device=weight.device, dtype=weight.dtype)
    saved = weight.detach().clone()  # torch writes the coordinates into the same tensor
    parametrize.register_parametrization(module, name, parametrization)
    plist = module.parametrizations[name]
    count = plist.original.numel()
    if count != parametrization.dim:
        parametrize.remove_parametrizations(module, name, leave_parametrized=False)
        with torch.no_grad():
            getattr(module, name).set_(saved)
        raise ValueError(
            f"{owner}: {type(parametrization).__name__}.inverse returned {count} coordinates "
            f"but the set has dimension {parametrization.dim} (its dim); coordinates must be "
            "minimal, one per direction of the set. The module is unchanged."
        )
    # load_state_dict writes ``original`` before it reaches the parametrization: check what it
    # would load and drop the cache first (_before_load).
    plist.register_load_state_dict_pre_hook(_before_load)
    install_read(module, name)
    return module


def check_loaded_state(plist: nn.Module, state: MutableMapping[str, Any], prefix: str) -> None:
    """Raise before a load changes anything of ``plist`` (an attribute's ParametrizationList,
    its keys under ``prefix``) if ``state`` does not fit it: coordinates (``original``) of
    another shape, not floating or not finite, and whatever a constraint's
    :meth:`Parametrization.check_state` rejects (bounds other than the declared ones, a base
    point off the set), with a :class:`RuntimeError` that names the key. Keys absent from
    ``state`` are not checked. Accepted bounds are replaced in ``state`` by the declared ones
    (see ``check_state``)."""
    ours = [p for p in plist if isinstance(p, Parametrization)]
    if not ours:
        return
    for name, own in plist._parameters.items():  # "original" ("original0", ... for tuples)
        if own is not None:
            ours[0]._loaded(state, prefix + name, own, "coordinates")
    for index, p in plist._modules.items():
        if isinstance(p, Parametrization):
            p.check_state(state, f"{prefix}{index}.")


def _before_load(
    plist: nn.Module, state_dict: MutableMapping[str, Any], prefix: str, *_: Any
) -> None:
    # torch copies ``original``, then each constraint's buffers: check all of them first, so
    # that a failing check leaves this attribute as it was. Then drop the cache (its graphs
    # hold ``original``, and a swapping load refuses a tensor held elsewhere).
    try:
        check_loaded_state(plist, state_dict, prefix)
    except RuntimeError as e:
        owner = next((p.owner for p in plist if isinstance(p, Parametrization)), "it")
        raise RuntimeError(f"{e} Nothing of {owner} was loaded.") from None
    invalidate(plist)


def _reject_manifold_parameter(weight: Tensor, owner: str) -> None:
    try:
        from geoopt import ManifoldParameter, ManifoldTensor
    except ImportError:  # pragma: no cover - geoopt is a dependency
        return
    if isinstance(weight, ManifoldParameter | ManifoldTensor):
        raise TypeError(
            f"{owner} is a geoopt {type(weight).__name__} on {weight.manifold}; a Riemannian "
            "optimizer would retract the unconstrained coordinates (NaN). Either keep geoopt's "
            "parameter and its optimizer, or constrain a plain tensor: "
            f"module.{owner.split('.')[-1]} = nn.Parameter(weight.detach().clone())."
        )


def constraints_of(module: nn.Module, name: str) -> list[Parametrization]:
    """The manifoldparam parametrizations registered on ``module.<name>``.

    Args:
        module: the module that holds the attribute.
        name: the attribute's name.

    Returns:
        The :class:`Parametrization` instances on the attribute, in registration order; an
        empty list when it is not parametrized (or only by other modules).

    Example:
        >>> layer = mp.spd(nn.Linear(3, 3))
        >>> [type(p).__name__ for p in mp.hard.constraints_of(layer, "weight")]
        ['SPD']
        >>> mp.hard.constraints_of(layer, "bias")
        []
    """
    if not parametrize.is_parametrized(module, name):
        return []
    return [p for p in module.parametrizations[name] if isinstance(p, Parametrization)]


def project(module: nn.Module, name: str, value: Tensor) -> Tensor:
    r"""The nearest point to ``value`` of the set ``module.<name>`` is constrained to.

    :math:`\Pi_M(v) = \arg\min_{w \in M} d(w, v)` in the set's own metric: the polar factor
    for orthogonal weights, the symmetric part with its eigenvalues lifted for SPD, a clamp
    for boxes and the orthant. Use it to assign a value that is off the set (assignment
    itself refuses one).

    Args:
        module: the module that holds the constrained attribute.
        name: the attribute's name.
        value: any tensor of the attribute's shape.

    Returns:
        A tensor of ``value``'s dtype on the set (no graph: computed under ``no_grad``).

    Raises:
        ValueError: ``module.<name>`` has no manifoldparam constraint.

    Example:
        >>> layer = mp.orthogonal(nn.Linear(4, 4))
        >>> layer.weight = mp.project(layer, "weight", torch.randn(4, 4))
        >>> W = layer.weight
        >>> bool(torch.allclose(W @ W.T, torch.eye(4), atol=1e-5))
        True
    """
    found = constraints_of(module, name)
    if not found:
        raise ValueError(
            f"{type(module).__name__}.{name} has no manifoldparam constraint; register one "
            "first (e.g. manifoldparam.orthogonal(module, name))."
        )
    p = found[-1]
    with torch.no_grad(), autocast_off(value):
        y = p.project(value.to(compute_dtype(value.dtype)))
        # (half precision: rounded as the map's values are, so that it stays on the set)
        return p.to_storage(y, value.dtype) if value.dtype in LOW_PRECISION else y.to(value.dtype)


@torch.no_grad()
def rebase(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    r"""Dynamic trivialization: move the base point of every constraint that has one
    (``has_base_point``, e.g. :class:`~manifoldparam.Orthogonal`) to the current weight.

    For each: :math:`x \leftarrow f^{-1}(\Pi_M(f(x)))`, so the base becomes the current
    weight (re-projected, so float error does not compound) and the coordinates 0. The weight
    is unchanged up to round-off and the map is again evaluated near its base, where it is
    best conditioned (for ``W = B exp(A)``: a small ``A``, few squarings). Under FSDP2
    (``fully_shard``) call it on every rank outside forward/backward (after ``step()``): it
    gathers the sharded coordinates (a collective) and each rank keeps its shard of the new ones.

    Args:
        model: the model whose constraints are rebased (every submodule).
        optimizer: if given, the state of each rebased coordinate tensor (momentum, Adam
            moments) is dropped: it refers to the old chart.

    Returns:
        The number of weights rebased.

    Example:
        >>> model = nn.Sequential(mp.orthogonal(nn.Linear(4, 4)), nn.Linear(4, 1))
        >>> opt = torch.optim.Adam(model.parameters(), lr=0.1)
        >>> model(torch.randn(8, 4)).sum().backward(); opt.step()
        >>> before = model[0].weight.detach().clone()
        >>> mp.rebase(model, opt)
        1
        >>> bool(torch.allclose(model[0].weight, before, atol=1e-6))
        True
        >>> float(model[0].parametrizations.weight.original.abs().max())
        0.0
    """
    rebased: list[Tensor] = []
    for module in model.modules():
        parametrizations = getattr(module, "parametrizations", None)
        if not isinstance(parametrizations, nn.ModuleDict):
            continue
        for plist in parametrizations.values():
            p = plist[0] if len(plist) == 1 else None
            if not (isinstance(p, Parametrization) and p.has_base_point):
                continue
            original = plist.original
            w = p.compute(original)  # gathered on every rank if the coordinates are sharded
            with autocast_off(w):
                w = w.to(compute_dtype(w.dtype))
                x = p.inverse(p.project(w))
                # sharded coordinates (fully_shard): each rank keeps its own piece of the new
                # ones, which every rank computed alike from the same gathered weight
                original.copy_(shard_like(x, original) if dtensor_of(original) is not None else x)
            rebased.append(original)
    if optimizer is not None:
        for original in rebased:
            optimizer.state.pop(original, None)
    return len(rebased)
