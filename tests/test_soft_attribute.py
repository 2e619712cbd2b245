"""Soft constraints on module attributes: hard + soft on one model, the report, restoration,
checkpoints (weights_only, bit-for-bit resume), pickling, and bad input."""

from __future__ import annotations

import copy
import io
import math
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import manifoldparam as mp
import manifoldparam.soft as soft
from manifoldparam.soft import MDMM, EqConstraint, constrain, mean_abs, rms, row_norms

DT = torch.float64


def model_with_constraints(seed: int = 0) -> tuple[nn.Sequential, MDMM]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    constrain(model[0], "weight", mean_abs, eq=1.0, damping=5.0)
    constrain(model[0], "weight", rms, max=1.1, damping=5.0)
    constrain(model[2], "weight", row_norms, max=1.0, damping=5.0)  # one λ per row
    return model, MDMM(soft.soft_constraints(model))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 3, generator=g, dtype=DT), torch.randn(16, 2, generator=g, dtype=DT)


def train(model, mdmm, opt, sched, steps: int) -> None:
    x, y = batch()
    for _ in range(steps):
        out = mdmm(nn.functional.mse_loss(model(x), y))
        opt.zero_grad()
        out.value.backward()
        opt.step()
        sched.step()


def test_declared_constraints_are_collected_with_their_shapes() -> None:
    model, mdmm = model_with_constraints()
    kinds = [type(c).__name__ for c in mdmm]
    assert kinds == ["EqConstraint", "MaxConstraint", "MaxConstraint"]
    assert [tuple(c.lmbda.shape) for c in mdmm] == [(), (), (2,)]
    assert all(c.lmbda.dtype == DT for c in mdmm)
    ret = mdmm(torch.zeros((), dtype=DT))
    assert torch.allclose(ret.fn_values[2], model[2].weight.norm(dim=1))
    # the true violation: 0 for the rows within the bound
    expected = model[2].weight.norm(dim=1).clamp(max=1.0) - model[2].weight.norm(dim=1)
    assert torch.equal(ret.infs[2], expected)


def test_hard_and_soft_on_the_same_attribute() -> None:
    """A soft constraint sees the parametrized value of a hard-constrained attribute.

    min ‖W - T‖² s.t. |W_ij| <= 0.9 (hard, tanh) and rms(W) = r (soft), LBFGS + the method of
    multipliers. With the box inactive at the solution: W = (r / rms(T))·T and, from
    2(W - T) - λ W / (n·r) = 0, λ = 2n(r - rms(T)).
    """
    torch.manual_seed(0)
    layer = nn.Linear(4, 4).double()
    mp.bounded(layer, "weight", low=-0.9, high=0.9)
    target = 0.3 * torch.randn(4, 4, dtype=DT)
    r = 0.8 * 0.9 * float(rms(target) / target.abs().max())  # the solution stays in the box
    c = constrain(layer, "weight", rms, eq=r, damping=200.0)  # ρ·J H⁻¹ Jᵀ = 200/32
    mdmm = MDMM([c])
    opt = torch.optim.LBFGS(
        [layer.parametrizations.weight.original],
        max_iter=200,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-12,
        tolerance_change=1e-14,
    )
    for _ in range(15):

        def closure() -> torch.Tensor:
            opt.zero_grad()
            v = mdmm(((layer.weight - target) ** 2).sum()).value
            v.backward()
            return v

        opt.step(closure)
        soft.dual_update(mdmm)
    w = layer.weight.detach()
    assert torch.allclose(w, r / rms(target) * target, atol=1e-6, rtol=0)
    assert c.lmbda.item() == pytest.approx(2 * 16 * (r - rms(target).item()), abs=1e-5)
    report = mp.constraint_report(layer)
    assert [r.kind for r in report] == ["hard", "soft"]
    assert report.rows[0].violation <= 1e-12
    assert report.rows[1].violation == pytest.approx(abs(rms(w).item() - r), abs=1e-12)
    assert "rms" in str(report) and "Bounded" in str(report)


def test_report_lists_every_constraint_with_paths() -> None:
    model, mdmm = model_with_constraints()
    w_free = nn.Parameter(torch.ones(2, dtype=DT))
    extra = EqConstraint(lambda: w_free.sum(), 1.0, dtype=DT)
    report = mp.constraint_report(model, extra=[*mdmm, extra])
    assert [r.attribute for r in report] == ["0.weight", "0.weight", "2.weight", "(fn)"]
    w0 = model[0].weight
    assert report.rows[0].violation == pytest.approx(abs(w0.abs().mean().item() - 1))
    assert report.rows[3].violation == pytest.approx(1.0)
    assert report.worst == max(r.violation for r in report)


def test_restore_feasibility_near_and_far() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(8, 8).double()
    with torch.no_grad():
        layer.weight.div_(layer.weight.abs().mean()).mul_(1.005)  # mean|W| = 1.005
    cons = [
        constrain(layer, "weight", mean_abs, eq=1.0),
        constrain(layer, "weight", rms, max=1.5),
    ]  # inactive: must not be pinned
    state = layer.weight.detach().clone()
    before = soft.restore_feasibility(cons, levenberg=0.0)
    assert before.item() == pytest.approx(0.005)
    assert MDMM(cons).violation().item() < 1e-8  # Gauss–Newton: second order in 5e-3
    with torch.no_grad():
        layer.weight.copy_(state)
    soft.restore_feasibility(cons)  # Levenberg–Marquardt 1e-2: ≈ 1% of the residual left
    assert 1e-6 < MDMM(cons).violation().item() < 1e-4
    with torch.no_grad():
        layer.weight.mul_(2.0)  # far: violation 1.0 > within
    w = layer.weight.detach().clone()
    soft.restore_feasibility(cons, within=1e-2)
    assert torch.equal(layer.weight, w)


def test_restore_feasibility_does_not_sync(monkeypatch) -> None:
    """The restoration step runs after every optimizer step: its solve skips the error check
    (``solve_ex``), which would read ``info`` on the host (a device sync on a GPU)."""

    def checked(*args, **kwargs):
        raise AssertionError("torch.linalg.solve: a checked solve (it syncs on a GPU)")

    torch.manual_seed(0)
    layer = nn.Linear(6, 6).double()
    with torch.no_grad():
        layer.weight.div_(layer.weight.abs().mean()).mul_(1.005)  # near: mean|W| = 1.005
    cons = [constrain(layer, "weight", mean_abs, eq=1.0), constrain(layer, "weight", rms, max=1.5)]
    monkeypatch.setattr(torch.linalg, "solve", checked)
    soft.restore_feasibility(cons, levenberg=0.0)
    assert MDMM(cons).violation().item() < 1e-8


def test_restore_through_a_hard_parametrization() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(6, 6).double()
    mp.bounded(layer, "weight", low=-1.0, high=1.0)
    with torch.no_grad():
        target = layer.weight.abs().mean() + 0.003
    c = constrain(layer, "weight", mean_abs, eq=float(target))
    soft.restore_feasibility([c], levenberg=0.0)  # through tanh: second order in 3e-3
    assert abs(layer.weight.abs().mean().item() - float(target)) < 1e-5
    soft.restore_feasibility([c], levenberg=0.0)
    assert abs(layer.weight.abs().mean().item() - float(target)) < 1e-10
    assert bool((layer.weight.abs() <= 1).all())


def test_checkpoint_weights_only_and_bit_for_bit_resume() -> None:
    def build():
        model, mdmm = model_with_constraints()
        opt = mdmm.make_optimizer(
            model.parameters(), optimizer=torch.optim.AdamW, lr=1e-2, weight_decay=0.1, dual_lr=3e-2
        )
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.99)
        return model, mdmm, opt, sched

    model, mdmm, opt, sched = build()
    train(model, mdmm, opt, sched, 20)
    buf = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "mdmm": mdmm.state_dict(),
            "opt": opt.state_dict(),
            "sched": sched.state_dict(),
        },
        buf,
    )
    train(model, mdmm, opt, sched, 20)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    assert set(ckpt["mdmm"]) >= {"0.lmbda", "1.lmbda", "2.lmbda"}
    model2, mdmm2, opt2, sched2 = build()
    model2.load_state_dict(ckpt["model"])
    mdmm2.load_state_dict(ckpt["mdmm"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    train(model2, mdmm2, opt2, sched2, 20)
    for a, b in zip(
        [*model.parameters(), *mdmm.parameters()],
        [*model2.parameters(), *mdmm2.parameters()],
        strict=True,
    ):
        assert torch.equal(a, b)
    assert any(c.lmbda.abs().sum() > 0 for c in mdmm2)


def test_pickle_and_deepcopy_keep_the_declarations() -> None:
    model, mdmm = model_with_constraints()
    model2, mdmm2 = pickle.loads(pickle.dumps((model, mdmm)))
    cons = soft.soft_constraints(model2)
    assert [id(c) for c in cons] == [id(c) for c in mdmm2]
    assert cons[0].target[0] is model2[0]
    assert isinstance(cons[0].lmbda, soft.Multiplier)
    with torch.no_grad():
        model2[0].weight.mul_(3)
    assert cons[0].evaluate().item() == pytest.approx(3 * model[0].weight.abs().mean().item())
    model3 = copy.deepcopy(model)
    assert soft.soft_constraints(model3)[2].target[0] is model3[2]
    assert isinstance(soft.soft_constraints(model3)[0].lmbda, soft.Multiplier)


# ------------------------------------------------------------------------- bad input
def test_vector_value_where_a_scalar_is_needed() -> None:
    w = nn.Parameter(torch.ones(3))
    mdmm = MDMM([EqConstraint(lambda: w * 2, 1.0)])
    with pytest.raises(ValueError, match=r"shape \(3,\).*shape=\(3,\)"):
        mdmm(w.sum())


def test_nan_constraint_value_is_named() -> None:
    w = nn.Parameter(torch.tensor([-1.0, 1.0]))
    mdmm = MDMM([EqConstraint(lambda: w.sum(), 0.0), EqConstraint(lambda: w[0].sqrt(), 1.0)])
    with pytest.raises(ValueError, match=r"EqConstraint\(.*<lambda>.*not finite|non-finite"):
        mdmm(w.sum())


def test_nonscalar_loss_and_wrong_items() -> None:
    w = nn.Parameter(torch.ones(3))
    mdmm = MDMM([EqConstraint(lambda: w.sum(), 1.0)])
    with pytest.raises(ValueError, match="0-dim"):
        mdmm(w * 1)
    with pytest.raises(TypeError, match="not a constraint"):
        MDMM([lambda: w.sum()])


def test_constrain_errors_name_the_attribute() -> None:
    layer = nn.Linear(2, 2)
    with pytest.raises(AttributeError, match=r"Linear\.wieght"):
        constrain(layer, "wieght", mean_abs, eq=1.0)
    with pytest.raises(ValueError, match="exactly one of eq="):
        constrain(layer, "weight", mean_abs)
    with pytest.raises(ValueError, match="clamp=True"):
        constrain(layer, "weight", mean_abs, min=0.1, max=2.0)
    with pytest.raises(ValueError, match="not finite"):
        constrain(layer, "weight", lambda w: w.sum() / 0 * 0, eq=1.0)
    with pytest.raises(ValueError, match="damping > 0"):
        constrain(layer, "weight", rms, max=1.0, damping=0.0)
    c = constrain(layer, "weight", mean_abs, min=0.1, max=2.0, clamp=True)
    assert type(c).__name__ == "BoundConstraintHard"


def _l1_ball_projection(w: np.ndarray, radius: float) -> np.ndarray:
    """The Euclidean projection onto {Σ|w| <= radius}, by sorting (Duchi et al., 2008)."""
    a = np.abs(w)
    if a.sum() <= radius:
        return w
    u = np.sort(a)[::-1]
    css = np.cumsum(u)
    k = np.nonzero(u * np.arange(1, len(u) + 1) > css - radius)[0][-1]
    tau = (css[k] - radius) / (k + 1)
    return np.sign(w) * np.maximum(a - tau, 0)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), shrink=st.floats(0.05, 0.9))
def test_restore_keep_sign_is_the_l1_ball_projection(seed, shrink) -> None:
    """An L1 budget mean|W| <= b (b down to 5% of the start: most weights must reach 0):
    with keep_sign the Gauss–Newton steps stop at the kink and, iterated, are the
    soft-threshold projection onto the ball (the sort-based oracle). Without keep_sign the
    step flips the small weights' signs and misses the budget."""
    torch.manual_seed(seed)
    start = torch.randn(6, 5, dtype=torch.float64)
    budget = shrink * float(start.abs().mean())
    oracle = _l1_ball_projection(start.numpy().ravel(), budget * start.numel()).reshape(6, 5)
    for keep_sign in (True, False):
        layer = nn.Linear(5, 6).double()
        with torch.no_grad():
            layer.weight.copy_(start)
        cons = [constrain(layer, "weight", soft.mean_abs, max=budget)]
        soft.restore_feasibility(
            cons, [layer.weight], within=math.inf, levenberg=0.0, iters=40, keep_sign=keep_sign
        )
        w = layer.weight.detach().numpy()
        if keep_sign:
            assert np.abs(w).mean() <= budget + 1e-12
            np.testing.assert_allclose(w, oracle, atol=1e-10)
        else:
            assert not np.allclose(w, oracle, atol=1e-6)


def test_restore_refuses_zero_iterations() -> None:
    layer = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="iters=0"):
        soft.restore_feasibility([constrain(layer, "weight", soft.mean_abs, max=0.1)], iters=0)


def test_tangent_gradients_project_out_the_active_normals_only() -> None:
    """min (x-2)² + (y-1)² s.t. x + y = 1 at a feasible point: the projected gradient is
    orthogonal to (1, 1); an inequality x <= 1 at its bound is projected out only when -g
    points outside; far from the set (violation above ``within``) nothing changes."""
    xy = nn.Parameter(torch.tensor([0.3, 0.7], dtype=DT))
    eq = EqConstraint(lambda: xy.sum(), 1.0, dtype=DT)
    ((xy - torch.tensor([2.0, 1.0], dtype=DT)) ** 2).sum().backward()
    soft.tangent_gradients([eq], [xy])
    assert abs(float(xy.grad.sum())) < 1e-11  # the solve's Tikhonov term eps = 1e-12
    assert torch.allclose(xy.grad, torch.tensor([-1.4, 1.4], dtype=DT))  # (-3.4, -0.6) - (-2)·1
    x = nn.Parameter(torch.tensor([1.0], dtype=DT))
    le = mp.MaxConstraint(lambda: x[0], 1.0, dtype=DT)
    for target, expected in ((2.0, 0.0), (0.0, 2.0)):  # outward: removed; inward: kept
        x.grad = None
        ((x - target) ** 2).sum().backward()
        soft.tangent_gradients([le], [x])
        assert abs(float(x.grad) - expected) < 1e-11
    far = nn.Parameter(torch.tensor([0.0, 0.0], dtype=DT))  # violation 1 > within = 0.1
    eq_far = EqConstraint(lambda: far.sum(), 1.0, dtype=DT)
    far.grad = torch.tensor([1.0, 2.0], dtype=DT)
    soft.tangent_gradients([eq_far], [far])
    assert torch.equal(far.grad, torch.tensor([1.0, 2.0], dtype=DT))


def test_tangent_gradients_with_restoration_descend_along_the_constraint() -> None:
    """Adam with the projected gradient and restoration stays on x + y = 1 from the first
    step on and reaches (1, 0)."""
    xy = nn.Parameter(torch.tensor([0.5, 0.5], dtype=DT))
    eq = EqConstraint(lambda: xy.sum(), 1.0, dtype=DT)
    opt = torch.optim.Adam([xy], lr=0.05)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.995)
    for _ in range(1000):
        opt.zero_grad()
        ((xy - torch.tensor([2.0, 1.0], dtype=DT)) ** 2).sum().backward()
        soft.tangent_gradients([eq], [xy])
        opt.step()
        sched.step()
        soft.restore_feasibility([eq], [xy], levenberg=0.0)
        assert abs(float(xy.sum()) - 1) < 1e-12
    assert torch.allclose(xy.detach(), torch.tensor([1.0, 0.0], dtype=DT), atol=1e-6)
