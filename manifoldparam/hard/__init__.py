"""Hard constraints: trivializations registered through ``torch.nn.utils.parametrize``.

One file per set; each holds the parametrization class (usable directly with
``register_parametrization``) and the thin public constructor.
"""

from manifoldparam.hard.adapter import OrthogonalAdapter, orthogonal_adapter
from manifoldparam.hard.base import NonFiniteError, Parametrization
from manifoldparam.hard.bounded import Bounded, bounded
from manifoldparam.hard.correlation import Correlation, correlation
from manifoldparam.hard.fixed_rank import FixedRank, fixed_rank
from manifoldparam.hard.grassmannian import Grassmannian, grassmannian, subspace_distance
from manifoldparam.hard.low_rank import LowRank, low_rank
from manifoldparam.hard.nonnegative import Nonnegative, nonnegative
from manifoldparam.hard.orthogonal import Orthogonal, orthogonal
from manifoldparam.hard.psd import PSD, psd
from manifoldparam.hard.registration import constraints_of, project, rebase, register
from manifoldparam.hard.rotation import SO3, Rotation, rotation, so3_exp, so3_log
from manifoldparam.hard.simplex import Simplex, simplex
from manifoldparam.hard.skew import Skew, skew
from manifoldparam.hard.spd import SPD, spd
from manifoldparam.hard.sphere import Sphere, sphere
from manifoldparam.hard.symmetric import Symmetric, symmetric
from manifoldparam.hard.unitary import Unitary, unitary

__all__ = [
    "PSD",
    "SO3",
    "SPD",
    "Bounded",
    "Correlation",
    "FixedRank",
    "Grassmannian",
    "LowRank",
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
    "bounded",
    "constraints_of",
    "correlation",
    "fixed_rank",
    "grassmannian",
    "low_rank",
    "nonnegative",
    "orthogonal",
    "orthogonal_adapter",
    "project",
    "psd",
    "rebase",
    "register",
    "rotation",
    "simplex",
    "skew",
    "so3_exp",
    "so3_log",
    "spd",
    "sphere",
    "subspace_distance",
    "symmetric",
    "unitary",
]
