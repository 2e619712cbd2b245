"""The soft-constraint methods side by side on one problem: ours and the peers' adapters.

A :class:`Problem` says what to minimise and what must hold: ``loss()``, the equalities
``eq() == 0`` and the inequalities ``ineq() <= 0`` (vectors, either may be ``None``). Each
method builds its optimizer state on a problem and returns ``step() -> loss``: one full step
(forward, backward, primal and dual update). Every method gets the same primal optimizer
(``torch.optim.Adam`` at ``lr``) and the same dual step ``dual_lr`` where it has one:

* ``mdmm``: mdmm 0.1.3's ``make_optimizer`` with Adam (the multipliers ascend by Adam at
  ``lr``, mdmm's design), damping ``rho``;
* ``cooper GDA`` / ``cooper νPI``: cooper-optim's Lagrangian formulation with an SGD(maximize)
  or its ``nuPI`` dual optimizer at ``dual_lr``, simultaneous updates;
* ``humancompatible ALM``: humancompatible-train's ALM dual optimizer (quadratic
  augmentation, penalty ``rho``) at ``dual_lr``;
* ``ours GDA`` / ``ours PI``: ``MDMM.make_optimizer(dual="gda" | "pi", dual_lr=...)``,
  damping ``rho``; ``+ restoration``: :func:`manifoldparam.soft.restore_feasibility` after each
  step on the problem's parameters (with the problem's ``restore`` options); ``+ tangent``:
  :func:`manifoldparam.soft.tangent_gradients` between ``backward()`` and the step as well.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

import manifoldparam.soft as soft

Step = Callable[[], Tensor]


@dataclass
class Problem:
    """What to minimise (``loss``) subject to ``eq() == 0`` and ``ineq() <= 0``."""

    model: nn.Module
    loss: Callable[[], Tensor]
    eq: Callable[[], Tensor] | None = None
    ineq: Callable[[], Tensor] | None = None
    #: Options of ``restore_feasibility`` for this problem (an L1 budget: keep_sign, iters).
    restore: dict[str, Any] = field(default_factory=dict)

    @torch.no_grad()
    def violation(self) -> Tensor:
        """The largest violation: ``max(|eq|, relu(ineq))`` (a 0-dim tensor)."""
        vs = []
        if self.eq is not None:
            vs.append(self.eq().abs().amax())
        if self.ineq is not None:
            vs.append(self.ineq().clamp_min(0).amax())
        return torch.stack(vs).amax()


@dataclass(frozen=True)
class Setting:
    """The hyperparameters every method shares."""

    lr: float
    dual_lr: float
    rho: float = 1.0  # damping / augmented-Lagrangian penalty, where the method has one
    kp: float | None = None  # the νPI proportional gain (None: our default, for cooper too)


def _entry(fn: Callable[[], Tensor], i: int) -> Tensor:
    return fn().reshape(-1)[i]


def _count(fn: Callable[[], Tensor] | None) -> int:
    if fn is None:
        return 0
    with torch.no_grad():
        return int(fn().numel())


def _with(step: Step, multipliers: list[Tensor]) -> Step:
    """``step`` with its method's multiplier tensors as ``step.multipliers`` (for overshoot)."""
    step.multipliers = multipliers  # type: ignore[attr-defined]
    return step


def _loop(
    problem: Problem,
    opt: torch.optim.Optimizer,
    lagrangian: Callable[[Tensor], Tensor],
    after: Callable[[], object] = lambda: None,
    before: Callable[[], object] = lambda: None,
) -> Step:
    def step() -> Tensor:
        loss = problem.loss()
        value = lagrangian(loss)
        opt.zero_grad()
        value.backward()
        before()
        opt.step()
        after()
        return loss.detach()

    return step


def ours(
    dual: str, restore: bool = False, tangent: bool = False
) -> Callable[[Problem, Setting], Step]:
    def build(problem: Problem, s: Setting) -> Step:
        cs: list[soft.Constraint] = []
        if problem.eq is not None:
            n = _count(problem.eq)
            cs.append(soft.EqConstraint(problem.eq, 0.0, damping=s.rho, shape=(n,)))
        if problem.ineq is not None:
            n = _count(problem.ineq)
            cs.append(soft.MaxConstraint(problem.ineq, 0.0, damping=s.rho, shape=(n,)))
        mdmm = soft.MDMM(cs, check_finite=False, check_infeasible=0)
        extra = {"kp": s.kp} if dual == "pi" else {}
        opt = mdmm.make_optimizer(
            problem.model.parameters(),
            optimizer=torch.optim.Adam,
            lr=s.lr,
            dual_lr=s.dual_lr,
            dual=dual,
            **extra,
        )
        params = [p for p in problem.model.parameters() if p.requires_grad]

        def after() -> None:
            if restore:
                soft.restore_feasibility(mdmm, params, **problem.restore)

        def before() -> None:
            if tangent:  # the gradient along the constraints (near them), then the step
                soft.tangent_gradients(mdmm, params)

        loop = _loop(problem, opt, lambda loss: mdmm(loss).value, after, before)
        return _with(loop, mdmm.multipliers())

    return build


def mdmm_peer(problem: Problem, s: Setting) -> Step:
    """mdmm 0.1.3 as its README says; Adam ascends the multipliers at ``lr``."""
    import mdmm

    cs = []
    for i in range(_count(problem.eq)):
        cs.append(mdmm.EqConstraint(partial(_entry, problem.eq, i), 0.0, damping=s.rho))
    for i in range(_count(problem.ineq)):
        cs.append(mdmm.MaxConstraint(partial(_entry, problem.ineq, i), 0.0, damping=s.rho))
    module = mdmm.MDMM(cs)
    opt = module.make_optimizer(problem.model.parameters(), optimizer=torch.optim.Adam, lr=s.lr)
    lams = [c.lmbda for c in module]
    return _with(_loop(problem, opt, lambda loss: module(loss).value), lams)


def cooper_peer(pi: bool) -> Callable[[Problem, Setting], Step]:
    """cooper-optim 1.x, Lagrangian formulation; SGD(maximize) or nuPI on the multipliers."""

    def build(problem: Problem, s: Setting) -> Step:
        import cooper

        kinds = []
        if problem.eq is not None:
            kinds.append((cooper.ConstraintType.EQUALITY, problem.eq))
        if problem.ineq is not None:
            kinds.append((cooper.ConstraintType.INEQUALITY, problem.ineq))

        class CMP(cooper.ConstrainedMinimizationProblem):
            def __init__(self) -> None:
                super().__init__()
                self.cs = [
                    (
                        cooper.Constraint(
                            kind,
                            formulation_type=cooper.formulations.Lagrangian,
                            multiplier=cooper.multipliers.DenseMultiplier(
                                num_constraints=_count(fn)
                            ),
                        ),
                        fn,
                    )
                    for kind, fn in kinds
                ]
                for i, (c, _) in enumerate(self.cs):
                    setattr(self, f"c{i}", c)

            def compute_cmp_state(self) -> cooper.CMPState:
                observed = {
                    c: cooper.ConstraintState(violation=fn().reshape(-1)) for c, fn in self.cs
                }
                return cooper.CMPState(loss=problem.loss(), observed_constraints=observed)

        cmp = CMP()
        primal = torch.optim.Adam(problem.model.parameters(), lr=s.lr)
        if pi:
            from cooper.optim import nuPI

            from manifoldparam.soft.controller import KP

            dual = nuPI(
                cmp.dual_parameters(),
                lr=s.dual_lr,
                Kp=KP if s.kp is None else s.kp,
                Ki=1.0,
                maximize=True,
            )
        else:
            dual = torch.optim.SGD(cmp.dual_parameters(), lr=s.dual_lr, maximize=True)
        opt = cooper.optim.SimultaneousOptimizer(
            cmp=cmp, primal_optimizers=primal, dual_optimizers=dual
        )

        def step() -> Tensor:
            return opt.roll().cmp_state.loss.detach()

        return _with(step, list(cmp.dual_parameters()))

    return build


def hct_peer(problem: Problem, s: Setting) -> Step:
    """humancompatible-train: ALM dual optimizer (quadratic augmentation), forward_update."""
    from humancompatible.train.dual_optim import ALM

    groups = [(fn, False) for fn in (problem.eq,) if fn is not None]
    groups += [(fn, True) for fn in (problem.ineq,) if fn is not None]
    (fn0, ineq0), *rest = groups
    dual = ALM(m=_count(fn0), lr=s.dual_lr, penalty=s.rho, augmentation="quadratic", is_ineq=ineq0)
    for fn, ineq in rest:
        dual.add_constraint_group(m=_count(fn), lr=s.dual_lr, is_ineq=ineq)
    opt = torch.optim.Adam(problem.model.parameters(), lr=s.lr)

    def step() -> Tensor:
        loss = problem.loss()
        lag = dual.forward_update(loss, [fn().reshape(-1) for fn, _ in groups])
        opt.zero_grad()
        lag.backward()
        opt.step()
        return loss.detach()

    return _with(step, [p for g in dual.param_groups for p in g["params"]])


def unconstrained(problem: Problem, s: Setting) -> Step:
    opt = torch.optim.Adam(problem.model.parameters(), lr=s.lr)
    return _loop(problem, opt, lambda loss: loss)


METHODS: dict[str, Callable[[Problem, Setting], Step]] = {
    "unconstrained": unconstrained,
    "mdmm": mdmm_peer,
    "cooper GDA": cooper_peer(pi=False),
    "cooper νPI": cooper_peer(pi=True),
    "humancompatible ALM": hct_peer,
    "ours GDA": ours("gda"),
    "ours PI": ours("pi"),
    "ours PI + restoration": ours("pi", restore=True),
    "ours PI + tangent + restoration": ours("pi", restore=True, tangent=True),
}
