r"""The νPI controller for Lagrange multipliers: gradient ascent plus a proportional term.

Plain gradient ascent on the multipliers (mdmm's, ``dual="gda"``) is an *integral*
controller: :math:`\lambda` integrates the violation, so it keeps growing while the primal
optimizer is still on its way to the constraint and overshoots once it gets there; the
violation then rings around zero for thousands of steps. The νPI controller (Sohrabi et al.,
ICML 2024) adds a proportional term on the change of the (smoothed) violation:

.. math::

    e_t = \partial\mathcal{L}/\partial\lambda, \qquad
    \xi_t = \nu\,\xi_{t-1} + (1-\nu)\,e_t, \qquad
    \lambda_{t+1} = \lambda_t + \eta\,e_t + k_p\,(\xi_t - \xi_{t-1}),

with :math:`\xi_{-1} = e_0` (the first step is plain ascent, no kick). ``η`` is the group's
``lr``; ``kp`` is the paper's :math:`\eta K_P` (it does not move when ``η`` is scheduled or
swept). The error :math:`e` is the multiplier's gradient, ``scale·c`` for an equality
(``c = value - fn``) and, for the slack-free inequalities, ``scale·(min(λ + d c, 0) - λ)/d``,
which is continuous where the constraint turns inactive and pulls λ back to 0 there, so no
projection is needed. Summed, :math:`\lambda_t = \lambda_0 + \eta\sum_{j<t} e_j +
k_p(\xi_{t-1} - \xi_{-1})`: the integral of the violation *plus* ``kp`` times its current
value, a penalty that acts at once and fades as the constraint is met.

Defaults (the derivation in ``docs/soft-controller.md``): linearised near a solution, with
``a`` the change of the violation per unit of multiplier in one primal step (``lr·scale·|∇fn|²``
for SGD, divided by ``1 - β`` under heavy-ball momentum) and ``h`` the loss's curvature across
the constraint, the loop's roots :math:`z = 1 + \varepsilon` obey

.. math::

    \varepsilon^2 + a\,(h/\mathrm{scale} + d + \mathrm{scale}\,k_p)\,\varepsilon
        + a\,\mathrm{scale}\,\eta = 0 :

``kp`` adds to the damping ``d`` exactly as the augmented Lagrangian's penalty does, through the
multiplier (it does not stiffen the primal Hessian and fades with the violation). Critical
damping (the fastest decay) is :math:`k_p = 2\sqrt{\eta/a}`; the discrete loop is stable only
while :math:`a\,k_p < 1` (the proportional term acts on a difference of errors, one step
late), a band that heavy-ball momentum shrinks (``β = 0.9``: :math:`a k_p < 0.09`). :data:`KP`
``= 3`` is the critical gain at :math:`\eta = 2.25\,a` (the analytic SGD problem of the
docs: :math:`\eta/a = 2`, critical 2.8); with ``a`` known (one step with λ perturbed
measures it), use :math:`2\sqrt{\eta/a}`. ``nu = 0``: smoothing delays the proportional term by
:math:`\nu/(1-\nu)` steps (phase margin); raise it only for constraints on minibatches, whose
noise the proportional term passes on multiplied by ``kp``.

The controller is a *dual update rule* of a parameter group: :meth:`MDMM.make_optimizer
<manifoldparam.soft.MDMM.make_optimizer>` with ``dual="pi"`` marks the multipliers' group
(``"dual": "pi"``, ``"kp"``, ``"nu"``), and before every step of that optimizer
:func:`pi_step` updates them from their gradients and clears those, so the optimizer's own rule
skips them (every ``torch.optim`` optimizer skips a parameter without a gradient). Its state,
``ξ`` per multiplier, is in ``optimizer.state``: it is saved with ``optimizer.state_dict()``,
so resuming is bit-exact; its step ``η`` is the group's ``lr``, which a scheduler may move
(or ``dual_lr=`` pins).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["KP", "NU", "STATE_KEY", "pi_options", "pi_step"]

#: The proportional gain (the multiplier's change per unit change of the error): critical
#: damping 2·sqrt(η/a) at η = 2.25·a (module docstring, docs/soft-controller.md).
KP = 3.0
#: The smoothing of the error in the proportional term (0: none; full-batch constraints).
NU = 0.0
#: The per-multiplier state entry: the smoothed error ξ of the last step.
STATE_KEY = "pi_xi"
DUAL_RULES = ("gda", "pi")


def pi_options(kp: float | None, nu: float | None) -> dict[str, Any]:
    """The group entries of a νPI multiplier group, checked: ``{"dual": "pi", "kp", "nu"}``.

    Raises:
        ValueError: ``kp`` negative or not finite, or ``nu`` outside ``[0, 1)``.
    """
    kp = KP if kp is None else float(kp)
    nu = NU if nu is None else float(nu)
    if not math.isfinite(kp) or kp < 0:
        raise ValueError(
            f"make_optimizer(dual='pi', kp={kp}): the proportional gain must be a finite number "
            f">= 0 (0 is plain gradient ascent); the default is {KP:g}."
        )
    if not 0 <= nu < 1:
        raise ValueError(
            f"make_optimizer(dual='pi', nu={nu}): the smoothing must be in [0, 1) (0: none; "
            "0.9 averages the error over about 10 steps, for constraints on minibatches)."
        )
    return {"dual": "pi", "kp": kp, "nu": nu}


@torch.no_grad()
def pi_step(group: Mapping[str, Any], state: Mapping[Tensor, dict[str, Any]]) -> None:
    """One νPI step on every multiplier of ``group`` that has a gradient; clears the gradient.

    Args:
        group: a parameter group with ``"params"``, ``"lr"`` (η), ``"kp"`` and ``"nu"``.
        state: the optimizer's per-parameter state (``optimizer.state``); the entry
            :data:`STATE_KEY` holds ξ, created at the first step.

    The error is the gradient of the Lagrangian with respect to the multiplier (the
    multipliers ascend). ``lr`` may be a tensor (``Adam(..., lr=torch.tensor(...))``).
    """
    lr, kp, nu = group["lr"], group["kp"], group["nu"]
    for lam in group["params"]:
        e = lam.grad
        if e is None:
            continue
        if e.is_sparse:
            raise ValueError(
                "dual='pi': a multiplier has a sparse gradient; the νPI rule needs a dense one."
            )
        entry = state[lam]  # (a defaultdict in torch.optim)
        prev = entry.get(STATE_KEY)
        if prev is None:  # ξ_{-1} = e_0: the first step is plain ascent
            prev = e.detach().clone()
        xi = torch.lerp(e, prev, nu) if nu else e.detach().clone()  # ν·ξ_{t-1} + (1-ν)·e_t
        lam.add_(lr * e + kp * (xi - prev))
        entry[STATE_KEY] = xi
        # A step count as torch.optim keeps it: the optimizers' __setstate__ (on loading a
        # state dict) read "step" from every non-empty per-parameter state.
        entry["step"] = entry.get("step", torch.tensor(0.0, dtype=torch.float32)) + 1
        lam.grad = None
