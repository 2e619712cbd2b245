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
    r"""The mean absolute entry, :math:`\frac{1}{n}\sum_i |w_i|` (mdmm's MNIST demo
    constrains it to 1 per layer).

    Args:
        w: any tensor.

    Returns:
        A 0-dim tensor.

    Example:
        >>> mp.soft.mean_abs(torch.tensor([[1.0, -3.0]]))
        tensor(2.)
    """
    return w.abs().mean()


def rms(w: Tensor) -> Tensor:
    r"""The root mean square entry, :math:`\|w\|_F / \sqrt{n}`: a norm budget that does not
    grow with the size.

    Args:
        w: any tensor (``n`` entries).

    Returns:
        A 0-dim tensor (0 for an empty ``w``).

    Example:
        >>> mp.soft.rms(torch.tensor([3.0, -4.0, 0.0, 0.0]))
        tensor(2.5000)
    """
    return torch.linalg.vector_norm(w) / math.sqrt(max(w.numel(), 1))


def row_norms(w: Tensor) -> Tensor:
    r"""The Euclidean norm of each row, :math:`r_i = \|w_{i,:}\|_2`: vector-valued, so a
    constraint on it has one multiplier per output unit.

    Args:
        w: a tensor with at least one dim; dims after the first are flattened (a conv kernel's
            rows are its output channels).

    Returns:
        A tensor of shape ``(w.shape[0],)``.

    Example:
        >>> mp.soft.row_norms(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
        tensor([5., 1.])
    """
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
    r"""Declare the soft constraint ``fn(module.<name>) == eq`` (or ``<= max``, ``>= min``).

    The constraint adds :math:`s\,\psi(c, \lambda)` to the Lagrangian that
    :class:`~manifoldparam.MDMM` builds, with :math:`c = \mathrm{eq} - \mathrm{fn}(W)` (or
    :math:`\max - \mathrm{fn}(W) \ge 0`, :math:`\mathrm{fn}(W) - \min \ge 0`) and one
    multiplier :math:`\lambda` per element of ``fn``'s value; ``fn`` receives the attribute's
    current value, the constrained one when a hard constraint parametrizes the same attribute.
    The declaration lives on the module (it pickles and deep-copies with it); collect a
    model's with :func:`soft_constraints`.

    Args:
        module: the module that holds the attribute.
        name: the attribute (any tensor attribute: a parameter, a buffer, a parametrized
            weight).
        fn: a differentiable function of the attribute's value returning a tensor; a named
            function or ``functools.partial`` (not a lambda) so the model pickles.
        eq: the value ``fn`` must equal (a number or a tensor of ``fn``'s shape).
        min: the lower bound of ``fn``.
        max: the upper bound of ``fn``; both ``min`` and ``max`` need ``clamp=True``.
        clamp: use mdmm's clamp-based kinds (``MaxConstraintHard``, ``MinConstraintHard``,
            ``BoundConstraintHard``) instead of the slack-free inequalities.
        scale: multiplies the constraint's Lagrangian term.
        damping: the quadratic damping :math:`d` (see :class:`~manifoldparam.Constraint`).

    Returns:
        The constraint: an :class:`EqConstraint`, :class:`MaxConstraint`,
        :class:`MinConstraint`, or with ``clamp=True`` a clamp-based kind. Its multipliers
        have ``fn``'s output shape and the attribute's dtype and device (declare after
        ``model.to(device)``, or move them with ``mdmm.to(device)``).

    Raises:
        AttributeError: ``module`` has no tensor attribute ``name``.
        ValueError: not exactly one of ``eq`` or ``min``/``max``; ``min`` and ``max`` without
            ``clamp=True``; ``fn``'s value is not finite; a NaN bound or a bad
            ``scale``/``damping``.
        TypeError: ``fn`` does not return a tensor.

    Example:
        >>> layer = nn.Linear(4, 2)
        >>> c = mp.constrain(layer, "weight", mp.soft.row_norms, max=1.0, damping=10)
        >>> c
        MaxConstraint(row_norms(Linear.weight) <= 1, scale=1, damping=10, shape=(2,))
        >>> c.lmbda.shape                          # one multiplier per row
        torch.Size([2])
        >>> mp.soft.soft_constraints(layer) == [c]
        True
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

    Args:
        model: the model to collect from.

    Returns:
        The constraints in ``model.named_modules()`` order, so
        ``MDMM(soft_constraints(model))`` has the same ``state_dict`` keys for the same model.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
        >>> for layer in model:
        ...     _ = mp.constrain(layer, "weight", mp.soft.mean_abs, eq=0.5)
        >>> mdmm = mp.MDMM(mp.soft.soft_constraints(model))
        >>> len(mdmm)
        2
    """
    return [c for _, m in model.named_modules() for _, c in declared(m)]
