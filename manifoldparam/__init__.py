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
    PSD,
    SO3,
    SPD,
    Bounded,
    Correlation,
    FixedRank,
    Grassmannian,
    LowRank,
    NonFiniteError,
    Nonnegative,
    Orthogonal,
    OrthogonalAdapter,
    Parametrization,
    Rotation,
    Simplex,
    Skew,
    Sphere,
    Symmetric,
    Unitary,
    bounded,
    correlation,
    fixed_rank,
    grassmannian,
    low_rank,
    nonnegative,
    orthogonal,
    orthogonal_adapter,
    project,
    psd,
    rebase,
    register,
    rotation,
    simplex,
    skew,
    spd,
    sphere,
    symmetric,
    unitary,
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
    "PSD",
    "SO3",
    "SPD",
    "BoundConstraintHard",
    "Bounded",
    "Constraint",
    "ConstraintReturn",
    "Correlation",
    "EqConstraint",
    "FixedRank",
    "Grassmannian",
    "LowRank",
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
    "Rotation",
    "Simplex",
    "Skew",
    "Sphere",
    "Symmetric",
    "Unitary",
    "__version__",
    "auto_cache",
    "bounded",
    "cached",
    "cached_closure",
    "caching",
    "constrain",
    "constraint_report",
    "correlation",
    "export",
    "fixed_rank",
    "grassmannian",
    "hard",
    "interop",
    "invalidate",
    "linalg",
    "low_rank",
    "nonnegative",
    "orthogonal",
    "orthogonal_adapter",
    "project",
    "psd",
    "rebase",
    "register",
    "report",
    "rotation",
    "scipy_minimize",
    "simplex",
    "skew",
    "soft",
    "spd",
    "sphere",
    "symmetric",
    "unitary",
]
