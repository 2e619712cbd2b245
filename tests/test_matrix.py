"""The compatibility matrix: every optimizer x every way of evaluating constraints.

Rows: torch.optim (plain, foreach, fused, LBFGS), geoopt, torchzero, torchmin, scipy.
Columns:

* ``hard``   -- a model with all four hard constraints (orthogonal, SPD, box, orthant);
* ``cached`` -- the same, every evaluation inside ``manifoldparam.cached()`` (one block around
  the whole first-order loop, so ``optimizer.step()`` happens inside it) or through
  ``cached_closure`` for optimizers that call a closure;
* ``auto``   -- the same with ``manifoldparam.auto_cache(model)``;
* ``soft``   -- the same model plus two soft constraints (an equality and an active
  inequality) through MDMM: ascent with ``maximize=True`` where the optimizer has it, the
  method of multipliers (``dual_update`` between solves) where it does not, native scipy
  constraints for SLSQP / trust-constr.

Each cell asserts that every hard constraint holds (geoopt oracles in float64) and:

* ``hard`` / ``cached`` / ``auto``: the loss fell to less than half of its start; the
  cached/automatic runs end at the same parameters as the uncached run (a stale cache would
  not);
* ``soft``: the largest true infeasibility is below ``SOFT_TOL`` and the loss is within
  ``SOFT_LOSS_FACTOR`` of the constrained optimum (:func:`constrained_optimum`: SLSQP run to
  convergence from the same start). The start is infeasible (violation 0.91), so its loss
  says nothing about the constrained problem; the optimum does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import manifoldparam as mp
from manifoldparam.caching import auto_cache, cached, cached_closure
from manifoldparam.interop import scipy_minimize
from manifoldparam.soft import MDMM, constrain, dual_update, rms, soft_constraints
from tests.conftest import assert_on_stiefel, assert_spd

# torchmin's Hessian methods call backward(create_graph=True) on the parameters themselves
pytestmark = pytest.mark.filterwarnings(
    "ignore:Using backward\\(\\) with create_graph=True:UserWarning"
)
DTYPE = torch.float64
LOW, HIGH = -0.5, 0.5
EQ_SUM = 0.5  # soft: sum(fc3.bias) == 0.5
MAX_RMS = 0.3  # soft: rms(fc2.weight) <= 0.3 (active: the unconstrained fit wants more)
SOFT_TOL = 1e-3  # soft feasibility: largest true infeasibility
#: soft optimality: final loss <= this times the constrained optimum (0.0154). The problem is
#: non-convex and the cells stop after a few seconds, so they end in different local minima
#: or short of one (measured: 1.25x to 2.55x); a solver that only finds feasibility, or
#: stalls, does not (torchmin newton-exact without its Tikhonov term stalled at 6.3x).
SOFT_LOSS_FACTOR = 3.0
MODES = ("hard", "cached", "auto", "soft")
#: Solvers whose path amplifies 1e-17 round-off (the order of a gradient sum) to ~1e-3 in
#: the parameters: their cached runs are compared by final loss, not bit pattern.
ROUNDOFF_SENSITIVE = frozenset({"scipy-trust-constr"})


class Net(nn.Module):
    """5 -> 5 -> 5 -> 2 with every hard constraint kind."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 5, dtype=DTYPE)
        self.fc2 = nn.Linear(5, 5, bias=False, dtype=DTYPE)
        self.fc3 = nn.Linear(5, 2, dtype=DTYPE)
        mp.orthogonal(self.fc1)
        mp.bounded(self.fc1, "bias", low=LOW, high=HIGH)
        mp.spd(self.fc2)
        mp.nonnegative(self.fc3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def total(w: Tensor) -> Tensor:
    """The sum of the entries (a named function: the model stays picklable)."""
    return w.sum()


@functools.cache
def data() -> tuple[Tensor, Tensor]:
    torch.manual_seed(1)
    teacher = Net()
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(3.0)
        x = torch.randn(64, 5, dtype=DTYPE)
        return x, teacher(x)


@dataclass
class Problem:
    model: Net
    mdmm: MDMM | None

    def loss(self) -> Tensor:
        x, y = data()
        return ((self.model(x) - y) ** 2).mean()

    def objective(self) -> Tensor:
        """What the optimizer minimises: the loss, or the (augmented) Lagrangian."""
        loss = self.loss()
        return loss if self.mdmm is None else self.mdmm(loss).value


def make_problem(mode: str) -> Problem:
    torch.manual_seed(0)
    model = Net()
    mdmm = None
    if mode == "soft":
        constrain(model.fc3, "bias", total, eq=EQ_SUM, damping=10.0)
        constrain(model.fc2, "weight", rms, max=MAX_RMS, damping=10.0)
        mdmm = MDMM(soft_constraints(model))
    if mode == "auto":
        auto_cache(model)
    return Problem(model, mdmm)


# ------------------------------------------------------------------------ the optimizers
Runner = Callable[[Problem, str], None]


def _closure_for(problem: Problem, opt: Any, mode: str, *, backward_kw: bool = False) -> Any:
    if backward_kw:  # torchzero: closure(backward=True)

        def closure(backward: bool = True) -> Tensor:
            value = problem.objective()
            if backward:
                opt.zero_grad()
                value.backward()
            return value

    else:  # torch.optim.LBFGS

        def closure() -> Tensor:  # type: ignore[misc]
            opt.zero_grad()
            value = problem.objective()
            value.backward()
            return value

    return cached_closure(closure) if mode == "cached" else closure


@dataclass(frozen=True)
class Soft:
    """How a first-order runner treats the soft column: its lr, the multipliers' lr, steps."""

    lr: float | None = None  # None: the hard column's lr
    dual_lr: float | None = None  # None: the same as lr
    steps: int = 300
    every: int = 30  # GDA only: optimizer steps between two dual_update calls
    #: ExponentialLR factor per step on the primal lr (the multipliers' lr stays pinned).
    decay: float | None = None


def _loop(
    problem: Problem, opt: Any, steps: int, mode: str, every: int = 0, decay: float | None = None
) -> None:
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, decay) if decay else None
    with cached() if mode == "cached" else _null():  # optimizer.step() inside the block
        for t in range(steps):
            value = problem.objective()
            opt.zero_grad()
            value.backward()
            opt.step()
            if sched is not None:
                sched.step()
            if every and (t + 1) % every == 0 and problem.mdmm is not None:
                dual_update(problem.mdmm)


def first_order(
    cls: Callable[..., torch.optim.Optimizer], steps: int, soft: Soft = Soft(), **kw: Any
) -> Runner:
    """torch.optim-style: ``maximize=True`` multipliers through ``MDMM.make_optimizer``."""

    def run(problem: Problem, mode: str) -> None:
        params = problem.model.parameters()
        if problem.mdmm is None:
            _loop(problem, cls(params, **kw), steps, mode)
            return
        rest = dict(kw)
        lr = rest.pop("lr") if soft.lr is None else soft.lr
        rest.pop("lr", None)
        opt = problem.mdmm.make_optimizer(
            params, optimizer=functools.partial(cls, **rest), lr=lr, dual_lr=soft.dual_lr
        )
        _loop(problem, opt, soft.steps, mode, decay=soft.decay)

    return run


def gda(
    cls: Callable[..., torch.optim.Optimizer], steps: int, soft: Soft = Soft(), **kw: Any
) -> Runner:
    """First-order optimizers without ``maximize=`` (geoopt): ``dual_update`` every few steps."""

    def run(problem: Problem, mode: str) -> None:
        if problem.mdmm is None:
            _loop(problem, cls(problem.model.parameters(), **kw), steps, mode)
            return
        lr = kw["lr"] if soft.lr is None else soft.lr
        opt = cls(problem.model.parameters(), **{**kw, "lr": lr})
        _loop(problem, opt, soft.steps, mode, every=soft.every)

    return run


def method_of_multipliers(solve: Callable[[Problem, str], None], rounds: int = 25) -> Runner:
    """One solve without soft constraints. With them, the method of multipliers as users run
    it: solve, and while infeasible, ``dual_update`` and solve again (at most ``rounds``)."""

    def run(problem: Problem, mode: str) -> None:
        solve(problem, mode)
        if problem.mdmm is None:
            return
        for _ in range(rounds - 1):
            if float(problem.mdmm.violation()) < SOFT_TOL / 2:
                return
            dual_update(problem.mdmm)
            solve(problem, mode)

    return run


def lbfgs(max_iter: int) -> Runner:
    def solve(problem: Problem, mode: str) -> None:
        opt = torch.optim.LBFGS(
            problem.model.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe"
        )
        opt.step(_closure_for(problem, opt, mode))

    return method_of_multipliers(solve)


def torchzero(chain: Callable[[], list[Any]], steps: int) -> Runner:
    def solve(problem: Problem, mode: str) -> None:
        tz = pytest.importorskip("torchzero")
        opt = tz.Optimizer(problem.model.parameters(), *chain())
        closure = _closure_for(problem, opt, mode, backward_kw=True)
        for _ in range(steps):
            opt.step(closure)

    return method_of_multipliers(solve)


def torchmin(method: str, max_iter: int, **options: Any) -> Runner:
    def solve(problem: Problem, mode: str) -> None:
        tm = pytest.importorskip("torchmin")
        opt = tm.Minimizer(
            problem.model.parameters(), method=method, max_iter=max_iter, options=options
        )

        def closure() -> Tensor:  # torchmin differentiates itself: no backward here
            opt.zero_grad()
            return problem.objective()

        opt.step(cached_closure(closure) if mode == "cached" else closure)

    return method_of_multipliers(solve)


def scipy(method: str, maxiter: int, native: bool = False) -> Runner:
    def solve(problem: Problem, mode: str, constraints: Any = ()) -> None:
        pytest.importorskip("scipy")
        objective = problem.loss if constraints else problem.objective
        if mode == "cached":
            objective = cached_closure(objective)
        scipy_minimize(
            objective,
            problem.model,
            method=method,
            constraints=constraints,
            options={"maxiter": maxiter},
        )

    if native:  # soft constraints as scipy constraints, no multipliers of ours

        def run(problem: Problem, mode: str) -> None:
            solve(problem, mode, list(problem.mdmm) if problem.mdmm is not None else ())

        return run
    return method_of_multipliers(solve)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _geoopt(name: str) -> Callable[..., torch.optim.Optimizer]:
    def make(params: Any, **kw: Any) -> torch.optim.Optimizer:
        geoopt = pytest.importorskip("geoopt")
        return getattr(geoopt.optim, name)(params, **kw)

    return make


def _tz(*names_and_args: tuple[str, dict[str, Any]]) -> Callable[[], list[Any]]:
    def chain() -> list[Any]:
        tz = pytest.importorskip("torchzero")
        return [getattr(tz.m, n)(**a) for n, a in names_and_args]

    return chain


optim = torch.optim
SGD_SOFT = Soft(lr=0.1, dual_lr=2.0)  # the damped Lagrangian is stiffer than the loss
OPTIMIZERS: dict[str, Runner] = {
    "SGD": first_order(optim.SGD, 60, SGD_SOFT, lr=0.5, momentum=0.9),
    "SGD-fused": first_order(optim.SGD, 60, SGD_SOFT, lr=0.5, momentum=0.9, fused=True),
    "Adam": first_order(optim.Adam, 60, lr=0.05),
    "Adam-foreach": first_order(optim.Adam, 60, lr=0.05, foreach=True),
    "Adam-fused": first_order(optim.Adam, 60, lr=0.05, fused=True),
    "AdamW": first_order(optim.AdamW, 60, lr=0.05),
    "AdamW-fused": first_order(optim.AdamW, 60, lr=0.05, fused=True),
    # RMSprop's short-memory normaliser (alpha=0.99) makes every step ~lr long however small
    # the gradient: at a constant lr the constraint oscillates (1e-4..5e-3 violation, chaotic
    # in round-off). Decaying the primal lr ends it; the multipliers' lr stays pinned.
    "RMSprop": first_order(
        optim.RMSprop, 60, Soft(lr=0.02, dual_lr=0.05, steps=300, decay=0.99), lr=0.01
    ),
    "Adamax": first_order(optim.Adamax, 60, Soft(dual_lr=0.2), lr=0.05),
    "LBFGS": lbfgs(20),
    "geoopt-RiemannianAdam": gda(_geoopt("RiemannianAdam"), 60, lr=0.05),
    "geoopt-RiemannianSGD": gda(
        _geoopt("RiemannianSGD"), 60, Soft(lr=0.05, steps=600), lr=0.5, momentum=0.9
    ),
    "torchzero-Adam": torchzero(_tz(("Adam", {}), ("LR", {"lr": 0.02})), 100),
    # 25 iterations per solve: at 15 their soft loss ranged over 2.0x-2.6x the optimum when
    # the start moved by 1e-12 (round-off in the maps), too close to SOFT_LOSS_FACTOR.
    "torchzero-BFGS": torchzero(_tz(("BFGS", {}), ("StrongWolfe", {})), 25),
    "torchmin-bfgs": torchmin("bfgs", 25),
    "torchmin-l-bfgs": torchmin("l-bfgs", 15),
    # The Hessian is indefinite here (least eigenvalue -0.04 at the start); torchmin's default
    # then takes a plain gradient step, which crawls on the damped Lagrangian (largest
    # eigenvalue 21 against 1 for the loss): loss stuck at 6x the optimum. A Tikhonov term
    # above 0.04 (Levenberg-Marquardt) keeps every Cholesky factorisation succeeding.
    "torchmin-newton-exact": torchmin("newton-exact", 5, tikhonov=0.1),
    "torchmin-trust-krylov": torchmin("trust-krylov", 8),
    "scipy-L-BFGS-B": scipy("L-BFGS-B", 20),
    "scipy-trust-ncg": scipy("trust-ncg", 10),
    "scipy-SLSQP": scipy("SLSQP", 40, native=True),
    "scipy-trust-constr": scipy("trust-constr", 40, native=True),
}


# ------------------------------------------------------------------------ the checks
def assert_hard_constraints(model: Net) -> None:
    assert_on_stiefel(model.fc1.weight)
    assert_spd(model.fc2.weight)
    bias = model.fc1.bias.detach()
    assert bool(((bias >= LOW) & (bias <= HIGH)).all()), bias
    assert bool((model.fc3.weight >= 0).all())
    for p in model.parameters():
        assert bool(torch.isfinite(p).all())


def _final_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@functools.cache
def reference(name: str) -> tuple[float, float, dict[str, Tensor]]:
    """The uncached run of ``name``: initial loss, final loss, final state."""
    problem = make_problem("hard")
    with torch.no_grad():
        start = float(problem.loss())
    OPTIMIZERS[name](problem, "hard")
    with torch.no_grad():
        end = float(problem.loss())
    return start, end, _final_state(problem.model)


@functools.cache
def constrained_optimum() -> float:
    """The soft column's yardstick: SLSQP with the soft constraints as native constraints,
    run to convergence from the cells' start (the loss of a feasible local minimum)."""
    problem = make_problem("soft")
    assert problem.mdmm is not None
    res = scipy_minimize(
        problem.loss,
        problem.model,
        method="SLSQP",
        constraints=list(problem.mdmm),
        options={"maxiter": 1000},
    )
    assert res.success, res.message
    with torch.no_grad():
        assert float(problem.mdmm.violation()) < 1e-6
        return float(problem.loss())


@pytest.mark.parametrize(
    ("name", "mode"),
    [pytest.param(name, mode, id=f"{name}-{mode}") for name in OPTIMIZERS for mode in MODES],
)
def test_cell(name: str, mode: str) -> None:
    start, end, ref_state = reference(name)
    if mode == "hard":
        assert end < 0.5 * start, f"{name}: loss {start:.4g} -> {end:.4g}"
        problem = make_problem("hard")
        problem.model.load_state_dict(ref_state)
        assert_hard_constraints(problem.model)
        return

    problem = make_problem(mode)
    OPTIMIZERS[name](problem, mode)
    with torch.no_grad():
        final = float(problem.loss())
    assert_hard_constraints(problem.model)
    if mode in ("cached", "auto"):
        assert final < 0.5 * start, f"{name}: loss {start:.4g} -> {final:.4g} ({mode})"
        if name in ROUNDOFF_SENSITIVE:
            # same values and HVPs up to 1e-17 (test_interop_scipy), amplified by the solver
            assert abs(final - end) <= 0.05 * end, f"{name}: {final:.6g} vs uncached {end:.6g}"
            return
        # a stale cache (pre-step weight, grad=None, ...) would train differently
        state = _final_state(problem.model)
        for k, v in ref_state.items():
            torch.testing.assert_close(state[k], v, rtol=1e-6, atol=1e-8, msg=k)
        return
    assert problem.mdmm is not None
    with torch.no_grad():
        worst = float(problem.mdmm.violation())
        fc3_sum = float(problem.model.fc3.bias.sum())
        fc2_rms = float(rms(problem.model.fc2.weight))
    assert worst < SOFT_TOL, f"{name}: soft violation {worst:.3e} (sum {fc3_sum}, rms {fc2_rms})"
    assert abs(fc3_sum - EQ_SUM) < SOFT_TOL and fc2_rms < MAX_RMS + SOFT_TOL
    optimum = constrained_optimum()
    assert final <= SOFT_LOSS_FACTOR * optimum, (
        f"{name}: loss {final:.4g} with soft constraints, {final / optimum:.2f}x the "
        f"constrained optimum {optimum:.4g}"
    )
