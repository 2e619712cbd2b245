"""manifoldparam: constrained training for PyTorch on ordinary module attributes.

The everyday names are here; the rest lives in the layer it belongs to:

* :mod:`manifoldparam.hard` -- hard constraints by construction (:func:`orthogonal`,
  :func:`orthogonal_adapter`, :func:`spd`, :func:`bounded`, :func:`nonnegative`, your own
  :class:`Parametrization`),
  registered through ``torch.nn.utils.parametrize`` by :func:`register`;
* :mod:`manifoldparam.caching` -- :func:`cached`, :func:`auto_cache`, :func:`invalidate`,
  :func:`cached_closure`: a parametrized weight computed once per step, never stale;
* :mod:`manifoldparam.soft` -- Lagrange multipliers (MDMM) for what no map expresses, with
  mdmm's names (``import manifoldparam as mdmm`` runs mdmm's examples) and :func:`constrain`
  on module attributes;
* :mod:`manifoldparam.report` -- :func:`constraint_report`, every constraint of a model;
* :mod:`manifoldparam.interop` -- scipy, checkpoints, export, ``torch.func``, distributed;
* :mod:`manifoldparam.linalg` -- the matrix exponential the orthogonal map is built on.
"""

from manifoldparam import caching, hard, interop, linalg, report, soft
from manifoldparam.caching import auto_cache, cached, cached_closure, invalidate
from manifoldparam.hard import (
    SPD,
    Bounded,
    NonFiniteError,
    Nonnegative,
    Orthogonal,
    OrthogonalAdapter,
    Parametrization,
    bounded,
    nonnegative,
    orthogonal,
    orthogonal_adapter,
    project,
    rebase,
    register,
    spd,
)
from manifoldparam.interop import export, scipy_minimize
from manifoldparam.report import constraint_report
from manifoldparam.soft import (
    MDMM,
    BoundConstraintHard,
    Constraint,
    ConstraintReturn,
    EqConstraint,
    MaxConstraint,
    MaxConstraintHard,
    MDMMReturn,
    MinConstraint,
    MinConstraintHard,
    constrain,
)

__version__ = "0.1.0"

__all__ = [
    "MDMM",
    "SPD",
    "BoundConstraintHard",
    "Bounded",
    "Constraint",
    "ConstraintReturn",
    "EqConstraint",
    "MDMMReturn",
    "MaxConstraint",
    "MaxConstraintHard",
    "MinConstraint",
    "MinConstraintHard",
    "NonFiniteError",
    "Nonnegative",
    "Orthogonal",
    "OrthogonalAdapter",
    "Parametrization",
    "__version__",
    "auto_cache",
    "bounded",
    "cached",
    "cached_closure",
    "caching",
    "constrain",
    "constraint_report",
    "export",
    "hard",
    "interop",
    "invalidate",
    "linalg",
    "nonnegative",
    "orthogonal",
    "orthogonal_adapter",
    "project",
    "rebase",
    "register",
    "report",
    "scipy_minimize",
    "soft",
    "spd",
]
