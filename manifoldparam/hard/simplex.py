r"""The probability simplex along a dim: nonnegative entries that sum to one (row-stochastic).

Math. Each constrained vector :math:`w \in \mathbb{R}^n` (each slice along ``dim``) lies in
:math:`\Delta^{n-1} = \{w \ge 0,\ \textstyle\sum_i w_i = 1\}`, of dimension :math:`n-1`. The
map is the softmax with the last logit fixed at zero,

.. math::
    w = \operatorname{softmax}(x_1, \dots, x_{n-1}, 0), \qquad
    x_i = \log w_i - \log w_n,

a diffeomorphism from :math:`\mathbb{R}^{n-1}` onto the open simplex: minimal coordinates
(a plain softmax of :math:`n` logits has a dead direction, the common shift). Entries are
positive in exact arithmetic; a value with zero entries (a one-hot row) is reached up to the
smallest normal number (its coordinates are :math:`\log` of that, finite).

Registration moves the weight to the nearest point of the simplex in the Euclidean norm (the
sort-based projection), with entries below :math:`\sqrt{\varepsilon}` (:math:`\varepsilon`
the dtype's machine epsilon) lifted to it and the vector renormalised, so that no coordinate
starts where the softmax gradient vanishes; a weight already in the simplex with entries above
that floor is kept. The Euclidean projection of a small random initialisation is sparse:
initialise a weight you mean to learn near uniform (``nn.init.constant_(w, 1 / n)``).
geoopt has no simplex (its ``BirkhoffPolytope`` is the doubly stochastic matrices).

Example::

    >>> mix = manifoldparam.simplex(nn.Linear(4, 3, bias=False))
    >>> torch.allclose(mix.weight.sum(-1), torch.ones(3)), bool((mix.weight >= 0).all())
    (True, True)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from manifoldparam.hard.base import LOW_PRECISION, Parametrization, max_abs
from manifoldparam.hard.registration import register

__all__ = ["Simplex", "project_simplex", "simplex"]


def project_simplex(v: Tensor) -> Tensor:
    """The Euclidean projection of each row of ``v`` (shape ``(count, n)``) onto the simplex:
    ``max(v - τ, 0)`` with ``τ`` from the sorted row (Held, Wolfe and Crowder, 1974)."""
    u = torch.sort(v, dim=-1, descending=True).values
    css = u.cumsum(-1) - 1.0
    k = torch.arange(1, v.shape[-1] + 1, dtype=v.dtype, device=v.device)
    rho = (u - css / k > 0).sum(-1, keepdim=True).clamp_min(1)  # a prefix: its length
    tau = css.gather(-1, rho - 1) / rho.to(v.dtype)
    return (v - tau).clamp_min(0.0)


class Simplex(Parametrization):
    """Parametrization onto the probability simplex along ``dim`` (see the module docstring).

    Args:
        shape: shape of the weight.
        dim: the dim whose slices sum to one (default ``-1``: each row of a ``Linear``
            weight, a row-stochastic matrix).
        atol: tolerance on negative entries and on ``|Σ w - 1|``; default ``2·n·eps(dtype)``.
    """

    set_name = "in the probability simplex"

    def __init__(
        self,
        shape: Sequence[int],
        *,
        dim: int = -1,
        atol: float | None = None,
        owner: str | None = None,
    ) -> None:
        super().__init__(shape, atol=atol, owner=owner)
        attr = self.owner.rsplit(".", 1)[-1]
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"{self.owner}: dim must be an int, got {dim!r}")
        if not -len(self.shape) <= dim < len(self.shape):
            raise ValueError(
                f"{self.owner}: dim={dim} is out of range for a weight of shape "
                f"{tuple(self.shape)}; pass one of {-len(self.shape)}..{len(self.shape) - 1}, "
                f"e.g. manifoldparam.simplex(module, {attr!r}, dim=-1)."
            )
        self.simplex_dim = dim % len(self.shape)
        self.n = self.shape[self.simplex_dim]
        self.count = self.shape.numel() // max(self.n, 1)
        if self.n < 2:
            raise ValueError(
                f"{self.owner}: dim {self.simplex_dim} has size 1 (shape {tuple(self.shape)}): "
                "its only point of the simplex is 1, there is nothing to train. Pick the dim "
                "that holds the probabilities (dim=...)."
            )

    @property
    def dim(self) -> int:
        """Dimension of the set: ``n - 1`` per vector."""
        return self.count * (self.n - 1)

    def default_atol(self, dtype: torch.dtype) -> float:
        if dtype in LOW_PRECISION:  # rounding each entry moves the sum by <= eps/2
            return 4.0 * torch.finfo(dtype).eps + self.default_atol(torch.float32)
        return 2.0 * self.n * torch.finfo(dtype).eps

    def _rows(self, w: Tensor) -> Tensor:
        return w.movedim(self.simplex_dim, -1).reshape(self.count, self.n)

    def _unrows(self, t: Tensor) -> Tensor:
        moved = [s for i, s in enumerate(self.shape) if i != self.simplex_dim] + [self.n]
        return t.reshape(moved).movedim(-1, self.simplex_dim)

    def map(self, x: Tensor) -> Tensor:
        logits = torch.cat([x, torch.zeros_like(x[..., :1])], dim=-1)
        return self._unrows(torch.softmax(logits, dim=-1))

    def inverse(self, w: Tensor) -> Tensor:
        logs = torch.log(self._rows(w).clamp_min(torch.finfo(w.dtype).tiny))
        return logs[:, :-1] - logs[:, -1:]

    def project(self, w: Tensor) -> Tensor:
        """The Euclidean projection onto the simplex, entries lifted to at least ``√eps`` and
        renormalised (see the module docstring)."""
        p = project_simplex(self._rows(w))
        p = p.clamp_min(torch.finfo(w.dtype).eps ** 0.5)
        return self._unrows(p / p.sum(-1, keepdim=True))

    def distance(self, w: Tensor) -> Tensor:
        """The largest of ``max(-w)`` and ``max|Σ w - 1|``."""
        rows = self._rows(w)
        return torch.maximum(max_abs(torch.relu(-rows)), max_abs(rows.sum(-1) - 1.0))

    def explain(self, w: Tensor, d: float, tol: float) -> str:
        rows = self._rows(w)
        neg = int((rows < -tol).sum())
        sums = rows.sum(-1)
        bad = int(((sums - 1.0).abs() > tol).sum())
        return (
            f"{neg} negative entries and {bad} of {self.count} sums along dim "
            f"{self.simplex_dim} off 1 (e.g. {float(sums[0]):.6g}); worst {d:.3e} > {tol:.3e}"
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dim={self.simplex_dim}"


def simplex(
    module: nn.Module, name: str = "weight", *, dim: int = -1, atol: float | None = None
) -> nn.Module:
    r"""Constrain ``module.<name>`` to the probability simplex along ``dim``: nonnegative
    entries summing to one (``dim=-1`` on a ``Linear`` weight: a row-stochastic matrix).

    Each slice is :math:`\operatorname{softmax}(x, 0)` of :math:`n-1` coordinates (the last
    logit fixed, so none is dead). The current weight is kept, moved to its nearest point of
    the simplex (entries lifted to at least :math:`\sqrt{\varepsilon}`).

    Args:
        module: the module that holds the attribute.
        name: the attribute to constrain.
        dim: the dim along which entries sum to one (size at least 2).
        atol: how far from the simplex an assigned value may be; ``None``: ``2·n·eps``.

    Returns:
        ``module``, whose ``module.<name>`` now sums to one along ``dim``.

    Raises:
        ValueError: ``dim`` out of range or of size 1, a NaN/Inf or empty weight, an
            attribute already parametrized.
        TypeError: a non-floating weight, a non-int ``dim``.
        AttributeError: ``module`` has no attribute ``name``.

    Example:
        >>> mix = nn.Linear(4, 3, bias=False)
        >>> _ = nn.init.constant_(mix.weight, 0.25)
        >>> mix = mp.simplex(mix)                  # each row sums to one
        >>> mix.weight.sum(-1)
        tensor([1., 1., 1.], grad_fn=<SumBackward1>)
        >>> mix.parametrizations.weight.original.shape   # n - 1 per row
        torch.Size([3, 3])
    """
    return register(module, name, Simplex, dim=dim, atol=atol)
