"""Linear-algebra kernels the constraints are built on, usable on their own.

* :func:`expm` -- the matrix exponential with an exact Fréchet-adjoint backward (about two
  forwards instead of ``torch.linalg.matrix_exp``'s ten), and its skew-matrix variants
  :func:`expm_skew` and :func:`expm_projected` (:mod:`.expm`);
* ``manifoldparam.linalg.op`` -- the same exponential as the custom op
  ``manifoldparam::expm_v2`` with its Fréchet backward, what the orthogonal maps call under
  ``torch.compile``;
* :func:`expm_skew_blocks` -- many small rotations ``exp(A_i)`` from their skew coordinates,
  the degree-8 Taylor polynomial with its exact derivative (orthogonal fine-tuning's blocks).
"""

from manifoldparam.linalg.expm import SYNC_FREE_SQUARINGS, expm, expm_projected, expm_skew
from manifoldparam.linalg.skew_blocks import expm_skew_blocks
from manifoldparam.linalg.stiefel import complement, householder_frame, polar, stiefel_map

__all__ = [
    "SYNC_FREE_SQUARINGS",
    "complement",
    "expm",
    "expm_projected",
    "expm_skew",
    "expm_skew_blocks",
    "householder_frame",
    "polar",
    "stiefel_map",
]
