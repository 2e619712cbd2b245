r"""The constraint kinds of the Modified Differential Multiplier Method (MDMM).

Each constraint owns one Lagrange multiplier per element of its function's value and adds
one term to the Lagrangian minimised over the model's parameters and *maximised* over the
multipliers (Platt & Barr 1988; the ``mdmm`` package, whose names and math these keep):

.. math::

    \mathcal{L}(\theta, \lambda) = f(\theta)
        + \sum_i \mathrm{scale}_i \, \psi_i(c_i(\theta), \lambda_i)

* equality and the clamp-based ("hard") kinds: :math:`\psi = \lambda c + d\,c^2/2` with
  ``EqConstraint``: :math:`c = \mathrm{value} - \mathrm{fn}`, ``MaxConstraintHard``:
  :math:`c = \min(\mathrm{fn}, \max) - \mathrm{fn}`, ``MinConstraintHard``:
  :math:`c = \max(\mathrm{fn}, \min) - \mathrm{fn}`, ``BoundConstraintHard``:
  :math:`c = \mathrm{clamp}(\mathrm{fn}, \min, \max) - \mathrm{fn}` (exactly mdmm's);
* ``MaxConstraint`` / ``MinConstraint`` (:math:`c = \max - \mathrm{fn}` or
  :math:`\mathrm{fn} - \min`, feasible when :math:`c \ge 0`): mdmm writes
  :math:`c - s^2` with a slack variable :math:`s`, whose gradient vanishes at :math:`s = 0`
  -- a constraint that starts violated stays an *equality* for ever (min x² s.t. x ≤ 1 from
  x = 2 ends at 1, not 0). Here the slack is minimised out in closed form (Rockafellar's
  augmented Lagrangian), which equals mdmm's term at the optimal slack and has no saddle:

  .. math::

      \psi(c, \lambda) = \frac{\min(\lambda + d\,c,\ 0)^2 - \lambda^2}{2d}
      \quad (= \lambda c + d c^2/2 \text{ while active}, \ -\lambda^2/2d \text{ once slack}).

  Its multiplier keeps mdmm's sign (:math:`\lambda \le 0` at a solution) and decays to 0
  by itself when the constraint is inactive; it needs ``damping > 0``.

``.infs`` (:attr:`ConstraintReturn.inf`) is always the *true* infeasibility
``projection_of_fn_onto_the_feasible_set - fn``: 0 exactly when the constraint holds, whose
absolute value is the distance to feasibility (mdmm reports ``c - s²`` for the slack kinds).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from manifoldparam.soft.constraints import Constraint, fmt

__all__ = [
    "BoundConstraintHard",
    "EqConstraint",
    "MaxConstraint",
    "MaxConstraintHard",
    "MinConstraint",
    "MinConstraintHard",
]


class EqConstraint(Constraint):
    """``fn == value``: :math:`c = \\mathrm{value} - \\mathrm{fn}`,
    :math:`\\psi = \\lambda c + d c^2/2`.

    Args:
        *args: ``fn``, ``value``, then ``scale`` and ``damping`` (mdmm's order; also by name).
        **named: the same arguments by name, and ``shape``, ``dtype``.

    Other Parameters:
        fn (Callable[..., Tensor]): the constrained function: no argument (mdmm style), or the
            attribute's value when declared with :func:`~manifoldparam.soft.constrain`.
        shape (Sequence[int]): shape of ``fn``'s value: one multiplier per element.
        dtype (torch.dtype | None): dtype of the multipliers and bounds.
        value (float | Tensor): the target of ``fn``.
        scale (float): multiplies the Lagrangian term (default 1).
        damping (float): the penalty :math:`d` (default 1).

    Raises:
        ValueError: a NaN ``value``, a bad ``scale`` or ``damping``.

    Example (mdmm's):
        >>> w = torch.tensor([0.5, -2.0], requires_grad=True)
        >>> c = mp.EqConstraint(lambda: w.abs().mean(), 1.0, damping=10)
        >>> out = c()
        >>> out.fn_value, out.inf                  # c = 1 − 1.25
        (tensor(1.2500, grad_fn=<MeanBackward0>), tensor(-0.2500, grad_fn=<SubBackward0>))
    """

    relation = "=="
    bounds = ("value",)
    always_active = True
    value: Tensor

    def infeasibility(self, fn_value: Tensor) -> Tensor:
        return self.value - fn_value

    def bound_repr(self) -> str:
        return f"== {fmt(self.value)}"


class _Inequality(Constraint):
    """Slack-free inequality ``c >= 0`` with the closed-form augmented Lagrangian term."""

    nonpositive_multiplier = True

    def __init__(self, *args: Any, **named: Any) -> None:
        super().__init__(*args, **named)
        if not bool(self.damping > 0):
            raise ValueError(
                f"{self.describe()}: damping=0, but the slack-free inequality needs damping > 0 "
                "(it is the augmented Lagrangian's penalty). Use a positive damping, or "
                f"{type(self).__name__}Hard for an undamped clamp-based constraint."
            )

    def term(self, c: Tensor) -> Tensor:
        d = self.damping
        t = (self.lmbda + d * c).clamp(max=0)
        out = self.scale * ((t * t - self.lmbda * self.lmbda) / (2 * d))
        return out.sum() if out.dim() else out


class MaxConstraint(_Inequality):
    r"""``fn <= max`` without mdmm's slack saddle: :math:`c = \max - \mathrm{fn} \ge 0`,
    :math:`\psi = (\min(\lambda + d c, 0)^2 - \lambda^2) / 2d`.

    Args:
        *args: ``fn``, ``max``, then ``scale`` and ``damping`` (mdmm's order; also by name).
        **named: the same arguments by name, and ``shape``, ``dtype``.

    Other Parameters:
        fn (Callable[..., Tensor]): the constrained function: no argument (mdmm style), or the
            attribute's value when declared with :func:`~manifoldparam.soft.constrain`.
        shape (Sequence[int]): shape of ``fn``'s value: one multiplier per element.
        dtype (torch.dtype | None): dtype of the multipliers and bounds.
        max (float | Tensor): the upper bound of ``fn``.
        scale (float): multiplies the Lagrangian term (default 1).
        damping (float): the penalty :math:`d` (must be > 0).

    Raises:
        ValueError: ``damping`` is not positive, a NaN ``max``, a bad ``scale``.

    Example:
        >>> w = torch.tensor([3.0, 4.0], requires_grad=True)
        >>> c = mp.MaxConstraint(lambda: w.norm(), 3.0, damping=10)
        >>> c().inf                                # Π(fn) − fn = 3 − 5
        tensor(-2., grad_fn=<SubBackward0>)
    """

    relation = "<="
    bounds = ("max",)
    max: Tensor

    def infeasibility(self, fn_value: Tensor) -> Tensor:
        return self.max - fn_value

    def violation(self, fn_value: Tensor) -> Tensor:
        return fn_value.clamp(max=self.max) - fn_value

    def bound_repr(self) -> str:
        return f"<= {fmt(self.max)}"


class MinConstraint(_Inequality):
    r"""``fn >= min`` without mdmm's slack saddle: :math:`c = \mathrm{fn} - \min \ge 0`,
    :math:`\psi = (\min(\lambda + d c, 0)^2 - \lambda^2) / 2d`.

    Args:
        *args: ``fn``, ``min``, then ``scale`` and ``damping`` (mdmm's order; also by name).
        **named: the same arguments by name, and ``shape``, ``dtype``.

    Other Parameters:
        fn (Callable[..., Tensor]): the constrained function: no argument (mdmm style), or the
            attribute's value when declared with :func:`~manifoldparam.soft.constrain`.
        shape (Sequence[int]): shape of ``fn``'s value: one multiplier per element.
        dtype (torch.dtype | None): dtype of the multipliers and bounds.
        min (float | Tensor): the lower bound of ``fn``.
        scale (float): multiplies the Lagrangian term (default 1).
        damping (float): the penalty :math:`d` (must be > 0).

    Raises:
        ValueError: ``damping`` is not positive, a NaN ``min``, a bad ``scale``.

    Example:
        >>> w = torch.tensor([0.3, 0.4], requires_grad=True)
        >>> c = mp.MinConstraint(lambda: w.norm(), 1.0, damping=10)
        >>> round(float(c().inf), 6)               # Π(fn) − fn = 1 − 0.5
        0.5
    """

    relation = ">="
    bounds = ("min",)
    min: Tensor

    def infeasibility(self, fn_value: Tensor) -> Tensor:
        return fn_value - self.min

    def violation(self, fn_value: Tensor) -> Tensor:
        return fn_value.clamp(min=self.min) - fn_value

    def bound_repr(self) -> str:
        return f">= {fmt(self.min)}"


class MaxConstraintHard(Constraint):
    r"""``fn <= max`` as mdmm's clamp: :math:`c = \min(\mathrm{fn}, \max) - \mathrm{fn}`,
    :math:`\psi = \lambda c + d c^2/2`. No slack; the multiplier only grows while violated
    (an exact-penalty flavour).

    Args:
        *args: ``fn``, ``max``, then ``scale`` and ``damping`` (mdmm's order; also by name).
        **named: the same arguments by name, and ``shape``, ``dtype``.

    Other Parameters:
        fn (Callable[..., Tensor]): the constrained function: no argument (mdmm style), or the
            attribute's value when declared with :func:`~manifoldparam.soft.constrain`.
        shape (Sequence[int]): shape of ``fn``'s value: one multiplier per element.
        dtype (torch.dtype | None): dtype of the multipliers and bounds.
        max (float | Tensor): the upper bound of ``fn``.
        scale (float): multiplies the Lagrangian term (default 1).
        damping (float): the penalty :math:`d` (default 1).

    Raises:
        ValueError: a NaN ``max``, a bad ``scale`` or ``damping``.

    Example:
        >>> c = mp.MaxConstraintHard(lambda: torch.tensor(0.5), 1.0)
        >>> c().inf                                # satisfied: exactly 0
        tensor(0.)
    """

    relation = "<="
    bounds = ("max",)
    max: Tensor

    def infeasibility(self, fn_value: Tensor) -> Tensor:
        return fn_value.clamp(max=self.max) - fn_value

    def bound_repr(self) -> str:
        return f"<= {fmt(self.max)} (hard)"


class MinConstraintHard(Constraint):
    r"""``fn >= min`` as mdmm's clamp: :math:`c = \max(\mathrm{fn}, \min) - \mathrm{fn}`,
    :math:`\psi = \lambda c + d c^2/2`.

    Args:
        *args: ``fn``, ``min``, then ``scale`` and ``damping`` (mdmm's order; also by name).
        **named: the same arguments by name, and ``shape``, ``dtype``.

    Other Parameters:
        fn (Callable[..., Tensor]): the constrained function: no argument (mdmm style), or the
            attribute's value when declared with :func:`~manifoldparam.soft.constrain`.
        shape (Sequence[int]): shape of ``fn``'s value: one multiplier per element.
        dtype (torch.dtype | None): dtype of the multipliers and bounds.
        min (float | Tensor): the lower bound of ``fn``.
        scale (float): multiplies the Lagrangian term (default 1).
        damping (float): the penalty :math:`d` (default 1).

    Raises:
        ValueError: a NaN ``min``, a bad ``scale`` or ``damping``.

    Example:
        >>> c = mp.MinConstraintHard(lambda: torch.tensor(0.25), 1.0)
        >>> c().inf                                # max(0.25, 1) − 0.25
        tensor(0.7500)
    """

    relation = ">="
    bounds = ("min",)
    min: Tensor

    def infeasibility(self, fn_value: Tensor) -> Tensor:
        return fn_value.clamp(min=self.min) - fn_value

    def bound_repr(self) -> str:
        return f">= {fmt(self.min)} (hard)"


class BoundConstraintHard(Constraint):
    r"""``min <= fn <= max`` as mdmm's clamp:
    :math:`c = \mathrm{clamp}(\mathrm{fn}, \min, \max) - \mathrm{fn}`,
    :math:`\psi = \lambda c + d c^2/2`.

    Args:
        *args: ``fn``, ``min`` and ``max``, then ``scale`` and ``damping`` (mdmm's order;
            also by name).
        **named: the same arguments by name, and ``shape``, ``dtype``.

    Other Parameters:
        fn (Callable[..., Tensor]): the constrained function: no argument (mdmm style), or the
            attribute's value when declared with :func:`~manifoldparam.soft.constrain`.
        shape (Sequence[int]): shape of ``fn``'s value: one multiplier per element.
        dtype (torch.dtype | None): dtype of the multipliers and bounds.
        min (float | Tensor): the lower bound of ``fn``.
        max (float | Tensor): the upper bound, ``>= min``.
        scale (float): multiplies the Lagrangian term (default 1).
        damping (float): the penalty :math:`d` (default 1).

    Raises:
        ValueError: ``min > max``, a NaN bound, a bad ``scale`` or ``damping``.

    Example:
        >>> w = torch.tensor([0.5, 0.7])
        >>> c = mp.BoundConstraintHard(lambda: w.mean(), -0.1, 0.1)
        >>> c().inf                                # clamp(0.6, −0.1, 0.1) − 0.6
        tensor(-0.5000)
    """

    relation = "in"
    bounds = ("min", "max")
    min: Tensor
    max: Tensor

    def infeasibility(self, fn_value: Tensor) -> Tensor:
        return fn_value.clamp(self.min, self.max) - fn_value

    def bound_repr(self) -> str:
        return f"in [{fmt(self.min)}, {fmt(self.max)}] (hard)"
