r"""Detecting a constraint set that cannot be met: multipliers that grow while nothing improves.

When no point satisfies the constraints together (``x <= 0`` and ``x >= 1``; ``x² <= -1``),
the ascent on the multipliers never stops: each step adds about ``lr·c`` to ``λ`` while the
primal settles where the constraints' forces cancel, so ``|λ|`` grows without bound and the
violation stays where it is. Nothing fails, nothing is reported. This module watches for that
pattern on periodic snapshots of each constraint's multipliers and true violation and warns
once (:class:`InfeasibleWarning`), naming the constraints involved.

An element of a constraint *triggers* when, over the last :data:`WINDOWS` windows (snapshots
``0..K``):

* its true violation (``projection(fn) - fn``) is nonzero with the same sign at every
  snapshot (a feasible run crosses zero or reaches it);
* it does not fall: ``|v_j| >= FALL·|v_0|`` for every snapshot ``j``;
* its multiplier grows steadily: ``|λ_j| > |λ_{j-1}|`` at every snapshot, and
  ``|λ_K| >= GROWTH·|λ_0|`` (a multiplier creeping at a converged point, an inexact solve's
  drift, is not growth).

The warning names every constraint with an element that meets the first and last condition
(its multiplier climbs against a violation of constant sign): the partners of a conflicting
pair are named together even when one of their violations still shifts. The comparison runs on
the device; its result is read on the host once per window, not per step.

A feasible problem that its optimizer approaches more slowly than ``1 - FALL`` of the
violation per :data:`WINDOWS` windows (an lr far too small for the distance) shows the same
pattern, and the message says so. A set that becomes infeasible late, once the multipliers
are already large, is seen only when they grow by ``GROWTH`` within the windows.

A *stall* is the same flat violation of constant sign without the growing multipliers: the
multipliers stopped (a dual lr scheduled to nearly 0, a controller whose proportional and
integral terms cancel, an optimizer whose steps no longer reach the constraint) while the
constraint is still violated. It is flagged (:class:`StalledWarning`, and the note
``stalled? ...``) when the violation also stays above ``eps^(1/3)·max(1, |bound|)`` of the
multipliers' dtype (float32: 4.9e-3, float64: 6.1e-6): below that a flat violation cannot be
told apart from a converged run's rounding and step noise.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Sequence

import torch
from torch import Tensor

from manifoldparam.soft.constraints import Constraint

__all__ = ["FALL", "GROWTH", "WINDOWS", "InfeasibleWarning", "StalledWarning"]

#: Windows (snapshot intervals) the pattern must hold for before the warning.
WINDOWS = 5
#: The violation "does not fall" while it stays above this fraction of its first value.
FALL = 0.9
#: The multipliers "grow" when ``|λ|`` rises at every snapshot and by this factor in all.
GROWTH = 1.1


class InfeasibleWarning(UserWarning):
    """The constraints look infeasible together: their multipliers grow steadily while the
    violation does not fall. Shown once per constraint; the message names the constraints,
    the numbers seen and what to check."""


class StalledWarning(InfeasibleWarning):
    """A constraint's violation stopped falling while it is still violated, and its
    multipliers do not grow either (see the module docstring). A subclass of
    :class:`InfeasibleWarning`: one filter (or ``MDMM(check_infeasible=0)``) covers both."""


def _stall_floor(v: Tensor, fn_scale: Tensor) -> Tensor:
    """The smallest violation a stall is reported at: ``eps^(1/3)·max(1, |bound|)``."""
    eps = torch.finfo(v.dtype if v.is_floating_point() else torch.float32).eps
    return eps ** (1 / 3) * fn_scale.clamp_min(1)


def _history(c: Constraint, source: str) -> deque[tuple[Tensor, Tensor]]:
    book = c.__dict__.setdefault("_mp_watch", {})
    return book.setdefault(source, deque(maxlen=WINDOWS + 1))


def infeasible_note(c: Constraint) -> str:
    """What the last check found for ``c`` ("" when nothing), for :func:`constraint_report`."""
    return c.__dict__.get("_mp_infeasible", "")


def observe(
    constraints: Sequence[Constraint],
    infs: Sequence[Tensor],
    *,
    source: str,
    steps: int,
    stacklevel: int = 3,
) -> None:
    """Record one snapshot of each constraint's ``|λ|`` and true violation ``infs``; once
    :data:`WINDOWS` windows are recorded, check for the infeasible pattern (one host read) and
    warn for constraints not warned about before.

    ``source`` keeps separate histories per caller (``"forward"``: every ``steps`` calls of
    ``MDMM``; ``"dual"``: every ``dual_update``); ``steps`` is only used in the message.
    """
    histories = []
    for c, v in zip(constraints, infs, strict=True):
        h = _history(c, source)
        lam = c.lmbda.detach().abs().clone()  # (the optimizer updates λ in place)
        v = v.detach()
        c.__dict__["_mp_scale"] = _fn_scale(c, v)
        if h and (h[-1][0].shape != lam.shape or h[-1][0].device != lam.device):
            h.clear()  # moved or reshaped (mdmm.to(...)): start again
        h.append((lam, v))
        histories.append(h)
    if not histories or any(len(h) <= WINDOWS for h in histories):
        return
    trig, involved, stalls, first, last = [], [], [], [], []
    for c, h in zip(constraints, histories, strict=True):
        lam = torch.stack([s[0] for s in h])
        v = torch.stack([s[1] for s in h])
        sign = torch.sign(v)
        same = (sign == sign[0]).all(0) & (sign[0] != 0)
        grows = (lam[1:] > lam[:-1]).all(0) & (lam[-1] >= GROWTH * lam[0])
        flat = (v.abs() >= FALL * v[0].abs()).all(0)
        trig.append((same & grows & flat).any())
        involved.append((same & grows).any())
        high = v.abs().amin(0) > _stall_floor(v, c.__dict__["_mp_scale"])
        stalls.append((same & flat & high & ~grows).any())
        first.append(torch.stack([lam[0].amax(), v[0].abs().amax()]))
        last.append(torch.stack([lam[-1].amax(), v[-1].abs().amax()]))
    # the host read
    flags = torch.stack([torch.stack(trig), torch.stack(involved), torch.stack(stalls)]).tolist()
    if not any(flags[0]):
        for c in constraints:
            c.__dict__.pop("_mp_infeasible", None)
        if any(flags[2]):
            _stalled(constraints, flags[2], first, last, source, steps, stacklevel + 1)
        return
    named = [i for i, f in enumerate(flags[1]) if f]
    span = WINDOWS * steps
    note = f"infeasible? |λ| grew, violation flat over {span} {'steps' if steps > 1 else 'calls'}"
    for i, c in enumerate(constraints):
        if i in named:
            c.__dict__["_mp_infeasible"] = note
        else:
            c.__dict__.pop("_mp_infeasible", None)
    fresh = [i for i in named if not constraints[i].__dict__.get("_mp_infeasible_warned")]
    if not fresh:
        return
    for i in named:
        constraints[i].__dict__["_mp_infeasible_warned"] = True
    rows = []
    for i in named:
        (l0, v0), (l1, v1) = first[i].tolist(), last[i].tolist()
        rows.append(
            f"  {constraints[i].describe()}: max|λ| {l0:.3g} -> {l1:.3g}, "
            f"violation {v0:.3g} -> {v1:.3g}"
        )
    unit = "optimizer steps" if source == "forward" else "dual_update calls"
    warnings.warn(
        "The soft constraints look infeasible together: over the last "
        f"{span} {unit} their multipliers grew steadily while the violation did not fall:\n"
        + "\n".join(rows)
        + "\nNo point may satisfy them all (e.g. x <= 0 and x >= 1 on one value, or a bound "
        "fn cannot reach): check the bounds and what each fn can take. If they can hold "
        "together, the parameters move too slowly to reach them (a learning rate far too small "
        "for this distance). Left alone, the multipliers grow without bound. "
        "(MDMM(check_infeasible=0) turns this check off.)",
        InfeasibleWarning,
        stacklevel=stacklevel,
    )


def _fn_scale(c: Constraint, v: Tensor) -> Tensor:
    """``|fn|`` where the violation is measured, elementwise: the bound's size (the violation
    is ``projection(fn) - fn``, so ``|fn|`` is about the bound's where it is small)."""
    bounds = [getattr(c, b).detach().abs() for b in c.bounds]
    if not bounds:
        return torch.ones_like(v)
    out = bounds[0]
    for b in bounds[1:]:
        out = torch.maximum(out, b)
    return out.to(v.dtype).expand_as(v) if out.dim() <= v.dim() else out


def _stalled(
    constraints: Sequence[Constraint],
    flags: list[bool],
    first: list[Tensor],
    last: list[Tensor],
    source: str,
    steps: int,
    stacklevel: int,
) -> None:
    """Note and (once per constraint) warn about the stalled constraints ``flags`` marks."""
    span = WINDOWS * steps
    unit = "optimizer steps" if source == "forward" else "dual_update calls"
    named = [i for i, f in enumerate(flags) if f]
    for i, c in enumerate(constraints):
        if i in named:
            v = last[i][1].item()
            c.__dict__["_mp_infeasible"] = f"stalled? violation flat at {v:.3g} over {span} {unit}"
    fresh = [i for i in named if not constraints[i].__dict__.get("_mp_stalled_warned")]
    if not fresh:
        return
    rows = []
    for i in fresh:
        constraints[i].__dict__["_mp_stalled_warned"] = True
        (l0, v0), (l1, v1) = first[i].tolist(), last[i].tolist()
        rows.append(
            f"  {constraints[i].describe()}: violation {v0:.3g} -> {v1:.3g}, "
            f"max|λ| {l0:.3g} -> {l1:.3g}"
        )
    warnings.warn(
        f"Soft constraints stalled: over the last {span} {unit} their violation stopped "
        "falling while still violated, and their multipliers are not growing either:\n"
        + "\n".join(rows)
        + "\nThe multipliers no longer push the parameters to the constraint: check the "
        "multipliers' lr (a schedule that took it to ~0, or dual_lr far too small), the "
        "damping, and whether the optimizer's steps can still move fn (a frozen or clipped "
        "parameter). (MDMM(check_infeasible=0) turns this check off.)",
        StalledWarning,
        stacklevel=stacklevel,
    )
