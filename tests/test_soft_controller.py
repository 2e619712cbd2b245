"""The νPI multiplier controller (``make_optimizer(dual="pi")``): analytic problems, the
proportional term's effect, checkpoints, schedulers, optimizers without ``maximize``."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from manifoldparam.interop import load_training_state, training_state
from manifoldparam.soft import MDMM, EqConstraint, MaxConstraint
from manifoldparam.soft.controller import STATE_KEY

DT = torch.float64
TARGET = torch.tensor([2.0, 1.0], dtype=DT)


def problem(damping: float = 1.0) -> tuple[nn.Parameter, MDMM]:
    """min (x-2)² + (y-1)² s.t. x + y = 1: the solution (1, 0), the multiplier -2."""
    xy = nn.Parameter(torch.zeros(2, dtype=DT))
    return xy, MDMM([EqConstraint(lambda: xy.sum(), 1.0, damping=damping, dtype=DT)])


def step(xy: nn.Parameter, mdmm: MDMM, opt: torch.optim.Optimizer) -> float:
    out = mdmm(((xy - TARGET) ** 2).sum())
    opt.zero_grad()
    out.value.backward()
    opt.step()
    return float(out.infs[0])


@pytest.mark.parametrize(
    ("optimizer", "decay"),
    [(torch.optim.SGD, 1.0), (torch.optim.Adamax, 1.0), (torch.optim.Adam, 0.998)],
)
def test_converges_to_the_solution_and_its_multiplier(optimizer, decay) -> None:
    """Adam's steps stay ~lr long at a constant lr (it circles the solution): its primal lr
    decays, the multipliers' is pinned (dual_lr)."""
    xy, mdmm = problem()
    opt = mdmm.make_optimizer([xy], optimizer=optimizer, lr=0.05, dual_lr=0.2, dual="pi")
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, decay)
    for _ in range(3000):
        step(xy, mdmm, opt)
        sched.step()
    assert torch.allclose(xy.detach(), torch.tensor([1.0, 0.0], dtype=DT), atol=1e-6)
    assert abs(mdmm[0].lmbda.item() + 2) < 1e-5


def test_inequality_reaches_its_bound_and_multiplier() -> None:
    """min (x-2)² s.t. x <= 1: x = 1, λ = -2 (mdmm's sign), the multiplier never > 0."""
    x = nn.Parameter(torch.zeros(1, dtype=DT))
    mdmm = MDMM([MaxConstraint(lambda: x[0], 1.0, damping=1.0, dtype=DT)])
    opt = mdmm.make_optimizer([x], optimizer=torch.optim.Adam, lr=0.05, dual_lr=0.2, dual="pi")
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.998)
    for _ in range(3000):
        out = mdmm(((x - 2) ** 2).sum())
        opt.zero_grad()
        out.value.backward()
        opt.step()
        sched.step()
        assert mdmm[0].lmbda.item() <= 0
    assert abs(x.item() - 1) < 1e-6 and abs(mdmm[0].lmbda.item() + 2) < 1e-5


def ringing(kp: float | None) -> float:
    """The largest |c| over steps 1500..2000 of min (x - y - 3)² s.t. x + y = 1 (solution
    (2, -1), λ = 0) by plain SGD on the undamped Lagrangian: the loss is flat across the
    constraint, so gradient descent-ascent is a lossless oscillator (it rings for ever)."""
    xy = nn.Parameter(torch.zeros(2, dtype=DT))
    mdmm = MDMM([EqConstraint(lambda: xy.sum(), 1.0, damping=0.0, dtype=DT)])
    opt = mdmm.make_optimizer(
        [xy], optimizer=torch.optim.SGD, lr=0.01, dual_lr=0.5, dual="pi", kp=kp
    )
    worst = 0.0
    for t in range(2000):
        out = mdmm((xy[0] - xy[1] - 3) ** 2)
        opt.zero_grad()
        out.value.backward()
        opt.step()
        if t >= 1500:
            worst = max(worst, abs(float(out.infs[0])))
    return worst


def test_the_proportional_term_damps_the_oscillation() -> None:
    """Mutation check: the same loop with kp = 0 (plain ascent) still rings at amplitude
    ~1 after 2000 steps; the default gain has settled to round-off."""
    assert ringing(kp=0.0) > 0.1
    assert ringing(kp=None) < 1e-12


def test_first_step_is_plain_ascent_then_the_proportional_term_acts() -> None:
    xy, mdmm = problem()
    opt = mdmm.make_optimizer(
        [xy], optimizer=torch.optim.SGD, lr=0.1, dual_lr=0.3, dual="pi", kp=5.0
    )
    c0 = step(xy, mdmm, opt)
    assert mdmm[0].lmbda.item() == pytest.approx(0.3 * c0, rel=1e-15)  # ξ_{-1} = e_0
    lam0 = mdmm[0].lmbda.item()
    c1 = step(xy, mdmm, opt)
    assert mdmm[0].lmbda.item() == pytest.approx(lam0 + 0.3 * c1 + 5.0 * (c1 - c0), rel=1e-12)
    assert opt.state[mdmm[0].lmbda][STATE_KEY].item() == pytest.approx(c1, rel=1e-15)


def test_smoothing_enters_the_proportional_term() -> None:
    xy, mdmm = problem()
    opt = mdmm.make_optimizer(
        [xy], optimizer=torch.optim.SGD, lr=0.1, dual_lr=0.3, dual="pi", kp=5.0, nu=0.5
    )
    c0 = step(xy, mdmm, opt)
    lam0 = mdmm[0].lmbda.item()
    c1 = step(xy, mdmm, opt)
    xi1 = 0.5 * c0 + 0.5 * c1
    assert mdmm[0].lmbda.item() == pytest.approx(lam0 + 0.3 * c1 + 5.0 * (xi1 - c0), rel=1e-12)


def _bytes(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _run(resume_at: int | None, drop_state: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    xy, mdmm = problem()
    opt = mdmm.make_optimizer([xy], optimizer=torch.optim.Adam, lr=0.05, dual="pi", kp=3.0)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.99)
    for t in range(40):
        if t == resume_at:
            saved = _bytes(training_state(xy_module(xy), opt, mdmm, sched=sched.state_dict()))
            if drop_state:
                for entry in saved["optimizer"]["state"].values():
                    entry.pop(STATE_KEY, None)
            xy2, mdmm2 = problem()
            opt2 = mdmm2.make_optimizer(
                [xy2], optimizer=torch.optim.Adam, lr=0.05, dual="pi", kp=3.0
            )
            sched2 = torch.optim.lr_scheduler.ExponentialLR(opt2, gamma=0.99)
            extra = load_training_state(saved, xy_module(xy2), opt2, mdmm2)
            sched2.load_state_dict(extra["sched"])
            xy, mdmm, opt, sched = xy2, mdmm2, opt2, sched2
        step(xy, mdmm, opt)
        sched.step()
    return xy.detach().clone(), mdmm[0].lmbda.detach().clone()


def xy_module(xy: nn.Parameter) -> nn.Module:
    m = nn.Module()
    m.xy = xy
    return m


def test_checkpoint_resume_is_bit_exact_and_needs_the_controller_state() -> None:
    """The controller's ξ is in the optimizer's state dict: a resumed run (with a scheduled
    dual lr) equals the uninterrupted one bit for bit; without ξ it does not."""
    ref = _run(None)
    resumed = _run(20)
    assert torch.equal(ref[0], resumed[0]) and torch.equal(ref[1], resumed[1])
    dropped = _run(20, drop_state=True)
    assert not torch.equal(ref[1], dropped[1])


def test_dual_lr_is_scheduled_unless_pinned() -> None:
    for dual_lr, expected in ((None, 0.05 * 0.5**3), (0.2, 0.2)):
        xy, mdmm = problem()
        opt = mdmm.make_optimizer(
            [xy], optimizer=torch.optim.SGD, lr=0.05, dual_lr=dual_lr, dual="pi"
        )
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
        for _ in range(3):
            step(xy, mdmm, opt)
            sched.step()
        lam = mdmm[0].lmbda.item()
        c = step(xy, mdmm, opt)  # ξ_{t-1} is the last error: read it before the step
        assert opt.param_groups[1]["lr"] == pytest.approx(expected)
        assert opt.param_groups[1]["dual"] == "pi"
        assert lam != mdmm[0].lmbda.item() and c != 0


def test_an_optimizer_without_maximize_works_with_pi() -> None:
    """geoopt's Riemannian optimizers have no maximize=: refused with dual='gda', fine with
    the controller, which updates the multipliers itself."""
    geoopt = pytest.importorskip("geoopt")
    xy, mdmm = problem()
    with pytest.raises(ValueError, match="maximize"):
        mdmm.make_optimizer([xy], optimizer=geoopt.optim.RiemannianAdam, lr=0.05)
    opt = mdmm.make_optimizer(
        [xy], optimizer=geoopt.optim.RiemannianAdam, lr=0.05, dual_lr=0.2, dual="pi"
    )
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.998)
    for _ in range(3000):
        step(xy, mdmm, opt)
        sched.step()
    assert abs(xy.sum().item() - 1) < 1e-6 and abs(mdmm[0].lmbda.item() + 2) < 1e-5


def test_bad_options_and_closures_are_refused() -> None:
    xy, mdmm = problem()
    with pytest.raises(ValueError, match="choose one of"):
        mdmm.make_optimizer([xy], dual="PI-controller")
    with pytest.raises(ValueError, match="dual='pi'"):
        mdmm.make_optimizer([xy], kp=3.0)
    with pytest.raises(ValueError, match="proportional gain"):
        mdmm.make_optimizer([xy], dual="pi", kp=-1.0)
    with pytest.raises(ValueError, match="smoothing"):
        mdmm.make_optimizer([xy], dual="pi", nu=1.0)
    opt = mdmm.make_optimizer([xy], optimizer=torch.optim.SGD, lr=0.1, dual="pi")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        v = mdmm(((xy - TARGET) ** 2).sum()).value
        v.backward()
        return v

    with pytest.raises(ValueError, match="without a closure"):
        opt.step(closure)


def test_an_infeasible_pair_is_reported_under_the_controller() -> None:
    """x <= 0 and x >= 1: the controller's integral grows the multipliers for ever, and the
    infeasibility check (which watches the multipliers, whatever moves them) names both."""
    from manifoldparam.soft import InfeasibleWarning, MinConstraint

    x = nn.Parameter(torch.tensor([0.3], dtype=DT))
    cons = [MaxConstraint(lambda: x[0], 0.0, dtype=DT), MinConstraint(lambda: x[0], 1.0, dtype=DT)]
    mdmm = MDMM(cons)
    opt = mdmm.make_optimizer([x], optimizer=torch.optim.Adam, lr=5e-2, dual_lr=0.05, dual="pi")
    with pytest.warns(InfeasibleWarning, match="infeasible together") as record:
        for _ in range(1200):
            out = mdmm((x**2).sum())
            opt.zero_grad()
            out.value.backward()
            opt.step()
    text = str(record[0].message)
    assert cons[0].describe() in text and cons[1].describe() in text
