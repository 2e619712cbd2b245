"""Soft constraints declared on a module attribute, and the model-level constraint report.

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
    print(constraint_report(model))            # every constraint, hard and soft

A function returning a vector gives one multiplier per element (``row_norms`` below).
The declarations live on the module (``module._mp_soft``), so they pickle and deep-copy with
it; the multipliers live in the constraints, whose ``MDMM.state_dict()`` saves them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from manifoldparam._device import value_readable
from manifoldparam.hard.base import owner_name
from manifoldparam.soft.constraints import (
    BoundConstraintHard,
    Constraint,
    EqConstraint,
    MaxConstraint,
    MaxConstraintHard,
    MinConstraint,
    MinConstraintHard,
)
from manifoldparam.soft.infeasible import infeasible_note

__all__ = [
    "ConstraintReport",
    "ReportRow",
    "constrain",
    "constraint_report",
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
    hard: bool = False,
    scale: float = 1.0,
    damping: float = 1.0,
) -> Constraint:
    """Declare the soft constraint ``fn(module.<name>) == eq`` (or ``<= max``, ``>= min``).

    Returns the constraint (an :class:`EqConstraint`, :class:`MaxConstraint`,
    :class:`MinConstraint`, or with ``hard=True`` the clamp-based ``...Hard`` kinds; both
    ``min`` and ``max`` need ``hard=True``: :class:`BoundConstraintHard`). Its multipliers have
    ``fn``'s output shape and the attribute's dtype and device (declare after
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
    if "min" in given and "max" in given and not hard:
        raise ValueError(
            f"constrain({owner}): min= and max= together need hard=True "
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
            c = (MaxConstraintHard if hard else MaxConstraint)(fn, max, **kw)
        else:
            assert min is not None
            c = (MinConstraintHard if hard else MinConstraint)(fn, min, **kw)
    except ValueError as err:  # a NaN bound, a bad scale/damping: say which attribute
        raise ValueError(f"constrain({owner}): {err}") from None
    c.to(value.device)  # multipliers and bounds beside the attribute
    c.target = (module, name)
    c.owner = owner
    module.__dict__.setdefault(_REGISTRY, {}).setdefault(name, []).append(c)
    return c


def _declared(module: nn.Module) -> Iterator[tuple[str, Constraint]]:
    for name, cs in module.__dict__.get(_REGISTRY, {}).items():
        for c in cs:
            yield name, c


def soft_constraints(model: nn.Module) -> list[Constraint]:
    """Every soft constraint declared with :func:`constrain` on ``model`` or its submodules.

    In ``model.named_modules()`` order, so ``MDMM(soft_constraints(model))`` has the same
    ``state_dict`` keys for the same model.
    """
    return [c for _, m in model.named_modules() for _, c in _declared(m)]


# ------------------------------------------------------------------ the report
@dataclass(frozen=True)
class ReportRow:
    """One constraint: the attribute it is on, "hard"/"soft", what it says, its violation, and
    a ``note`` when something is wrong beyond the violation ("" otherwise): a NaN/Inf in the
    tensors behind it (named), or multipliers that grow while the violation does not fall
    (:class:`~manifoldparam.soft.InfeasibleWarning`). A row that could not be evaluated has
    violation ``nan``."""

    attribute: str
    kind: str
    constraint: str
    violation: float
    note: str = ""


@dataclass(frozen=True)
class ConstraintReport:
    """Every constraint of a model with its current violation; ``print`` it for a table."""

    rows: tuple[ReportRow, ...]

    def __iter__(self) -> Iterator[ReportRow]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def worst(self) -> float:
        """The largest violation (0 when there are no constraints; ``nan`` if any row's is)."""
        if any(math.isnan(r.violation) for r in self.rows):
            return math.nan
        return max((r.violation for r in self.rows), default=0.0)

    @property
    def problems(self) -> tuple[ReportRow, ...]:
        """The rows with a note (non-finite tensors, infeasible-looking constraints)."""
        return tuple(r for r in self.rows if r.note)

    def __str__(self) -> str:
        head = ["attribute", "kind", "constraint", "violation"]
        body = [[r.attribute, r.kind, r.constraint, f"{r.violation:.3e}"] for r in self.rows]
        if self.problems:  # the column only when something is wrong
            head.append("note")
            for row, r in zip(body, self.rows, strict=True):
                row.append(r.note)
        k = len(head)
        widths = [max(len(x[i]) for x in [head, *body]) for i in range(k)]
        lines = ["  ".join(x[i].ljust(widths[i]) for i in range(k)).rstrip() for x in [head]]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(x[i].ljust(widths[i]) for i in range(k)).rstrip() for x in body]
        return "\n".join(lines)


def _nonfinite(named: Iterable[tuple[str, Tensor]]) -> str:
    """``"NaN/Inf in parametrizations.weight.original (3 of 16), base (1 of 9)"`` or ""."""
    bad = []
    for name, t in named:
        if isinstance(t, Tensor) and t.is_floating_point() and value_readable(t):
            n = int((~torch.isfinite(t.detach())).sum())
            if n:
                bad.append(f"{name} ({n} of {t.numel()})")
    return f"NaN/Inf in {', '.join(bad)}" if bad else ""


def _hard_rows(path: str, module: nn.Module) -> Iterator[ReportRow]:
    try:
        from manifoldparam.hard.base import Parametrization
    except ImportError:  # pragma: no cover - the hard package ships with this one
        return
    if not parametrize.is_parametrized(module):
        return
    for name, plist in module.parametrizations.items():
        coords = [
            (f"parametrizations.{name}.{n}", t)
            for n, t in plist.named_parameters(recurse=False)
            if n.startswith("original")
        ]
        for p in plist:
            if isinstance(p, Parametrization):
                desc = f"{type(p).__name__}({p.extra_repr()})"
                # The tensors behind the value first: a NaN there makes the value (or, where
                # the map checks it, reading the attribute) fail, and the row says which.
                buffers = [(f"buffer {n}", b) for n, b in p.named_buffers(recurse=False)]
                note = _nonfinite([*coords, *buffers])
                try:
                    with torch.no_grad():
                        w = getattr(module, name)
                except FloatingPointError as err:  # the map refuses a NaN/Inf value
                    note = note or _first_sentence(err)
                    yield ReportRow(f"{path}{name}", "hard", desc, math.nan, note)
                    continue
                value_note = _nonfinite([(name, w)])
                if value_note:
                    note = f"{note}; {value_note}" if note else value_note
                    yield ReportRow(f"{path}{name}", "hard", desc, math.nan, note)
                    continue
                v = float(p.distance(w))
                yield ReportRow(f"{path}{name}", "hard", desc, v, note)


@torch.no_grad()
def constraint_report(
    model: nn.Module, extra: list[Constraint] | tuple[Constraint, ...] = ()
) -> ConstraintReport:
    """Every constraint on every attribute of ``model``, hard and soft, with its violation.

    Hard constraints are the :class:`manifoldparam.hard.base.Parametrization` entries of
    ``module.parametrizations``; their violation is ``p.distance(module.<name>)`` (0 up to
    rounding). Soft ones are those declared with :func:`constrain` (plus ``extra``, e.g. the
    function-based constraints of an ``MDMM``); their violation is ``max |projection(fn) -
    fn|``. This syncs with the host: call it for logging, not inside the step.

    Example::

        print(constraint_report(model, extra=list(mdmm)))
    """
    rows: list[ReportRow] = []
    seen: set[int] = set()
    for path, m in model.named_modules():
        prefix = f"{path}." if path else ""
        rows.extend(_hard_rows(prefix, m))
        for name, c in _declared(m):
            seen.add(id(c))
            rows.append(_soft_row(f"{prefix}{name}", c))
    for c in extra:
        if id(c) not in seen:
            rows.append(_soft_row(c.owner or "(fn)", c))
    return ConstraintReport(tuple(rows))


def _first_sentence(err: Exception) -> str:
    text = str(err)
    return text.split(". ", 1)[0]


def _soft_row(attribute: str, c: Constraint) -> ReportRow:
    desc = c.describe().replace(f"({c.owner})", "") if c.owner else c.describe()
    notes = [_nonfinite([("multiplier", c.lmbda)])]
    try:
        if c.target is not None:  # name the attribute when it is the non-finite one
            module, name = c.target
            notes.append(_nonfinite([(attribute, getattr(module, name))]))
        fn_value = c.evaluate()
    except FloatingPointError as err:  # a hard constraint under it refused a NaN/Inf value
        notes.append(_first_sentence(err))
        return ReportRow(attribute, "soft", desc, math.nan, "; ".join(filter(None, notes)))
    if not any(notes):
        notes.append(_nonfinite([("fn's value", fn_value)]))
    notes.append(infeasible_note(c))
    v = float(c.violation(fn_value).abs().amax())
    return ReportRow(attribute, "soft", desc, v, "; ".join(filter(None, notes)))
