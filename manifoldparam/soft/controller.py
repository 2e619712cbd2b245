r"""The νPI controller for Lagrange multipliers: gradient ascent plus a proportional term.

Plain gradient ascent on the multipliers (mdmm's, ``dual="gda"``) is an *integral*
controller: :math:`\lambda` integrates the violation, so it keeps growing while the primal
optimizer is still on its way to the constraint and overshoots once it gets there; the
violation then rings around zero for thousands of steps. The νPI controller (Sohrabi et al.,
ICML 2024) adds a proportional term on the change of the (smoothed) violation:

.. math::

    e_t = \partial\mathcal{L}/\partial\lambda, \qquad
    \xi_t = \nu\,\xi_{t-1} + (1-\nu)\,e_t, \qquad
    \lambda_{t+1} = \lambda_t + \eta\,\big(e_t + \kappa_p\,(\xi_t - \xi_{t-1})\big),

with :math:`\xi_{-1} = e_0` (the first step is plain ascent, no kick). The error :math:`e` is
the multiplier's gradient, ``scale·c`` for an equality (``c = value - fn``) and, for the
slack-free inequalities, ``scale·(min(λ + d c, 0) - λ)/d``, which is continuous where the
constraint turns inactive and pulls λ back to 0 there, so no projection is needed. Summed, the
update reads :math:`\lambda_t = \lambda_0 + \eta\sum_{j<t} e_j + \eta\kappa_p(\xi_{t-1} -
\xi_{-1})`: the multiplier is the integral of the violation *plus* ``η·κ_p`` times its current
value, a penalty that acts at once and fades as the constraint is met, so the integral need not
wind up to push the parameters.

Defaults (``kp``, ``nu``; derived in ``docs/soft-controller.md``): linearise the loop near the
solution. One primal step changes the violation by :math:`-a\,\delta\lambda` and damps it by a
fraction :math:`p` (the primal's own restoring force); one dual step adds :math:`b = \eta\cdot
\mathrm{scale}` times the PI error. The violation then obeys, per step and for small
:math:`k = ab`,

.. math::

    \varepsilon^2 + (p + k\kappa_p)\,\varepsilon + k = 0 ,

a damped oscillator of frequency :math:`\sqrt{k}` (plain ascent: :math:`\kappa_p = 0`, damped
by :math:`p` alone: it rings when :math:`p < 2\sqrt{k}`). ``κ_p`` is a look-ahead in steps: the
integral term sees :math:`e_t + \kappa_p\,\Delta e_t \approx e_{t+\kappa_p}`. For
:math:`k\kappa_p^2 \ge 4` the loop is overdamped for every primal damping :math:`p \ge 0`,
its slow mode decays by :math:`1/\kappa_p` of the violation per step and its fast mode by
:math:`k\kappa_p`, stable while :math:`k\kappa_p < 2` (discrete time). ``KP`` below is the
horizon that keeps both true over the widest range of loop gains :math:`k` (the geometric
middle of :math:`4/\kappa_p^2 \le k < 2/\kappa_p`): ``kp = 100`` covers
:math:`4\cdot10^{-4} \le k < 2\cdot10^{-2}`, and so a dual lr within ×50 of the one that makes
the loop critical. ``nu = 0``: the smoothing delays the proportional term by
:math:`\nu/(1-\nu)` steps, which costs phase margin; raise it only for constraints evaluated on
minibatches, whose step-to-step noise the proportional term would amplify by ``κ_p``.

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

#: The proportional gain: the horizon, in steps, over which the change of the violation is
#: extrapolated (see the module docstring for the derivation).
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
