r"""Matrices of rank exactly ``r``, as :math:`U \operatorname{diag}(s) V^\top` with
:math:`s > 0`.

Math. As :class:`~manifoldparam.hard.LowRank` (orthonormal :math:`U`, :math:`V` through the
exponential map at their base points; :math:`r(n + m - r)` coordinates, the dimension of the
fixed-rank manifold, no gauge), with the singular values
:math:`s = \operatorname{softplus}(x_s) > 0`, so the rank never drops below :math:`r` (in
exact arithmetic: a singular value below the dtype's resolution of :math:`\|W\|` is not seen
by a numerical rank). ``right_inverse`` is the truncated SVD; registration keeps the weight's
truncated SVD with its singular values lifted to at least
:math:`\sqrt{\varepsilon}\max(1, s_1)`, so that a rank-deficient weight lands inside the set.
For :math:`r = n = m` the set has two components (the sign of :math:`\det W`): training keeps
the registered one. geoopt has no fixed-rank manifold.

Example::

    >>> m = manifoldparam.fixed_rank(nn.Linear(8, 6), rank=3)
    >>> int(torch.linalg.matrix_rank(m.weight.detach()))
    3
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from manifoldparam.hard.low_rank import LowRank
from manifoldparam.hard.registration import register
from manifoldparam.hard.spd import softplus_inverse

__all__ = ["FixedRank", "fixed_rank"]


class FixedRank(LowRank):
    """Parametrization onto the matrices of rank exactly ``rank`` (see the module docstring).

    Args:
        shape: shape of the weight (a matrix, or a tensor read as ``(shape[0], rest)``).
        rank: the rank ``r``, ``1 <= r <= min(n, m)``.
        atol: as for :class:`~manifoldparam.hard.LowRank`.
    """

    set_name = "of rank exactly r"

    def values(self, xs: Tensor) -> Tensor:
        # softplus without torch's linear cut at x > 20 (off by e^-x there, 2e-9 at 20: the
        # inverse below is exact, so the cut would move an assigned weight by that much)
        return torch.relu(xs) + torch.log1p(torch.exp(-xs.abs()))

    def values_inverse(self, s: Tensor) -> Tensor:
        return softplus_inverse(s)

    def _lift(self, s: Tensor) -> Tensor:
        margin = torch.finfo(s.dtype).eps ** 0.5 * s[..., :1].clamp_min(1.0)
        return torch.maximum(s, margin)

    def membership_failure(self, w: Tensor) -> str | None:
        s = torch.linalg.svdvals(w.reshape(self.rows, self.cols).double())
        if float(s[self.rank - 1]) <= 0.0:
            return f"its rank is below {self.rank} (the {self.rank}-th singular value is 0)"
        return None


def fixed_rank(
    module: nn.Module, name: str = "weight", *, rank: int, atol: float | None = None
) -> nn.Module:
    r"""Constrain ``module.<name>`` to have rank exactly ``rank``.

    :math:`W = U \operatorname{diag}(s) V^\top` with :math:`U, V` orthonormal columns and
    :math:`s = \operatorname{softplus}(x_s) > 0`: :math:`r(n+m-r)` coordinates, no gauge. The
    current weight is kept, moved to its truncated SVD with the singular values lifted to at
    least :math:`\sqrt{\varepsilon}\max(1, s_1)`.

    Args:
        module: the module that holds the attribute.
        name: the attribute to constrain (a matrix; more dims are read as
            ``(shape[0], rest)``).
        rank: the rank, ``1 <= rank <= min(n, m)``.
        atol: how large (relative to ``max(1, max|W|)``) the ``(r+1)``-th singular value of
            an assigned value may be; ``None``: ``16·max(n, m)·eps``.

    Returns:
        ``module``, whose ``module.<name>`` now has rank ``rank``.

    Raises:
        ValueError: ``rank`` outside ``1..min(n, m)``, a vector weight, a NaN/Inf or empty
            weight, an attribute already parametrized.
        TypeError: a non-floating weight, a non-int ``rank``.
        AttributeError: ``module`` has no attribute ``name``.

    Example:
        >>> layer = mp.fixed_rank(nn.Linear(10, 10, bias=False), rank=3)
        >>> s = torch.linalg.svdvals(layer.weight.detach())
        >>> bool((s[:3] > 0).all()), bool((s[3:] < 1e-5).all())
        (True, True)
    """
    return register(module, name, FixedRank, rank=rank, atol=atol)
