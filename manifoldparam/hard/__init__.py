"""Hard constraints: trivializations registered through ``torch.nn.utils.parametrize``.

One file per set; each holds the parametrization class (usable directly with
``register_parametrization``) and the thin public constructor.
"""

from manifoldparam.hard.base import NonFiniteError, Parametrization
from manifoldparam.hard.bounded import Bounded, bounded
from manifoldparam.hard.correlation import Correlation, correlation
from manifoldparam.hard.grassmannian import Grassmannian, grassmannian, subspace_distance
from manifoldparam.hard.nonnegative import Nonnegative, nonnegative
from manifoldparam.hard.orthogonal import Orthogonal, orthogonal
from manifoldparam.hard.registration import constraints_of, project, rebase, register
from manifoldparam.hard.rotation import SO3, Rotation, rotation, so3_exp, so3_log
from manifoldparam.hard.spd import SPD, spd
from manifoldparam.hard.unitary import Unitary, unitary

__all__ = [
    "SO3",
    "SPD",
    "Bounded",
    "Correlation",
    "Grassmannian",
    "NonFiniteError",
    "Nonnegative",
    "Orthogonal",
    "Parametrization",
    "Rotation",
    "Unitary",
    "bounded",
    "constraints_of",
    "correlation",
    "grassmannian",
    "nonnegative",
    "orthogonal",
    "project",
    "rebase",
    "register",
    "rotation",
    "so3_exp",
    "so3_log",
    "spd",
    "subspace_distance",
    "unitary",
]
