"""Multipliers and optimizers: maximize=True groups, AdamW, schedulers, refusals."""

from __future__ import annotations

import functools
import io

import pytest
import torch
from torch import nn

from manifoldparam.interop import load_training_state, training_state
from manifoldparam.soft import MDMM, EqConstraint, MaxConstraint, check_optimizer

DT = torch.float64
TARGET = torch.tensor([2.0, 1.0], dtype=DT)


def problem(damping: float = 1.0) -> tuple[nn.Parameter, MDMM]:
    """min (x-2)² + (y-1)² s.t. x + y = 1: (1, 0), λ = -2."""
    xy = nn.Parameter(torch.zeros(2, dtype=DT))
    return xy, MDMM([EqConstraint(lambda: xy.sum(), 1.0, damping=damping, dtype=DT)])


def train(xy, mdmm, opt, steps: int, sched=None) -> None:
    for _ in range(steps):
        out = mdmm(((xy - TARGET) ** 2).sum())
        opt.zero_grad()
        out.value.backward()
        opt.step()
        if sched is not None:
            sched.step()


def test_groups_maximize_and_kwargs_reach_primal_only() -> None:
    xy, mdmm = problem()
    opt = mdmm.make_optimizer(
        [xy], optimizer=torch.optim.AdamW, lr=1e-2, weight_decay=0.3, betas=(0.8, 0.9)
    )
    primal, dual = opt.param_groups
    assert primal["weight_decay"] == 0.3 and primal["betas"] == (0.8, 0.9)
    assert primal["maximize"] is False
    assert dual["maximize"] is True and dual["weight_decay"] == 0.0 and dual["lr"] == 1e-2
    assert dual["params"] == mdmm.multipliers()


def test_adamw_default_decay_does_not_touch_multipliers() -> None:
    """AdamW's default weight_decay=0.01 would make mdmm's λ grow; here λ is undecayed."""
    xy, mdmm = problem()
    opt = mdmm.make_optimizer([xy], optimizer=torch.optim.AdamW, lr=2e-2)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.998)
    train(xy, mdmm, opt, 3000, sched)
    assert opt.param_groups[0]["weight_decay"] == 0.01  # AdamW's default, primal only
    assert opt.param_groups[1]["weight_decay"] == 0.0
    assert abs(xy.sum().item() - 1) < 1e-3  # decay shifts the optimum a little, not c = 0
    assert abs(mdmm[0].lmbda.item() + 2) < 5e-2


@pytest.mark.parametrize("kind", ["onecycle", "cyclic", "plateau"])
def test_schedulers_keep_ascent(kind) -> None:
    """Schedulers that overwrite every group's lr (mdmm's negative lr breaks) are harmless."""
    xy, mdmm = problem(damping=2.0)
    opt = mdmm.make_optimizer([xy], optimizer=torch.optim.SGD, lr=2e-2, momentum=0.5)
    steps = 2000
    if kind == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-2, total_steps=steps)
    elif kind == "cyclic":
        sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=1e-2, max_lr=5e-2, step_size_up=100)
    else:
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=300, factor=0.5)
    for _ in range(steps):
        out = mdmm(((xy - TARGET) ** 2).sum())
        opt.zero_grad()
        out.value.backward()
        opt.step()
        sched.step(out.value.item()) if kind == "plateau" else sched.step()
    assert opt.param_groups[1]["lr"] > 0  # mdmm's -lr becomes max(-lr·f, min_lr=0) = 0
    tol = 2e-2 if kind == "plateau" else 1e-3  # plateau has decayed the lr to ~3e-4 by then
    assert abs(xy.sum().item() - 1) < tol
    assert abs(mdmm[0].lmbda.item() + 2) < 5 * tol


def test_pinned_dual_lr_survives_a_schedule() -> None:
    xy, mdmm = problem()
    opt = mdmm.make_optimizer([xy], optimizer=torch.optim.Adam, lr=1e-2, dual_lr=5e-2)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    train(xy, mdmm, opt, 5, sched)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**5)
    opt.step()  # the pre-step hook restores the multipliers' lr before the step
    assert opt.param_groups[1]["lr"] == 5e-2


def test_scheduler_zeroing_the_multiplier_lr_is_refused() -> None:
    xy, mdmm = problem()
    opt = mdmm.make_optimizer([xy], optimizer=torch.optim.Adam, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step < 3 else 0.0)
    train(xy, mdmm, opt, 3, sched)
    with pytest.raises(ValueError, match="positive lr"):
        train(xy, mdmm, opt, 1)


def test_descent_on_multipliers_is_refused() -> None:
    xy, mdmm = problem()
    opt = torch.optim.Adam([xy, *mdmm.parameters()], lr=1e-2)
    with pytest.raises(ValueError, match="maximize=False"):
        train(xy, mdmm, opt, 1)


def test_weight_decay_on_multipliers_is_refused() -> None:
    xy, mdmm = problem()
    opt = torch.optim.AdamW(
        [{"params": [xy]}, {"params": mdmm.multipliers(), "maximize": True}], lr=1e-2
    )
    with pytest.raises(ValueError, match="weight_decay"):
        train(xy, mdmm, opt, 1)


def test_lbfgs_holding_multipliers_is_refused() -> None:
    """Line search on a Lagrangian linear in λ diverges: refuse, point to dual_update."""
    xy, mdmm = problem()
    with pytest.raises(ValueError, match="dual_update"):
        mdmm.make_optimizer([xy], optimizer=torch.optim.LBFGS)
    opt = torch.optim.LBFGS([xy, *mdmm.multipliers()])

    def closure() -> torch.Tensor:
        opt.zero_grad()
        v = mdmm(((xy - TARGET) ** 2).sum()).value
        v.backward()
        return v

    with pytest.raises(ValueError, match="method of multipliers"):
        opt.step(closure)
    assert torch.equal(xy.detach(), torch.zeros(2, dtype=DT))  # nothing moved


def test_optimizers_without_multipliers_are_untouched() -> None:
    w = nn.Parameter(torch.ones(2))
    opt = torch.optim.LBFGS([w])
    check_optimizer(opt)  # no error: no multiplier in it

    def closure() -> torch.Tensor:
        opt.zero_grad()
        v = (w**2).sum()
        v.backward()
        return v

    opt.step(closure)


def test_max_constraint_under_adamw_and_onecycle() -> None:
    """min (x-2)² s.t. x <= 1 (active) with AdamW + OneCycleLR: x → 1, λ → -2."""
    x = nn.Parameter(torch.zeros(1, dtype=DT))
    mdmm = MDMM([MaxConstraint(lambda: x[0], 1.0, damping=2.0, dtype=DT)])
    opt = mdmm.make_optimizer([x], optimizer=torch.optim.AdamW, lr=1e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-2, total_steps=3000)
    for _ in range(3000):
        out = mdmm(((x - 2) ** 2).sum())
        opt.zero_grad()
        out.value.backward()
        opt.step()
        sched.step()
    assert abs(x.item() - 1) < 1e-3
    assert abs(mdmm[0].lmbda.item() + 2) < 2e-2


def test_torchmin_bfgs_holding_multipliers_is_refused() -> None:
    torchmin = pytest.importorskip("torchmin")
    xy, mdmm = problem()
    opt = torchmin.Minimizer([xy, *mdmm.multipliers()], method="bfgs")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        return mdmm(((xy - TARGET) ** 2).sum()).value

    with pytest.raises(ValueError, match="dual_update"):
        opt.step(closure)


# ------------------------------------------------- the νPI controller (dual="pi") on the matrix
def _geoopt(name: str):
    def make(params, **kw):
        return getattr(pytest.importorskip("geoopt").optim, name)(params, **kw)

    return make


optim = torch.optim
#: Every first-order optimizer of tests/test_matrix.py's OPTIMIZERS, as the matrix runs it
#: (momentum, foreach, fused), with the primal lr and its decay per step on this problem. The
#: closure optimizers (LBFGS, torchzero, torchmin, scipy) keep the method of multipliers:
#: the controller refuses opt.step(closure). AdamW without its decay (it shifts the solution).
PI_MATRIX = {
    "SGD": (optim.SGD, {"lr": 0.005, "momentum": 0.9}, 1.0),
    "SGD-fused": (optim.SGD, {"lr": 0.005, "momentum": 0.9, "fused": True}, 1.0),
    "Adam": (optim.Adam, {"lr": 0.05}, 0.998),
    "Adam-foreach": (optim.Adam, {"lr": 0.05, "foreach": True}, 0.998),
    "Adam-fused": (optim.Adam, {"lr": 0.05, "fused": True}, 0.998),
    "AdamW": (optim.AdamW, {"lr": 0.05, "weight_decay": 0.0}, 0.998),
    "AdamW-fused": (optim.AdamW, {"lr": 0.05, "weight_decay": 0.0, "fused": True}, 0.998),
    "RMSprop": (optim.RMSprop, {"lr": 0.02}, 0.995),
    "Adamax": (optim.Adamax, {"lr": 0.05}, 1.0),
    "geoopt-RiemannianAdam": (_geoopt("RiemannianAdam"), {"lr": 0.05}, 0.998),
    "geoopt-RiemannianSGD": (_geoopt("RiemannianSGD"), {"lr": 0.005, "momentum": 0.9}, 1.0),
}


@pytest.mark.parametrize("name", list(PI_MATRIX))
def test_pi_reaches_the_solution_and_multiplier_under_every_matrix_optimizer(name) -> None:
    """min (x-2)² + (y-1)² s.t. x + y = 1 under dual='pi': (1, 0) and λ = -2 for every
    first-order optimizer of the compatibility matrix (the multipliers' lr pinned)."""
    cls, kw, decay = PI_MATRIX[name]
    xy, mdmm = problem()
    opt = mdmm.make_optimizer(
        [xy],
        optimizer=functools.partial(cls, **kw),  # lr too: geoopt's SGD requires it
        lr=kw["lr"],
        dual_lr=0.2,
        dual="pi",
    )
    assert opt.param_groups[1]["dual"] == "pi"
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, decay)
    train(xy, mdmm, opt, 3000, sched)
    assert torch.allclose(xy.detach(), torch.tensor([1.0, 0.0], dtype=DT), atol=1e-6), xy
    assert abs(mdmm[0].lmbda.item() + 2) < 1e-5, mdmm[0].lmbda.item()


@pytest.mark.parametrize("kind", ["onecycle", "cyclic", "plateau"])
def test_pi_under_schedulers_that_rewrite_every_group(kind) -> None:
    """OneCycleLR / CyclicLR / ReduceLROnPlateau move the multipliers' lr (η) with the
    model's unless pinned: the controller still ends at (1, 0), λ = -2. The momentum stays
    fixed (cycle_momentum=False): their default cycle to β = 0.95 makes the primal's response
    per unit of λ 1/(1-β) = 20x larger, past the proportional term's stability bound
    (docs/soft-controller.md), and the loop diverges."""
    xy, mdmm = problem(damping=2.0)
    opt = mdmm.make_optimizer(
        [xy], optimizer=functools.partial(torch.optim.SGD, momentum=0.5), lr=2e-2, dual="pi"
    )
    steps = 2000
    if kind == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=5e-2, total_steps=steps, cycle_momentum=False
        )
    elif kind == "cyclic":
        sched = torch.optim.lr_scheduler.CyclicLR(
            opt, base_lr=1e-2, max_lr=5e-2, step_size_up=100, cycle_momentum=False
        )
    else:
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=300, factor=0.5)
    for _ in range(steps):
        out = mdmm(((xy - TARGET) ** 2).sum())
        opt.zero_grad()
        out.value.backward()
        opt.step()
        sched.step(out.value.item()) if kind == "plateau" else sched.step()
    assert opt.param_groups[1]["dual"] == "pi" and opt.param_groups[1]["lr"] > 0
    tol = 2e-2 if kind == "plateau" else 1e-4  # plateau has decayed both lrs to ~3e-4
    assert abs(xy.sum().item() - 1) < tol
    assert abs(mdmm[0].lmbda.item() + 2) < 5 * tol


def _pi_run(name: str, resume_at: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """40 steps of PI_MATRIX[name] under a schedule; at ``resume_at`` the state goes through
    ``training_state`` → bytes → ``load_training_state`` into fresh objects."""
    cls, kw, _ = PI_MATRIX[name]

    def build():
        xy, mdmm = problem()
        opt = mdmm.make_optimizer(
            [xy], optimizer=functools.partial(cls, **kw), lr=kw["lr"], dual="pi"
        )
        return xy, mdmm, opt, torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.99)

    xy, mdmm, opt, sched = build()
    for t in range(40):
        if t == resume_at:
            module = nn.Module()
            module.xy = xy
            buf = io.BytesIO()
            torch.save(training_state(module, opt, mdmm, sched=sched.state_dict()), buf)
            buf.seek(0)
            xy, mdmm, opt, sched2 = build()
            module = nn.Module()
            module.xy = xy
            extra = load_training_state(torch.load(buf, weights_only=True), module, opt, mdmm)
            sched2.load_state_dict(extra["sched"])
            sched = sched2
        train(xy, mdmm, opt, 1, sched)
    return xy.detach().clone(), mdmm[0].lmbda.detach().clone()


#: geoopt's RiemannianAdam keeps its step count as a Python int; torch's load_state_dict turns
#: it into a float32 tensor, and the bias corrections ``beta ** step`` are then float32: a
#: resumed run differs by ~1e-6 with or without multipliers (geoopt alone, no MDMM, too).
RESUMABLE = [n for n in PI_MATRIX if n != "geoopt-RiemannianAdam"]


@pytest.mark.parametrize("name", RESUMABLE)
def test_pi_resume_is_bit_exact_under_every_matrix_optimizer(name) -> None:
    """A checkpoint mid-run (model, optimizer with the controller's state, multipliers,
    scheduler) resumes to the uninterrupted run's bits under every optimizer above."""
    ref = _pi_run(name, None)
    resumed = _pi_run(name, 17)
    assert torch.equal(ref[0], resumed[0]) and torch.equal(ref[1], resumed[1])
