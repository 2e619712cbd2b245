"""No silent failures on the soft-constraint side (issue 17): each test names the failure it
guards against, and each failed on the code before its fix.

* restore_feasibility never writes a non-finite value, and moves nothing (bit for bit) when
  its gate is closed or its step is not finite; a satisfied constraint whose gradient is NaN
  contributes nothing;
* scipy_minimize reports a NaN/Inf objective, gradient or constraint as a failure;
* an infeasible set of soft constraints is reported (InfeasibleWarning, constraint_report);
* NaN bounds, NaN/negative scale or damping and an overflowing scale are refused when built;
* the damping advice goes both ways;
* constraint_report names the non-finite tensor behind a hard constraint.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import manifoldparam as mp
import manifoldparam.soft as soft
from manifoldparam.interop import scipy_minimize
from manifoldparam.report import constraint_report
from manifoldparam.soft import (
    MDMM,
    BoundConstraintHard,
    EqConstraint,
    InfeasibleWarning,
    MaxConstraint,
    MaxConstraintHard,
    MinConstraint,
    MinConstraintHard,
    constrain,
    dual_update,
    mean_abs,
)

DT = torch.float64


def l2(w: torch.Tensor) -> torch.Tensor:
    """‖w‖ written by hand: its gradient at w = 0 is 0·inf = NaN (torch's vector_norm is 0)."""
    return w.pow(2).sum().sqrt()


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float64 tensor (``torch.equal`` calls -0.0 and +0.0 equal)."""
    return t.detach().clone().view(torch.int64)


# ----------------------------------------------------------------- restore_feasibility
def two_layers(offset: float = 1.005) -> tuple[nn.Sequential, list]:
    """Layer 0: a zero bias under ‖b‖ <= 1 (satisfied, NaN gradient); layer 1: mean|W| = 1,
    violated by ``offset - 1``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).double()
    with torch.no_grad():
        model[0].bias.zero_()
        model[1].weight.div_(model[1].weight.abs().mean()).mul_(offset)
    cons = [
        constrain(model[0], "bias", l2, max=1.0),
        constrain(model[1], "weight", mean_abs, eq=1.0),
    ]
    return model, cons


def test_restore_satisfied_nan_gradient_does_not_touch_an_unrelated_layer() -> None:
    """Before: 0·NaN in the active mask put NaN into both layers."""
    model, cons = two_layers()
    bias = bits(model[0].bias)
    before = soft.restore_feasibility(cons, levenberg=0.0)
    assert before.item() == pytest.approx(0.005)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert torch.equal(bits(model[0].bias), bias)  # the satisfied constraint moved nothing
    assert abs(model[1].weight.abs().mean().item() - 1) < 1e-12  # restored (Gauss–Newton)


@settings(max_examples=15)
@given(
    within=st.floats(1e-6, 4e-3),  # the violation is 5e-3: the gate is closed
    zero_sign=st.sampled_from([0.0, -0.0]),
    levenberg=st.sampled_from([0.0, 1e-2]),
)
def test_restore_with_the_gate_closed_keeps_every_bit(within, zero_sign, levenberg) -> None:
    """Before: the step was multiplied by a 0 gate, so NaN·0 wrote NaN, and -0.0 + 0 = +0.0."""
    model, cons = two_layers()
    with torch.no_grad():
        model[1].bias.fill_(zero_sign)
    state = [bits(p) for p in model.parameters()]
    soft.restore_feasibility(cons, within=within, levenberg=levenberg)
    assert all(torch.equal(bits(p), s) for p, s in zip(model.parameters(), state, strict=True))


def test_restore_never_writes_a_non_finite_step_and_does_not_sync(monkeypatch) -> None:
    """An active equality with a NaN gradient (‖b‖ == 1 at b = 0): the step is NaN, so nothing
    moves; decided on the device (any host read raises here). Before: NaN was written."""
    torch.manual_seed(0)
    layer = nn.Linear(3, 3).double()
    with torch.no_grad():
        layer.bias.zero_()
        layer.weight.div_(layer.weight.abs().mean()).mul_(1.01)
    cons = [constrain(layer, "bias", l2, eq=1.0), constrain(layer, "weight", mean_abs, eq=1.0)]
    state = [bits(p) for p in layer.parameters()]

    def host_read(*args, **kwargs):
        raise AssertionError("restore_feasibility read a value on the host (a GPU sync)")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    soft.restore_feasibility(cons, within=math.inf)
    monkeypatch.undo()
    assert all(torch.equal(bits(p), s) for p, s in zip(layer.parameters(), state, strict=True))


# ----------------------------------------------------------------- scipy_minimize
def in_domain(x: torch.Tensor) -> torch.Tensor:
    """(x - 4)², defined for x <= 2 only (NaN beyond): the minimum over the domain is x = 2."""
    return ((x - 4) ** 2).sum() + 0 * torch.sqrt(2 - x).sum()


def inf_beyond(x: torch.Tensor) -> torch.Tensor:
    """(x - 4)², +inf beyond x = 2 (a barrier written by hand)."""
    return ((x - 4) ** 2).sum() + torch.where(x > 2, torch.full_like(x, math.inf), 0 * x).sum()


@pytest.mark.parametrize(
    "method", ["L-BFGS-B", "Nelder-Mead", "TNC", "COBYLA", "SLSQP", "trust-ncg", "Newton-CG"]
)
@pytest.mark.parametrize(("objective", "word"), [(in_domain, "nan"), (inf_beyond, "inf")])
def test_scipy_non_finite_objective_is_a_failure(method, objective, word) -> None:
    """Before: L-BFGS-B/Nelder-Mead/COBYLA/SLSQP reported success (some at a NaN point), others
    failed without saying why, trust-ncg raised from inside scipy."""
    x = torch.zeros(1, dtype=DT, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = scipy_minimize(lambda: objective(x), [x], method=method)
    assert not res.success
    assert res.status == -1 and res.nonfinite == "objective"
    assert f"objective is {word}" in res.message and method in res.message
    # the parameters hold the best finite point evaluated, inside the domain
    assert x.item() <= 2 and np.isfinite(res.fun)
    assert float(objective(x.detach())) == pytest.approx(res.fun)


@pytest.mark.parametrize("method", ["L-BFGS-B", "BFGS", "SLSQP", "trust-ncg", "trust-constr"])
def test_scipy_nan_gradient_is_a_failure(method) -> None:
    """A finite objective with a NaN gradient (0·∂sqrt(x²) at 0). Before: trust-ncg raised a
    ValueError from scipy's norm, the others returned fun = nan without naming the cause."""
    x = torch.zeros(1, dtype=DT, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = scipy_minimize(
            lambda: ((x - 1) ** 2).sum() + 0 * (x**2).sqrt().sum(), [x], method=method
        )
    assert not res.success and res.nonfinite == "gradient"
    assert "gradient is nan" in res.message
    assert x.item() == 0.0  # back at the start: no finite evaluation


@pytest.mark.parametrize("method", ["SLSQP", "COBYLA"])
def test_scipy_non_finite_soft_constraint_is_a_failure_naming_it(method) -> None:
    """min (x+1)² s.t. log(x) <= -1 from x = 1: scipy tries x <= 0, where log is NaN/-inf.
    Before: COBYLA reported success; SLSQP 'incompatible constraints'."""
    x = torch.ones(1, dtype=DT, requires_grad=True)
    c = MaxConstraint(lambda: torch.log(x[0]), -1.0, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = scipy_minimize(lambda: ((x + 1) ** 2).sum(), [x], method=method, constraints=[c])
    assert not res.success
    assert c.describe() in res.message
    assert x.item() > 0 and math.isfinite(float(torch.log(x.detach())))  # a finite point
    assert c.lmbda.item() == 0.0  # multipliers untouched by a failed run


# ----------------------------------------------------------------- infeasible sets
def run_adam(cons: list, x: nn.Parameter, steps: int, **kw) -> MDMM:
    mdmm = MDMM(cons, **kw)
    opt = mdmm.make_optimizer([x], optimizer=torch.optim.Adam, lr=1e-2)
    for _ in range(steps):
        out = mdmm((x**2).sum())
        opt.zero_grad()
        out.value.backward()
        opt.step()
    return mdmm


def test_infeasible_pair_warns_once_naming_both_and_the_report_flags_them() -> None:
    """x <= 0 and x >= 1: the multipliers grow linearly for ever (|λ| = 20 after 2000 Adam
    steps), the violation stays at (0.25, 0.75). Before: silence."""
    x = nn.Parameter(torch.tensor([0.3], dtype=DT))
    cons = [
        MaxConstraint(lambda: x[0], 0.0, dtype=DT),
        MinConstraint(lambda: x[0], 1.0, dtype=DT),
    ]
    with pytest.warns(InfeasibleWarning) as record:
        mdmm = run_adam(cons, x, 2000)
    mine = [w for w in record if issubclass(w.category, InfeasibleWarning)]
    assert len(mine) == 1  # once, not at every check
    text = str(mine[0].message)
    assert cons[0].describe() in text and cons[1].describe() in text
    assert mine[0].filename == __file__  # points at the training loop's mdmm(...) call
    assert all(abs(c.lmbda.item()) > 15 for c in mdmm)  # it really diverges
    report = constraint_report(nn.Module(), extra=list(mdmm))
    assert [bool(r.note.startswith("infeasible?")) for r in report] == [True, True]
    assert "infeasible?" in str(report)


def test_single_unreachable_constraint_warns_under_the_method_of_multipliers() -> None:
    """x² <= -1 with LBFGS + dual_update: λ ← λ + ρc falls by ρ at every call, x = 0."""
    x = torch.tensor([0.5], dtype=DT, requires_grad=True)
    mdmm = MDMM([MaxConstraint(lambda: (x**2).sum(), -1.0, damping=2.0, dtype=DT)])
    opt = torch.optim.LBFGS([x], line_search_fn="strong_wolfe")
    with pytest.warns(InfeasibleWarning, match=r"(?s)dual_update calls.*<= -1") as record:
        for _ in range(12):

            def closure() -> torch.Tensor:
                opt.zero_grad()
                v = mdmm((x**2).sum()).value
                v.backward()
                return v

            opt.step(closure)
            dual_update(mdmm)
    assert sum(issubclass(w.category, InfeasibleWarning) for w in record) == 1


def test_the_check_can_be_turned_off() -> None:
    x = nn.Parameter(torch.tensor([0.3], dtype=DT))
    cons = [MaxConstraint(lambda: x[0], 0.0, dtype=DT), MinConstraint(lambda: x[0], 1.0, dtype=DT)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", InfeasibleWarning)
        run_adam(cons, x, 800, check_infeasible=0)


@settings(max_examples=8)
@given(
    a=st.floats(-3, 3),
    lo=st.floats(-2, 2),
    width=st.floats(0.2, 2),
    kind=st.sampled_from(["max", "min", "eq", "box"]),
)
def test_feasible_analytic_problems_do_not_warn(a, lo, width, kind) -> None:
    """min (x - a)² under one feasible constraint (any side, active or not), Adam 2000 steps:
    the answer is the projection of a, and no InfeasibleWarning. Before: no InfeasibleWarning
    to import (and the check did not exist)."""
    hi = lo + width
    x = nn.Parameter(torch.zeros(1, dtype=DT))
    make = {
        "max": lambda: MaxConstraint(lambda: x[0], hi, damping=2.0, dtype=DT),
        "min": lambda: MinConstraint(lambda: x[0], lo, damping=2.0, dtype=DT),
        "eq": lambda: EqConstraint(lambda: x[0], lo, damping=2.0, dtype=DT),
        "box": lambda: BoundConstraintHard(lambda: x[0], lo, hi, damping=2.0, dtype=DT),
    }[kind]
    mdmm = MDMM([make()])
    opt = mdmm.make_optimizer([x], optimizer=torch.optim.Adam, lr=5e-2)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.998)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InfeasibleWarning)
        for _ in range(2000):
            out = mdmm(((x - a) ** 2).sum())
            opt.zero_grad()
            out.value.backward()
            opt.step()
            sched.step()
    target = {"max": min(a, hi), "min": max(a, lo), "eq": lo, "box": min(max(a, lo), hi)}[kind]
    assert abs(x.item() - target) < 2e-2


@settings(max_examples=6)
@given(lo=st.floats(-2, 2), gap=st.floats(0.1, 2))
def test_infeasible_intervals_warn(lo, gap) -> None:
    """x <= lo and x >= lo + gap under min x²: always reported, within 2000 steps (measured
    on a grid of lo in [-2, 2], gap in [0.1, 2]: at 599 to 1499; 599 is the first check)."""
    x = nn.Parameter(torch.tensor([lo + gap / 3], dtype=DT))
    cons = [
        MaxConstraint(lambda: x[0], lo, dtype=DT),
        MinConstraint(lambda: x[0], lo + gap, dtype=DT),
    ]
    with pytest.warns(InfeasibleWarning):
        run_adam(cons, x, 2000)


# ----------------------------------------------------------------- construction
KINDS = {
    "EqConstraint(value)": lambda v: EqConstraint(lambda: torch.zeros(2), v, shape=(2,)),
    "MaxConstraint(max)": lambda v: MaxConstraint(lambda: torch.zeros(2), v, shape=(2,)),
    "MinConstraint(min)": lambda v: MinConstraint(lambda: torch.zeros(2), v, shape=(2,)),
    "MaxConstraintHard(max)": lambda v: MaxConstraintHard(lambda: torch.zeros(2), v, shape=(2,)),
    "MinConstraintHard(min)": lambda v: MinConstraintHard(lambda: torch.zeros(2), v, shape=(2,)),
    "BoundConstraintHard(min)": lambda v: BoundConstraintHard(
        lambda: torch.zeros(2), v, 5.0, shape=(2,)
    ),
    "BoundConstraintHard(max)": lambda v: BoundConstraintHard(
        lambda: torch.zeros(2), -5.0, v, shape=(2,)
    ),
}


@given(
    kind=st.sampled_from(sorted(KINDS)),
    as_tensor=st.booleans(),
    where=st.integers(0, 1),
)
def test_nan_bounds_are_refused_naming_the_constraint_and_argument(kind, as_tensor, where) -> None:
    """Before: accepted; the first step then blamed fn for the NaN (or, with check_finite off,
    every parameter became NaN)."""
    arg = kind[kind.index("(") + 1 : -1]
    value: float | torch.Tensor = math.nan
    if as_tensor:
        value = torch.tensor([0.5, 0.5])
        value[where] = math.nan
    with pytest.raises(
        ValueError, match=rf"^{kind[: kind.index('(')]}\(\S*<lambda>\(\)\): {arg}=.*NaN"
    ):
        KINDS[kind](value)


def test_unmeetable_infinite_bounds_are_refused_vacuous_ones_kept() -> None:
    for make in (
        lambda: EqConstraint(lambda: torch.zeros(()), math.inf),
        lambda: MaxConstraint(lambda: torch.zeros(()), -math.inf),
        lambda: MinConstraintHard(lambda: torch.zeros(()), math.inf),
    ):
        with pytest.raises(ValueError, match="infinity that no value of fn can meet"):
            make()
    c = MaxConstraint(lambda: torch.zeros(()), math.inf)  # vacuous: never binds
    assert float(c().value) == 0.0


@pytest.mark.parametrize("what", ["scale", "damping"])
@pytest.mark.parametrize("bad", [math.nan, -1.0, math.inf])
def test_bad_scale_or_damping_names_the_constraint(what, bad) -> None:
    """Before: 'EqConstraint: scale must be a finite number >= 0' (no fn, no fix)."""
    with pytest.raises(ValueError, match=rf"EqConstraint\(\S*<lambda>\(\)\): {what}=.* pass one"):
        EqConstraint(lambda: torch.zeros(()), 1.0, **{what: bad})


def test_constrain_errors_name_the_attribute() -> None:
    layer = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"constrain\(Linear\.weight\): EqConstraint.*value=nan"):
        constrain(layer, "weight", mean_abs, eq=math.nan)
    with pytest.raises(ValueError, match=r"constrain\(Linear\.bias\).*damping=nan"):
        constrain(layer, "bias", mean_abs, max=1.0, damping=math.nan)


def test_scale_that_overflows_adam_is_refused() -> None:
    """float32: scale = 1e30 puts (1e30·c·∂c)² = inf into Adam's second moment and freezes
    it (before: x stayed at its start for ever, λ too). Refused when built; fine in float64;
    refused again when the multipliers are cast to a narrower dtype."""
    with pytest.raises(
        ValueError, match=r"EqConstraint\(\S*<lambda>\(\)\): scale = 1e\+30 overflows"
    ):
        EqConstraint(lambda: torch.zeros(()), 1.0, scale=1e30)
    with pytest.raises(ValueError, match=r"scale·damping = 1e\+20 overflows"):
        EqConstraint(lambda: torch.zeros(()), 1.0, scale=1e10, damping=1e10)
    limit = math.sqrt(torch.finfo(torch.float32).max)
    EqConstraint(lambda: torch.zeros(()), 1.0, scale=0.99 * limit, damping=1.0)  # accepted
    c = EqConstraint(lambda: torch.zeros((), dtype=DT), 1.0, scale=1e30, dtype=DT)
    with pytest.raises(ValueError, match=r"overflows the optimizer.s statistics in torch\.float32"):
        MDMM([c]).float()
    small = EqConstraint(lambda: torch.zeros(()), 1.0, scale=1e3)
    with pytest.raises(ValueError, match="float16"):
        small.half()


# ----------------------------------------------------------------- damping advice
def settle(d: float, steps: int = 4000) -> tuple[int, float]:
    """min 0 s.t. x = 1 with SGD (lr 0.05) and damping d: (sign flips of c, final |c|). Only
    the damping damps here: f is flat along the constraint."""
    x = nn.Parameter(torch.zeros(1, dtype=DT))
    mdmm = MDMM([EqConstraint(lambda: x[0], 1.0, damping=d, dtype=DT)], check_infeasible=0)
    opt = mdmm.make_optimizer([x], optimizer=torch.optim.SGD, lr=0.05)
    flips, prev = 0, 1.0
    for _ in range(steps):
        out = mdmm(0.0 * x.sum())
        opt.zero_grad()
        out.value.backward()
        opt.step()
        c = 1.0 - x.item()
        flips += c * prev < 0
        prev = c
    return flips, abs(prev)


def test_damping_advice_goes_both_ways() -> None:
    """Too little damping oscillates, enough settles, too much diverges; the error for a
    divergence says both (before: 'raise damping' only, wrong for the stiff case)."""
    flips, c = settle(0.1)
    assert flips > 50 and c > 1e-3  # still oscillating after 4000 steps
    flips, c = settle(2.0)
    assert flips == 0 and c < 1e-12  # critically damped
    with pytest.raises(ValueError, match="not finite") as err:
        settle(60.0)  # lr·d = 3 > 2: |c| doubles every step, inf within ~1030 steps
    text = str(err.value)
    assert "too small" in text and "raise it" in text
    assert "too stiff" in text and "lower the damping" in text


# ----------------------------------------------------------------- constraint_report
def test_report_names_non_finite_tensors_behind_hard_constraints() -> None:
    """Before: a NaN row (or an exception from reading the weight) with no word of why, and
    report.worst ignored the NaN row."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)).double()
    mp.orthogonal(model[0], "weight")
    mp.bounded(model[1], "weight", low=-1.0, high=1.0)
    constrain(model[0], "weight", mean_abs, eq=0.5)
    constrain(model[2], "bias", l2, max=10.0)
    with torch.no_grad():
        model[0].parametrizations.weight.original[0] = math.nan
        model[1].parametrizations.weight[0].low.fill_(math.nan)
        model[2].bias[1] = math.inf
    report = constraint_report(model)
    rows = {(r.attribute, r.kind): r for r in report}
    assert "parametrizations.weight.original (1 of 3)" in rows["0.weight", "hard"].note
    assert math.isnan(rows["0.weight", "hard"].violation)
    assert math.isnan(rows["0.weight", "soft"].violation) and rows["0.weight", "soft"].note
    assert "buffer low" in rows["1.weight", "hard"].note
    assert "2.bias (1 of 3)" in rows["2.bias", "soft"].note
    assert math.isnan(report.worst)
    assert len(report.problems) == 4 and "note" in str(report).splitlines()[0]


def test_the_kinds_share_one_constructor_with_mdmms_signatures() -> None:
    """One __init__ for the six kinds (their bounds named by the class): mdmm's positional and
    keyword forms both work, the signature shows them, and a missing bound is named."""
    import inspect

    assert str(inspect.signature(BoundConstraintHard)) == (
        "(fn, min, max, scale=1.0, damping=1.0, *, shape=(), dtype=None)"
    )
    a = MaxConstraint(lambda: torch.zeros(()), 2.0, 0.5, 3.0)
    b = MaxConstraint(lambda: torch.zeros(()), max=2.0, scale=0.5, damping=3.0)
    assert [float(x) for x in (a.max, a.scale, a.damping)] == [2.0, 0.5, 3.0]
    assert [float(x) for x in (b.max, b.scale, b.damping)] == [2.0, 0.5, 3.0]
    with pytest.raises(TypeError, match="missing the bound value"):
        EqConstraint(lambda: torch.zeros(()))
    with pytest.raises(TypeError, match="unexpected or repeated argument 'max'"):
        MaxConstraint(lambda: torch.zeros(()), 1.0, max=2.0)


def test_a_stalled_constraint_warns_and_the_report_says_so() -> None:
    """The multipliers left out of the optimizer (Adam on the model only): the damping alone
    holds x at the penalty method's offset, 7/3 for min (x-3)² s.t. x = 1 (violation -4/3),
    and nothing grows. Before: silence (the infeasible check needs growing multipliers)."""
    x = nn.Parameter(torch.zeros(1, dtype=DT))
    con = EqConstraint(lambda: x[0], 1.0, dtype=DT)
    mdmm = MDMM([con])
    opt = torch.optim.Adam([x], lr=5e-2)
    with pytest.warns(soft.StalledWarning, match=r"(?s)stopped falling.*== 1") as record:
        for _ in range(1200):
            out = mdmm(((x - 3) ** 2).sum())
            opt.zero_grad()
            out.value.backward()
            opt.step()
    assert sum(issubclass(w.category, InfeasibleWarning) for w in record) == 1
    assert abs(x.item() - 7 / 3) < 1e-3 and con.lmbda.item() == 0
    (row,) = constraint_report(nn.Module(), extra=[con])
    assert row.note.startswith("stalled? violation flat at 1.33")
