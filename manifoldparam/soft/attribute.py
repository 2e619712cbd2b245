"""Soft constraints declared on a module attribute.

A soft constraint on ``module.<name>`` calls its function with the attribute's *current*
value -- the parametrized one when a hard constraint parametrizes the same attribute -- so
no lambda (late binding, unpicklable) is needed::

    import manifoldparam as mp
    from manifoldparam.soft import constrain, mean_abs, rms, soft_constraints

    for layer in (model.fc1, model.fc2):
        constrain(layer, "weight", mean_abs, eq=1.0, damping=10)    # mean|W| == 1
        constrain(layer, "weight", rms, max=1.1, damping=10)        # ‖W‖_F/√n <= 1.1
    mp.orthogonal(model.fc3, "weight")                              # a hard constraint
    mdmm = MDMM(soft_constraints(model))

A function returning a vector gives one multiplier per element (``row_norms`` below).
The declarations live on the module (``module._mp_soft``), so they pickle and deep-copy with
it; the multipliers live in the constraints, whose ``MDMM.state_dict()`` saves them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from manifoldparam._device import value_readable
from manifoldparam.hard.base import owner_name
from manifoldparam.soft.constraints import Constraint
from manifoldparam.soft.kinds import (
    BoundConstraintHard,
    EqConstraint,
    MaxConstraint,
    MaxConstraintHard,
    MinConstraint,
    MinConstraintHard,
)

__all__ = [
    "constrain",
    "mean_abs",
    "rms",
    "row_norms",
    "soft_constraints",
]

_REGISTRY = "_mp_soft"


# ------------------------------------------------------------------ picklable functions
def mean_abs(w: Tensor) -> Tensor:
    """``mean(|w|)`` (mdmm's MNIST demo constrains it to 1 per layer)."""
    return w.abs().mean()


def rms(w: Tensor) -> Tensor:
    """``‖w‖_F / √numel(w)``: the Frobenius norm, independent of the size."""
    return torch.linalg.vector_norm(w) / math.sqrt(max(w.numel(), 1))


def row_norms(w: Tensor) -> Tensor:
    """The Euclidean norm of each row (vector-valued: one multiplier per output unit)."""
    return torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1)


# ------------------------------------------------------------------ declaration
def constrain(
    module: nn.Module,
    name: str,
    fn: Callable[[Tensor], Tensor],
    *,
    eq: float | Tensor | None = None,
    min: float | Tensor | None = None,
    max: float | Tensor | None = None,
    clamp: bool = False,
    scale: float = 1.0,
    damping: float = 1.0,
) -> Constraint:
    """Declare the soft constraint ``fn(module.<name>) == eq`` (or ``<= max``, ``>= min``).

    Returns the constraint (an :class:`EqConstraint`, :class:`MaxConstraint`,
    :class:`MinConstraint`, or with ``clamp=True`` the clamp-based kinds mdmm calls
    ``...Hard``; both ``min`` and ``max`` need ``clamp=True``: :class:`BoundConstraintHard`).
    Its multipliers have ``fn``'s output shape and the attribute's dtype and device (declare after
    ``model.to(device)``, or move the constraints with ``mdmm.to(device)``). Collect the
    declarations of a model with :func:`soft_constraints`. ``fn`` should be a named function
    (or ``functools.partial``) so the model pickles.
    """
    owner = owner_name(module, name)
    value = getattr(module, name, None)
    if not isinstance(value, Tensor):
        have = [n for n, _ in module.named_parameters(recurse=False)]
        raise AttributeError(
            f"constrain({owner}): {owner.rsplit('.', 1)[0]} has no tensor attribute {name!r} "
            f"(its parameters: {have}); pass the attribute's name, e.g. 'weight'."
        )
    given = {k: v for k, v in (("eq", eq), ("min", min), ("max", max)) if v is not None}
    if not given or ("eq" in given and len(given) > 1):
        raise ValueError(
            f"constrain({owner}, {getattr(fn, '__name__', 'fn')}): give exactly one of eq=, "
            f"or min= and/or max= (got {sorted(given) or 'none'})."
        )
    if "min" in given and "max" in given and not clamp:
        raise ValueError(
            f"constrain({owner}): min= and max= together need clamp=True "
            "(BoundConstraintHard); or declare the two sides separately, each slack-free."
        )
    with torch.no_grad():
        probe = fn(value.detach())
    if not isinstance(probe, Tensor):
        raise TypeError(f"constrain({owner}): fn returned {type(probe).__name__}, not a tensor.")
    if value_readable(probe) and not bool(torch.isfinite(probe).all()):  # (not meta/fake)
        raise ValueError(
            f"constrain({owner}): fn({owner}) = {probe} is not finite; fix fn or the weight."
        )
    kw = {"scale": scale, "damping": damping, "shape": probe.shape, "dtype": value.dtype}
    c: Constraint
    try:
        if eq is not None:
            c = EqConstraint(fn, eq, **kw)
        elif min is not None and max is not None:
            c = BoundConstraintHard(fn, min, max, **kw)
        elif max is not None:
            c = (MaxConstraintHard if clamp else MaxConstraint)(fn, max, **kw)
        else:
            assert min is not None
            c = (MinConstraintHard if clamp else MinConstraint)(fn, min, **kw)
    except ValueError as err:  # a NaN bound, a bad scale/damping: say which attribute
        raise ValueError(f"constrain({owner}): {err}") from None
    c.to(value.device)  # multipliers and bounds beside the attribute
    c.target = (module, name)
    c.owner = owner
    module.__dict__.setdefault(_REGISTRY, {}).setdefault(name, []).append(c)
    return c


def declared(module: nn.Module) -> Iterator[tuple[str, Constraint]]:
    for name, cs in module.__dict__.get(_REGISTRY, {}).items():
        for c in cs:
            yield name, c


def soft_constraints(model: nn.Module) -> list[Constraint]:
    """Every soft constraint declared with :func:`constrain` on ``model`` or its submodules.

    In ``model.named_modules()`` order, so ``MDMM(soft_constraints(model))`` has the same
    ``state_dict`` keys for the same model.
    """
    return [c for _, m in model.named_modules() for _, c in declared(m)]
