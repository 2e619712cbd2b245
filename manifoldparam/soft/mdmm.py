r"""``MDMM``: the Lagrangian of several constraints, and an optimizer that ascends the multipliers.

.. math::

    \mathcal{L}(\theta, \lambda) = f(\theta) + \sum_i \mathrm{scale}_i\,
        \psi_i(c_i(\theta), \lambda_i), \qquad
    \min_\theta \max_\lambda \mathcal{L}

mdmm's API (``import manifoldparam as mdmm`` runs its README unchanged)::

    constraint = mdmm.EqConstraint(fn_of_params, 1)
    mdmm_module = mdmm.MDMM([constraint])
    opt = mdmm_module.make_optimizer(model.parameters(), lr=2e-3)
    ...
    mdmm_return = mdmm_module(loss)
    opt.zero_grad()
    mdmm_return.value.backward()
    opt.step()

Differences from mdmm 0.1.3, where it is wrong: the multipliers ascend through a
``maximize=True`` param group with no weight decay (never a negative learning rate, which
AdamW's decay, OneCycleLR/CyclicLR and ReduceLROnPlateau break); extra optimizer kwargs reach
the primal parameters only; the inequality kinds have no slack saddle; ``.infs`` is the true
infeasibility. Any optimizer that holds a multiplier is checked before each step (a global
``torch.optim`` step pre-hook, one dictionary lookup per step): descent on a multiplier, a
positive weight decay on one, a non-positive learning rate (e.g. set by a scheduler) or a
line-search / quasi-Newton optimizer holding one raise a :class:`ValueError` that says why
and what to do instead.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn, optim
from torch.optim.optimizer import register_optimizer_step_pre_hook

from manifoldparam._device import value_readable
from manifoldparam._torch import initializing_optimizer_state
from manifoldparam.soft.constraints import Constraint, Multiplier, _is_compiling
from manifoldparam.soft.controller import DUAL_RULES, pi_options, pi_step
from manifoldparam.soft.infeasible import observe

__all__ = ["MDMM", "MDMMReturn", "check_optimizer"]


@dataclass
class MDMMReturn:
    """What :class:`MDMM` returns for one loss.

    Attributes:
        value: the Lagrangian ``loss + Σ scale·ψ(c, λ)``, a 0-dim tensor to backpropagate.
        fn_values: each constraint's ``fn()`` value, in order.
        infs: each constraint's true infeasibility (0 where it holds), in order.
    """

    value: Tensor
    fn_values: list[Tensor]
    infs: list[Tensor]


class MDMM(nn.ModuleList):
    r"""The constraints of one problem; calling it with the loss returns the Lagrangian.

    Args:
        constraints: the constraints (any iterable of :class:`Constraint`).
        check_finite: raise a :class:`ValueError` naming the constraint when a constraint
            term is NaN/Inf (one host sync per call; pass ``False`` to skip it). Skipped
            while a CUDA graph is captured (which cannot read a value on the host) and for
            fake or meta tensors.
        check_infeasible: every this many calls with gradients enabled (training steps),
            snapshot each constraint's multipliers and violation; when over the last
            :data:`~manifoldparam.soft.infeasible.WINDOWS` snapshots the multipliers grew
            steadily while the violation did not fall, warn once
            (:class:`~manifoldparam.soft.InfeasibleWarning`) naming the constraints, and flag
            them in :func:`~manifoldparam.constraint_report`. One host read per this
            many calls; ``0`` turns it off. Skipped where ``check_finite`` is, and while
            ``torch.compile`` traces.

    Example:
        Minimise :math:`\|w\|^2` subject to :math:`w_1 + w_2 = 1`: the solution is
        :math:`w = (1/2, 1/2)` with multiplier :math:`\lambda = 2 w_i = 1`.

        >>> w = nn.Parameter(torch.zeros(2))
        >>> mdmm = mp.MDMM([mp.EqConstraint(lambda: w.sum(), 1.0, damping=1.0)])
        >>> opt = mdmm.make_optimizer([w], optimizer=torch.optim.SGD, lr=0.05)
        >>> for _ in range(1000):
        ...     out = mdmm((w**2).sum())          # the Lagrangian
        ...     opt.zero_grad()
        ...     out.value.backward()
        ...     _ = opt.step()
        >>> w.detach(), mdmm.multipliers()[0].detach()
        (tensor([0.5000, 0.5000]), tensor(1.0000))
    """

    def __init__(
        self,
        constraints: Iterable[Constraint] = (),
        *,
        check_finite: bool = True,
        check_infeasible: int = 100,
    ):
        constraints = list(constraints)
        for i, c in enumerate(constraints):
            if not isinstance(c, Constraint):
                raise TypeError(
                    f"MDMM: item {i} is a {type(c).__name__}, not a constraint; build it with "
                    "EqConstraint / MaxConstraint / ... or manifoldparam.soft.constrain()."
                )
        super().__init__(constraints)
        self.check_finite = check_finite
        if isinstance(check_infeasible, bool) or int(check_infeasible) != check_infeasible:
            raise TypeError(
                f"MDMM(check_infeasible={check_infeasible!r}): give a number of steps between "
                "two checks (e.g. 100), or 0 to turn the check off."
            )
        self.check_infeasible = int(check_infeasible)
        self._calls = 0  # training calls, for check_infeasible's cadence

    def __iter__(self) -> Iterator[Constraint]:  # typed iteration
        return super().__iter__()  # type: ignore[return-value]

    def multipliers(self) -> list[Multiplier]:
        """The Lagrange multipliers, one tensor per constraint, in order."""
        return [c.lmbda for c in self]

    def forward(self, loss: Tensor) -> MDMMReturn:
        """``loss + Σ scale·ψ(c, λ)`` with each ``fn``'s value and true infeasibility."""
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(
                f"MDMM(loss): the loss must be a 0-dim tensor, got {shape}; reduce it first "
                "(e.g. loss.mean())."
            )
        value = loss.clone()
        fn_values, infs = [], []
        total: Tensor | None = None
        for c in self:
            r = c()
            value = value + r.value  # (not in place: a CPU 0-dim loss, CUDA constraint terms)
            total = r.value.detach() if total is None else total + r.value.detach()
            fn_values.append(r.fn_value)
            infs.append(r.inf)
        if (
            self.check_finite
            and total is not None
            and value_readable(total)  # not while a CUDA graph is captured, nor fake/meta
            and not bool(torch.isfinite(total))
        ):
            self._raise_not_finite(fn_values)
        every = self.__dict__.get("check_infeasible", 0)  # (0 for an MDMM pickled before it)
        if every > 0 and total is not None and torch.is_grad_enabled() and not _is_compiling():
            self._calls = self.__dict__.get("_calls", 0) + 1
            if self._calls % every == 0 and value_readable(total):
                observe(list(self), infs, source="forward", steps=every, stacklevel=5)
        return MDMMReturn(value, fn_values, infs)

    def _raise_not_finite(self, fn_values: list[Tensor]) -> None:
        for c, v in zip(self, fn_values, strict=True):
            if not bool(torch.isfinite(v).all()):
                raise ValueError(
                    f"{c.describe()}: fn returned a non-finite value ({v.detach()}); the "
                    "Lagrangian would turn every parameter into NaN. Check fn's inputs "
                    "(division by zero, sqrt/log of 0) or lower the learning rate."
                )
            if not bool(torch.isfinite(c.lmbda).all()):
                raise ValueError(
                    f"{c.describe()}: its multiplier is not finite ({c.lmbda.detach()}); the "
                    f"descent-ascent diverged. {_damping_advice(c)}"
                )
        raise ValueError(
            "MDMM: a constraint term is not finite (the descent-ascent diverged). "
            + _damping_advice(None)
        )

    @torch.no_grad()
    def violation(self) -> Tensor:
        """The largest true infeasibility ``max |projection(fn) - fn|`` over all constraints."""
        vals = [c.violation(c.evaluate()).abs().amax() for c in self]
        return torch.stack(vals).amax() if vals else torch.zeros(())

    def make_optimizer(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        optimizer: Callable[..., optim.Optimizer] = optim.Adamax,
        lr: float = 2e-3,
        dual_lr: float | None = None,
        dual: str = "gda",
        kp: float | None = None,
        nu: float | None = None,
        **optimizer_kwargs: Any,
    ) -> optim.Optimizer:
        """One optimizer: descent on ``params``, ascent on the multipliers.

        Args:
            params: the model's parameters (or parameter groups).
            optimizer: the optimizer class or factory (default Adamax, mdmm's).
            lr: the parameters' learning rate (a group's own ``lr`` wins).
            dual_lr: the multipliers' step; given, it is pinned (schedulers do not move it);
                default ``lr``, scheduled with the parameters'.
            dual: how the multipliers ascend. ``"gda"`` (default, mdmm's): ``optimizer``'s
                own rule with ``maximize=True``, bit for bit mdmm's trajectory. ``"pi"``: the
                νPI controller (:mod:`manifoldparam.soft.controller`), gradient ascent plus a
                proportional term that damps the overshoot and the ringing of the violation;
                its step is ``dual_lr`` (the integral gain) and ``optimizer`` need not accept
                ``maximize``.
            kp, nu: the νPI proportional gain and smoothing (``dual="pi"`` only; defaults
                :data:`~manifoldparam.soft.controller.KP`,
                :data:`~manifoldparam.soft.controller.NU`).
            optimizer_kwargs: ``weight_decay``, ``betas``, ...: for ``params`` only.

        Returns:
            ``optimizer([*param_groups, multipliers_group])``; the multipliers' group has
            ``maximize=True`` and ``weight_decay=0`` (and with ``dual="pi"`` the entries
            ``"dual"``, ``"kp"``, ``"nu"``).

        Raises:
            ValueError: ``optimizer`` has no ``maximize=`` option with ``dual="gda"`` (LBFGS
                and other line-search or second-order optimizers: use the method of
                multipliers, :func:`manifoldparam.soft.dual_update`), an unknown ``dual``,
                or ``kp``/``nu`` out of range.

        Example:
            >>> model = nn.Linear(3, 1)
            >>> mdmm = mp.MDMM([mp.MaxConstraint(lambda: model.weight.norm(), 0.5)])
            >>> opt = mdmm.make_optimizer(model.parameters(), dual="pi", dual_lr=1e-2)
            >>> [len(g["params"]) for g in opt.param_groups]   # the model's, the multipliers'
            [2, 1]
            >>> opt.param_groups[-1]["maximize"], opt.param_groups[-1]["dual"]
            (True, 'pi')
        """
        name = getattr(optimizer, "__name__", None) or type(optimizer).__name__
        if dual not in DUAL_RULES:
            raise ValueError(
                f"MDMM.make_optimizer(dual={dual!r}): choose one of {DUAL_RULES} ('gda': the "
                "optimizer ascends the multipliers, mdmm's; 'pi': the νPI controller)."
            )
        if dual != "pi" and (kp is not None or nu is not None):
            raise ValueError(
                "MDMM.make_optimizer: kp= and nu= are the νPI controller's gains; pass "
                "dual='pi' with them."
            )
        try:
            accepted = inspect.signature(optimizer).parameters
        except (TypeError, ValueError):  # pragma: no cover - builtins without signature
            accepted = {}
        if dual == "gda" and "maximize" not in accepted:
            raise ValueError(
                f"MDMM.make_optimizer(optimizer={name}): it has no maximize= option, so it "
                "cannot ascend the multipliers (and line-search or quasi-Newton methods "
                "diverge on a Lagrangian that is linear in them). Use the method of "
                f"multipliers: {name} on the model's parameters alone, minimising "
                "mdmm(loss).value, then manifoldparam.soft.dual_update(mdmm) after each solve. "
                "(A first-order optimizer without maximize=, such as geoopt's, works with "
                "dual='pi'.)"
            )
        params = list(params)
        if params and isinstance(params[0], dict):
            groups = [{**optimizer_kwargs, **g} for g in params]
        else:
            groups = [{"params": params, **optimizer_kwargs}]
        for g in groups:
            g.setdefault("lr", lr)
        group: dict[str, Any] = {
            "params": self.multipliers(),
            "lr": lr if dual_lr is None else dual_lr,
            "maximize": True,
        }
        if dual_lr is not None:
            group["pinned_lr"] = float(dual_lr)
        if "weight_decay" in accepted:
            group["weight_decay"] = 0.0
        if dual == "pi":
            group.update(pi_options(kp, nu))
        return optimizer([*groups, group])


def _damping_advice(c: Constraint | None) -> str:
    """What to change, in both directions: damping damps the oscillation of fn and λ, and
    makes the Lagrangian stiffer. Measured on min 0 s.t. x = 1 with SGD lr 0.05: d = 0 rings
    up to |c| = 50 in 4000 steps, d = 2 settles in 323 without overshoot, d = 10 takes 1824,
    d = 41 diverges (lr·d > 2)."""
    d = f"damping={float(c.damping):g}" if c is not None else "damping"
    return (
        f"If the violation oscillated with a growing amplitude first, {d} is too small to "
        "damp the multiplier's oscillation: raise it. If it blew up within a few steps, or "
        f"{d} is large, the damping makes the problem too stiff for the step (plain SGD needs "
        "lr·scale·damping·|∇fn|² < 2): lower the damping or the learning rate."
    )


# ---------------------------------------------------------------------------- the guard
_MULTIPLIER_GROUPS: weakref.WeakKeyDictionary[optim.Optimizer, tuple[int, tuple[int, ...]]] = (
    weakref.WeakKeyDictionary()
)


def _multiplier_groups(optimizer: optim.Optimizer) -> tuple[int, ...]:
    return tuple(
        i
        for i, g in enumerate(optimizer.param_groups)
        if any(isinstance(p, Multiplier) for p in g["params"])
    )


def check_optimizer(optimizer: optim.Optimizer) -> None:
    """Raise a :class:`ValueError` if ``optimizer`` would mishandle a Lagrange multiplier.

    Runs before every ``optimizer.step()`` of every optimizer (a global step pre-hook that
    :mod:`manifoldparam.soft` installs); it scans the parameter groups once per optimizer and
    per change in their number, then only re-reads the multiplier groups' hyperparameters.
    """
    groups = optimizer.param_groups
    cached = _MULTIPLIER_GROUPS.get(optimizer)
    if cached is None or cached[0] != len(groups):
        cached = (len(groups), _multiplier_groups(optimizer))
        _MULTIPLIER_GROUPS[optimizer] = cached
    for i in cached[1]:
        g = groups[i]
        kind = type(optimizer).__name__
        if "maximize" not in g:
            raise ValueError(
                f"{kind} holds Lagrange multipliers, but its parameter groups have no "
                "maximize= option, so it would descend on them; and line-search or "
                "quasi-Newton optimizers diverge on the Lagrangian, which is linear in the "
                "multipliers. Give it the model's parameters only, minimise mdmm(loss).value "
                "(the augmented Lagrangian at fixed multipliers), and call "
                "manifoldparam.soft.dual_update(mdmm) after each solve (method of multipliers)."
            )
        if not g["maximize"]:
            raise ValueError(
                f"{kind} param group {i} holds Lagrange multipliers with maximize=False: it "
                "would descend on them and the multipliers would run away. Build the optimizer "
                "with MDMM.make_optimizer(params, optimizer=...), which ascends them."
            )
        if g.get("weight_decay", 0.0):
            raise ValueError(
                f"{kind} param group {i} holds Lagrange multipliers with weight_decay="
                f"{g['weight_decay']}: decay biases the multipliers and the constraints are "
                "not met. Set that group's weight_decay to 0 (MDMM.make_optimizer does)."
            )
        if "pinned_lr" in g:  # make_optimizer(dual_lr=...): schedulers do not move it
            g["lr"] = g["pinned_lr"]
        lr = g["lr"]
        if not isinstance(lr, Tensor) and lr <= 0 and not initializing_optimizer_state():
            raise ValueError(
                f"{kind} param group {i} holds Lagrange multipliers with lr={lr}: they ascend "
                "through maximize=True and need a positive lr. A learning-rate scheduler that "
                "sets it (mdmm's negative-lr trick, ReduceLROnPlateau's min_lr=0) must leave "
                "it positive; e.g. give that scheduler a per-group min_lr > 0."
            )


def _step_pre_hook(optimizer: optim.Optimizer, args: Any, kwargs: Any) -> None:
    check_optimizer(optimizer)
    groups = optimizer.param_groups
    closure = args[1] if len(args) > 1 else kwargs.get("closure")  # (args[0] is optimizer)
    for i in _MULTIPLIER_GROUPS[optimizer][1]:
        if groups[i].get("dual") == "pi":
            if closure is not None:
                raise ValueError(
                    f"{type(optimizer).__name__}.step(closure) with dual='pi': the νPI "
                    "controller updates the multipliers before the step from their gradients, "
                    "which a closure computes only inside it. Call backward() and then step() "
                    "without a closure (or use dual='gda')."
                )
            # The rule of the multipliers' group; it clears their gradients, so the
            # optimizer's own rule (which skips a parameter without one) leaves them alone.
            pi_step(groups[i], optimizer.state)


_HOOK = register_optimizer_step_pre_hook(_step_pre_hook)
