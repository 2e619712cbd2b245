"""Soft constraints on problems with a known solution and multiplier (float64, seeded).

Sign convention (mdmm's): L = f + scale·ψ(c, λ), with c = value - fn (Eq), max - fn (Max),
fn - min (Min), clamp(fn) - fn (the Hard kinds); at a solution ∇f + λ ∇c = 0.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from manifoldparam.soft import (
    MDMM,
    BoundConstraintHard,
    EqConstraint,
    MaxConstraint,
    MaxConstraintHard,
    MinConstraint,
    MinConstraintHard,
    dual_update,
)
from tests.conftest import solve_lbfgs

DT = torch.float64


def var(*vals: float) -> torch.Tensor:
    return torch.tensor(vals, dtype=DT, requires_grad=True)


def test_lbfgs_method_of_multipliers_equality() -> None:
    """min x²+y² s.t. x+y = 1: x = y = 1/2, λ = 1 (issue: to 1e-6 with LBFGS)."""
    xy = var(0.3, -2.0)
    mdmm = MDMM([EqConstraint(lambda: xy.sum(), 1.0, damping=10.0, dtype=DT)])
    solve_lbfgs(mdmm, [xy], lambda: (xy**2).sum(), outer=10)
    assert torch.allclose(xy, torch.tensor([0.5, 0.5], dtype=DT), atol=1e-6, rtol=0)
    assert abs(mdmm[0].lmbda.item() - 1.0) < 1e-6


@pytest.mark.parametrize(
    ("make", "target", "x_star", "lam_star"),
    [
        # min (x-2)² s.t. x <= 1: active, x = 1; c = 1 - x, 2(x-2) - λ = 0: λ = -2
        (lambda x: MaxConstraint(lambda: x[0], 1.0, damping=5.0, dtype=DT), 2.0, 1.0, -2.0),
        # min (x-0.5)² s.t. x <= 1: inactive, λ = 0
        (lambda x: MaxConstraint(lambda: x[0], 1.0, damping=5.0, dtype=DT), 0.5, 0.5, 0.0),
        # min (x+1)² s.t. x >= 0: active; c = x, 2(x+1) + λ = 0: λ = -2
        (lambda x: MinConstraint(lambda: x[0], 0.0, damping=5.0, dtype=DT), -1.0, 0.0, -2.0),
        # min (x-3)² s.t. -1 <= x <= 1 (clamp kind): x = 1, λ = -4
        (
            lambda x: BoundConstraintHard(lambda: x[0], -1.0, 1.0, damping=5.0, dtype=DT),
            3.0,
            1.0,
            -4.0,
        ),
        (lambda x: MaxConstraintHard(lambda: x[0], 1.0, damping=5.0, dtype=DT), 3.0, 1.0, -4.0),
        # min (x+1)² s.t. x >= 1 (clamp kind): c = 1 - x below 1, 2(x+1) - λ = 0: λ = 4
        (lambda x: MinConstraintHard(lambda: x[0], 1.0, damping=5.0, dtype=DT), -1.0, 1.0, 4.0),
        # min (x-3)² s.t. x == 1: c = 1 - x, 2(x-3) - λ = 0: λ = -4
        (lambda x: EqConstraint(lambda: x[0], 1.0, damping=5.0, dtype=DT), 3.0, 1.0, -4.0),
    ],
)
def test_known_solution_and_multiplier(make, target, x_star, lam_star) -> None:
    x = var(0.2)
    c = make(x)
    mdmm = MDMM([c])
    solve_lbfgs(mdmm, [x], lambda: ((x - target) ** 2).sum())
    assert abs(x.item() - x_star) < 1e-6
    # The clamp kinds only ever push λ one way: an inexact solve can overshoot a little.
    assert abs(c.lmbda.item() - lam_star) < (1e-4 if "Hard" in type(c).__name__ else 1e-6)


def test_equality_multiplier_sign() -> None:
    """min (x-3)² s.t. x == 1: 2(x - 3) + λ·∂(1 - x)/∂x = 0 gives λ = -4."""
    x = var(0.0)
    mdmm = MDMM([EqConstraint(lambda: x[0], 1.0, damping=5.0, dtype=DT)])
    solve_lbfgs(mdmm, [x], lambda: ((x - 3) ** 2).sum())
    assert abs(mdmm[0].lmbda.item() + 4.0) < 1e-6


def test_first_order_ascent_reaches_kkt_point() -> None:
    """min (x-2)² + (y-1)² s.t. x + y = 1 with SGD descent-ascent: (1, 0), λ = -2."""
    xy = var(0.0, 0.0)
    mdmm = MDMM([EqConstraint(lambda: xy.sum(), 1.0, damping=1.0, dtype=DT)])
    opt = mdmm.make_optimizer([xy], optimizer=torch.optim.SGD, lr=0.05)
    target = torch.tensor([2.0, 1.0], dtype=DT)
    for _ in range(3000):
        out = mdmm(((xy - target) ** 2).sum())
        opt.zero_grad()
        out.value.backward()
        opt.step()
    assert torch.allclose(xy, torch.tensor([1.0, 0.0], dtype=DT), atol=1e-8, rtol=0)
    assert abs(mdmm[0].lmbda.item() + 2.0) < 1e-8


@pytest.mark.parametrize("optimizer", [torch.optim.Adam, torch.optim.SGD])
def test_violated_max_constraint_reaches_true_optimum(optimizer) -> None:
    """mdmm's slack saddle: min x² s.t. x <= 1 from x = 2 ends at 1 there; here at 0."""
    x = var(2.0)
    mdmm = MDMM([MaxConstraint(lambda: x[0], 1.0, dtype=DT)])
    opt = mdmm.make_optimizer([x], optimizer=optimizer, lr=2e-2)
    for _ in range(1500):
        out = mdmm((x**2).sum())
        opt.zero_grad()
        out.value.backward()
        opt.step()
    assert abs(x.item()) < 1e-3
    assert abs(mdmm[0].lmbda.item()) < 1e-3
    assert out.infs[0].item() == 0.0  # the true violation: x <= 1 holds


def test_mdmm_has_the_slack_saddle() -> None:
    """The reference really fails on that case (so the test above can tell the two apart)."""
    mdmm = pytest.importorskip("mdmm")
    x = var(2.0)
    ref = mdmm.MDMM([mdmm.MaxConstraint(lambda: x[0], 1.0)])
    opt = ref.make_optimizer([x], optimizer=torch.optim.Adam, lr=2e-2)
    for _ in range(1500):
        out = ref((x**2).sum())
        opt.zero_grad()
        out.value.backward()
        opt.step()
    assert abs(x.item() - 1.0) < 1e-2


@given(
    c=st.floats(-3, 3),
    lam=st.floats(-3, 3),
    d=st.floats(0.1, 10),
    u=st.floats(0, 5),
)
def test_slack_free_term_is_mdmm_term_at_the_best_slack(c, lam, d, u) -> None:
    """ψ(c, λ) = min over s² = u >= 0 of mdmm's λ(c - u) + d(c - u)²/2, attained at u*."""
    con = MaxConstraint(lambda: torch.zeros((), dtype=DT), 0.0, damping=d, dtype=DT)
    with torch.no_grad():
        con.lmbda.fill_(lam)
    psi = con.term(torch.tensor(c, dtype=DT)).item()

    def mdmm_term(uu: float) -> float:
        return lam * (c - uu) + d * (c - uu) ** 2 / 2

    u_star = max(c + lam / d, 0.0)
    assert psi == pytest.approx(mdmm_term(u_star), abs=1e-9)
    assert psi <= mdmm_term(u) + 1e-9


@settings(max_examples=10)
@given(
    a=st.lists(st.floats(-5, 5), min_size=2, max_size=6),
    b=st.floats(-5, 5),
)
def test_projection_onto_hyperplane(a, b) -> None:
    """min ‖x - a‖² s.t. Σx = b: x = a - (Σa - b)/n and, with c = b - Σx, λ = 2(b - Σa)/n."""
    at = torch.tensor(a, dtype=DT)
    n = len(a)
    x = torch.zeros(n, dtype=DT, requires_grad=True)
    mdmm = MDMM([EqConstraint(lambda: x.sum(), b, damping=10.0, dtype=DT)])
    solve_lbfgs(mdmm, [x], lambda: ((x - at) ** 2).sum(), outer=12)
    shift = (at.sum() - b) / n
    assert torch.allclose(x, at - shift, atol=1e-6, rtol=0)
    # stationarity 2(x - a) - λ = 0  =>  λ = -2·shift
    assert mdmm[0].lmbda.item() == pytest.approx(-2 * shift.item(), abs=1e-5)


def test_vector_constraint_one_multiplier_per_element() -> None:
    """min ‖X - A‖² s.t. each row sums to 1: λ_i = -2·(row_i shift)."""
    torch.manual_seed(0)
    a = torch.randn(3, 4, dtype=DT)
    x = torch.zeros(3, 4, dtype=DT, requires_grad=True)
    con = EqConstraint(lambda: x.sum(1), 1.0, damping=10.0, shape=(3,), dtype=DT)
    mdmm = MDMM([con])
    solve_lbfgs(mdmm, [x], lambda: ((x - a) ** 2).sum(), outer=12)
    shift = (a.sum(1) - 1) / 4
    assert torch.allclose(x, a - shift[:, None], atol=1e-6, rtol=0)
    assert torch.allclose(con.lmbda, -2 * shift, atol=1e-5, rtol=0)


def test_adaptive_dual_step() -> None:
    """iALM's step min(β, γ/‖c‖): the same solution, and the step is what it says."""
    xy = var(0.3, -2.0)
    con = EqConstraint(lambda: xy.sum(), 1.0, damping=10.0, dtype=DT)
    mdmm = MDMM([con])
    before = con.lmbda.clone()
    c = 1.0 - xy.sum().item()  # 2.7
    dual_update(mdmm, beta=5.0, gamma=1.0)
    assert con.lmbda.item() == pytest.approx(before.item() + min(5.0, 1.0 / abs(c)) * c)
    xy2 = var(0.3, -2.0)
    mdmm2 = MDMM([EqConstraint(lambda: xy2.sum(), 1.0, damping=10.0, dtype=DT)])
    opt = torch.optim.LBFGS(
        [xy2],
        max_iter=100,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-13,
        tolerance_change=1e-15,
    )
    for _ in range(40):

        def closure() -> torch.Tensor:
            opt.zero_grad()
            v = mdmm2((xy2**2).sum()).value
            v.backward()
            return v

        opt.step(closure)
        dual_update(mdmm2, beta=10.0, gamma=1.0)
    assert torch.allclose(xy2, torch.tensor([0.5, 0.5], dtype=DT), atol=1e-6, rtol=0)


def test_dual_update_projects_inequality_multipliers() -> None:
    """λ ← min(λ + ρc, 0) for Max/Min: a satisfied constraint's multiplier returns to 0."""
    x = var(0.0)
    con = MaxConstraint(lambda: x[0], 1.0, damping=2.0, dtype=DT)
    with torch.no_grad():
        con.lmbda.fill_(-1.0)
    dual_update([con])  # c = 1 - 0 = 1: -1 + 2·1 = 1 -> projected to 0
    assert con.lmbda.item() == 0.0
    eq = EqConstraint(lambda: x[0], 1.0, damping=2.0, dtype=DT)
    dual_update([eq])  # not projected
    assert eq.lmbda.item() == 2.0
