"""manifoldparam: constrained training for PyTorch on ordinary module attributes.

The everyday names are here; the rest lives in the layer it belongs to:

* :mod:`manifoldparam.hard` -- hard constraints by construction, registered through
  ``torch.nn.utils.parametrize`` by :func:`register`: every constructor is here
  (:func:`orthogonal`, :func:`spd`, :func:`sphere`, :func:`rotation`, ...), with your own
  :class:`Parametrization`; the parametrization classes stay in ``mp.hard`` (``mp.hard.Sphere``),
  except the first four sets' (``mp.Orthogonal``, ``mp.SPD``, ``mp.Bounded``,
  ``mp.Nonnegative``), kept here for the code written against them;
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
    Parametrization,
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
    "Parametrization",
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
