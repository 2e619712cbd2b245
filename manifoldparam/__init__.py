"""manifoldparam: constrained training for PyTorch on ordinary module attributes.

* Hard constraints by construction (:mod:`manifoldparam.hard`): :func:`orthogonal`,
  :func:`spd`, :func:`bounded`, :func:`nonnegative`, registered through
  ``torch.nn.utils.parametrize``.
"""

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

__version__ = "0.1.0"

__all__ = [
    "SPD",
    "Bounded",
    "Nonnegative",
    "Orthogonal",
    "Parametrization",
    "__version__",
    "bounded",
    "constraints_of",
    "nonnegative",
    "orthogonal",
    "project",
    "rebase",
    "spd",
]
