"""manifoldparam: constrained training for PyTorch on ordinary module attributes.

* :mod:`manifoldparam.hard` -- hard constraints by construction: :func:`orthogonal`,
  :func:`spd`, :func:`bounded`, :func:`nonnegative`, registered through
  ``torch.nn.utils.parametrize``;
* :mod:`manifoldparam.caching` -- :func:`cached`, :func:`auto_cache`, :func:`invalidate`,
  :func:`cached_closure`: a constrained weight computed once per step, never stale;
* :mod:`manifoldparam.soft` -- Lagrange multipliers (MDMM) for what no map expresses, with
  mdmm's names (``import manifoldparam as mdmm`` runs mdmm's examples) and
  :func:`constrain` on module attributes;
* :mod:`manifoldparam.interop` -- optimizers, scipy, checkpoints, export, distributed.
"""

from manifoldparam.caching import auto_cache, cached, cached_closure, invalidate
from manifoldparam.hard import (
    SPD,
    Bounded,
    Nonnegative,
    Orthogonal,
    Parametrization,
    bounded,
    constraints_of,
    nonnegative,
    orthogonal,
    project,
    rebase,
    spd,
)
from manifoldparam.soft import (
    MDMM,
    BoundConstraintHard,
    Constraint,
    ConstraintReport,
    ConstraintReturn,
    EqConstraint,
    MaxConstraint,
    MaxConstraintHard,
    MDMMReturn,
    MinConstraint,
    MinConstraintHard,
    Multiplier,
    ReportRow,
    check_optimizer,
    constrain,
    constraint_report,
    dual_update,
    mean_abs,
    restore_feasibility,
    rms,
    row_norms,
    soft_constraints,
)

__version__ = "0.1.0"

__all__ = [
    "MDMM",
    "SPD",
    "BoundConstraintHard",
    "Bounded",
    "Constraint",
    "ConstraintReport",
    "ConstraintReturn",
    "EqConstraint",
    "MDMMReturn",
    "MaxConstraint",
    "MaxConstraintHard",
    "MinConstraint",
    "MinConstraintHard",
    "Multiplier",
    "Nonnegative",
    "Orthogonal",
    "Parametrization",
    "ReportRow",
    "__version__",
    "auto_cache",
    "bounded",
    "cached",
    "cached_closure",
    "check_optimizer",
    "constrain",
    "constraint_report",
    "constraints_of",
    "dual_update",
    "invalidate",
    "mean_abs",
    "nonnegative",
    "orthogonal",
    "project",
    "rebase",
    "restore_feasibility",
    "rms",
    "row_norms",
    "soft_constraints",
    "spd",
]
