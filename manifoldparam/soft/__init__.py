"""Soft constraints: MDMM multipliers that reach feasibility with any optimizer.

* the constraint kinds (:mod:`.kinds`, on the base :mod:`.constraints`), mdmm's names and math
  without its slack saddle;
* :class:`MDMM`, the Lagrangian, and :meth:`MDMM.make_optimizer`, which ascends the
  multipliers through ``maximize=True`` (:mod:`.mdmm`);
* :func:`dual_update`, the method of multipliers for LBFGS / BFGS / scipy
  (:mod:`.multipliers`);
* :func:`restore_feasibility`, a Gauss–Newton step onto the constraints once near them, and
  :func:`tangent_gradients`, the gradient projected along them
  (:mod:`.restoration`);
* :class:`InfeasibleWarning`: multipliers that grow while the violation does not fall, and
  :class:`StalledWarning`: a violation that stops falling while still violated (:mod:`.infeasible`);
* the νPI controller for the multipliers, ``make_optimizer(dual="pi")`` (:mod:`.controller`);
* :func:`constrain`, soft constraints declared on module attributes (:mod:`.attribute`).

The clamp-based kinds keep mdmm's names (``MaxConstraintHard``, ``MinConstraintHard``,
``BoundConstraintHard``: ``constrain(..., clamp=True)``); "hard" constraints in the rest of
the library are the maps of :mod:`manifoldparam.hard`. The report of every constraint, hard and
soft, is :func:`manifoldparam.constraint_report`.
"""

from manifoldparam.soft.attribute import (
    constrain,
    mean_abs,
    rms,
    row_norms,
    soft_constraints,
)
from manifoldparam.soft.constraints import Constraint, ConstraintReturn, Multiplier
from manifoldparam.soft.infeasible import InfeasibleWarning, StalledWarning
from manifoldparam.soft.kinds import (
    BoundConstraintHard,
    EqConstraint,
    MaxConstraint,
    MaxConstraintHard,
    MinConstraint,
    MinConstraintHard,
)
from manifoldparam.soft.mdmm import MDMM, MDMMReturn, check_optimizer
from manifoldparam.soft.multipliers import dual_update
from manifoldparam.soft.restoration import restore_feasibility, tangent_gradients

__all__ = [
    "MDMM",
    "BoundConstraintHard",
    "Constraint",
    "ConstraintReturn",
    "EqConstraint",
    "InfeasibleWarning",
    "MDMMReturn",
    "MaxConstraint",
    "MaxConstraintHard",
    "MinConstraint",
    "MinConstraintHard",
    "Multiplier",
    "StalledWarning",
    "check_optimizer",
    "constrain",
    "dual_update",
    "mean_abs",
    "restore_feasibility",
    "rms",
    "row_norms",
    "soft_constraints",
    "tangent_gradients",
]
