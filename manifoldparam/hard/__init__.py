"""Hard constraints: trivializations registered through ``torch.nn.utils.parametrize``.

One file per set; each holds the parametrization class (usable directly with
``register_parametrization``) and the thin public constructor.
"""

from manifoldparam.hard.adapter import OrthogonalAdapter, orthogonal_adapter
from manifoldparam.hard.base import NonFiniteError, Parametrization
from manifoldparam.hard.bounded import Bounded, bounded
from manifoldparam.hard.nonnegative import Nonnegative, nonnegative
from manifoldparam.hard.orthogonal import Orthogonal, orthogonal
from manifoldparam.hard.registration import constraints_of, project, rebase, register
from manifoldparam.hard.spd import SPD, spd

__all__ = [
    "SPD",
    "Bounded",
    "NonFiniteError",
    "Nonnegative",
    "Orthogonal",
    "OrthogonalAdapter",
    "Parametrization",
    "bounded",
    "constraints_of",
    "nonnegative",
    "orthogonal",
    "orthogonal_adapter",
    "project",
    "rebase",
    "register",
    "spd",
]
