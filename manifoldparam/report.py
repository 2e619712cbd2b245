"""Every constraint of a model, hard and soft, in one table: :func:`constraint_report`.

The report reads what the other layers declare: the hard constraints registered on each
attribute (:mod:`manifoldparam.hard`) and the soft ones declared with
:func:`~manifoldparam.constrain` (:mod:`manifoldparam.soft`), each with its current violation
and a note when a tensor behind it holds NaN/Inf or its multipliers grow while the violation
does not fall::

    print(manifoldparam.constraint_report(model, extra=list(mdmm)))
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from manifoldparam._device import value_readable
from manifoldparam.hard.base import Parametrization
from manifoldparam.soft.attribute import declared
from manifoldparam.soft.constraints import Constraint
from manifoldparam.soft.infeasible import infeasible_note

__all__ = ["ConstraintReport", "ReportRow", "constraint_report"]


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
    r"""Every constraint on every attribute of ``model``, hard and soft, with its violation.

    Hard constraints are the :class:`manifoldparam.Parametrization` entries of
    ``module.parametrizations``; their violation is :math:`d(W, M)` = ``p.distance(W)``
    (0 up to rounding). Soft ones are those declared with
    :func:`~manifoldparam.soft.constrain` (plus ``extra``, e.g. the function-based constraints
    of an ``MDMM``); their violation is :math:`\max |\Pi(\mathrm{fn}) - \mathrm{fn}|`, the
    distance of ``fn``'s value to its feasible set. This syncs with the host: call it for
    logging, not inside the step.

    Args:
        model: the model to inspect (every submodule).
        extra: constraints not declared on an attribute (mdmm-style closures) to include.

    Returns:
        A :class:`ConstraintReport`: ``print`` it for a table; its rows are
        :class:`ReportRow` (attribute, kind, constraint, violation).

    Example:
        >>> model = nn.Sequential(mp.orthogonal(nn.Linear(3, 3)), nn.Linear(3, 1))
        >>> c = mp.constrain(model[1], "weight", mp.soft.rms, max=1.0, damping=10)
        >>> report = mp.constraint_report(model)
        >>> [(row.attribute, row.kind) for row in report.rows]
        [('0.weight', 'hard'), ('1.weight', 'soft')]
    """
    rows: list[ReportRow] = []
    seen: set[int] = set()
    for path, m in model.named_modules():
        prefix = f"{path}." if path else ""
        rows.extend(_hard_rows(prefix, m))
        for name, c in declared(m):
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
