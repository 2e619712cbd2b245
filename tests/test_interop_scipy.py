"""The scipy bridge: flat coordinates, autograd gradients / HVPs, native soft constraints."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import manifoldparam as mp
from manifoldparam.caching import cached_closure
from manifoldparam.interop import FlatObjective, scipy_minimize
from manifoldparam.soft import (
    MDMM,
    BoundConstraintHard,
    EqConstraint,
    MaxConstraint,
    MaxConstraintHard,
    MinConstraint,
    MinConstraintHard,
    constrain,
    dual_update,
    row_norms,
    soft_constraints,
)
from tests.conftest import assert_on_stiefel, assert_spd

pytest.importorskip("scipy")
DTYPE = torch.float64


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Linear(4, 4, dtype=DTYPE), nn.Tanh(), nn.Linear(4, 3, bias=False, dtype=DTYPE)
    )
    mp.orthogonal(m[0])
    return m


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 4, dtype=DTYPE, generator=g)
    return x, torch.randn(32, 3, dtype=DTYPE, generator=g)


def _loss(m: nn.Module) -> torch.Tensor:
    x, y = _data()
    return ((m(x) - y) ** 2).mean()


def test_gradient_and_hvp_match_finite_differences() -> None:
    m = _model()
    f = FlatObjective(lambda: _loss(m), list(m.parameters()))
    rng = np.random.default_rng(0)
    x = f.x0() + 0.1 * rng.standard_normal(f.size)
    v = rng.standard_normal(f.size)
    _, g = f.fun_and_grad(x)
    eps = 1e-6
    fd = (f.fun(x + eps * v) - f.fun(x - eps * v)) / (2 * eps)
    assert abs(fd - g @ v) < 1e-7 * max(1.0, abs(fd))
    _, g_plus = f.fun_and_grad(x + eps * v)
    _, g_minus = f.fun_and_grad(x - eps * v)
    np.testing.assert_allclose(f.hessp(x, v), (g_plus - g_minus) / (2 * eps), atol=1e-6)
    h = f.hess(x)
    np.testing.assert_allclose(h, h.T, atol=0)
    np.testing.assert_allclose(h @ v, f.hessp(x, v), atol=1e-12)


def test_cached_closure_gives_the_same_gradients_and_hvps() -> None:
    """What the matrix's cached cells rely on: caching changes no number beyond round-off."""
    m = _model()
    params = list(m.parameters())
    plain = FlatObjective(lambda: _loss(m), params)
    cached = FlatObjective(cached_closure(lambda: _loss(m)), params)
    rng = np.random.default_rng(1)
    x = plain.x0() + 0.1 * rng.standard_normal(plain.size)
    for v in rng.standard_normal((3, plain.size)):
        np.testing.assert_allclose(cached.hessp(x, v), plain.hessp(x, v), rtol=0, atol=1e-14)
    np.testing.assert_allclose(cached.fun_and_grad(x)[1], plain.fun_and_grad(x)[1], atol=1e-15)


@pytest.mark.parametrize("method", ["L-BFGS-B", "BFGS", "Newton-CG", "trust-ncg", "trust-exact"])
def test_minimize_keeps_the_hard_constraint_and_writes_the_result(method: str) -> None:
    m = _model()
    with torch.no_grad():
        start = float(_loss(m))
    res = scipy_minimize(lambda: _loss(m), m, method=method, options={"maxiter": 15})
    with torch.no_grad():
        end = float(_loss(m))
    assert end < 0.8 * start
    assert end == pytest.approx(res.fun, rel=1e-12)
    np.testing.assert_array_equal(FlatObjective(lambda: _loss(m), list(m.parameters())).x0(), res.x)
    assert_on_stiefel(m[0].weight)
    if method in ("Newton-CG", "trust-ncg"):
        assert res.nhev > 0


def test_float32_parameters_are_optimized_in_float64_and_cast_back() -> None:
    m = _model().float()
    x, y = _data()
    res = scipy_minimize(
        lambda: ((m(x.float()) - y.float()) ** 2).mean(), m, options={"maxiter": 10}
    )
    assert res.nit > 0
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert_on_stiefel(m[0].weight)


@pytest.mark.parametrize("method", ["SLSQP", "trust-constr"])
def test_soft_constraints_become_native_scipy_constraints(method: str) -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3, dtype=DTYPE), nn.Tanh(), nn.Linear(3, 3, dtype=DTYPE))
    mp.spd(m[2])
    constrain(m[0], "weight", row_norms, eq=0.5)  # vector-valued: one row per output unit
    constrain(m[0], "bias", torch.sum, max=-0.2)  # an inequality that starts violated
    constrain(m[2], "bias", torch.sum, min=-0.1, max=0.1, clamp=True)  # a two-sided bound
    with torch.no_grad():
        m[0].bias.fill_(0.3)
    mdmm = MDMM(soft_constraints(m))
    with torch.no_grad():
        start = float(_loss(m))
    res = scipy_minimize(
        lambda: _loss(m), m, method=method, constraints=mdmm, options={"maxiter": 200}
    )
    tol = 1e-6 if method == "SLSQP" else 1e-5  # trust-constr: a barrier method
    assert res.success or method == "trust-constr", res.message
    with torch.no_grad():
        norms = row_norms(m[0].weight)
        torch.testing.assert_close(norms, torch.full((3,), 0.5, dtype=DTYPE), rtol=0, atol=tol)
        assert float(m[0].bias.sum()) <= -0.2 + tol
        assert abs(float(m[2].bias.sum())) <= 0.1 + tol
        assert float(mdmm.violation()) < tol
        assert float(_loss(m)) < start
    assert_spd(m[2].weight)


def test_function_constraints_and_scipy_objects_mix() -> None:
    from scipy.optimize import NonlinearConstraint

    m = _model()
    w = m[2].weight
    eq = EqConstraint(lambda: w.sum(), 1.0)
    extra = NonlinearConstraint(lambda x: x[-1], -np.inf, 0.0)  # scipy's own, on the vector
    scipy_minimize(
        lambda: _loss(m), m, method="SLSQP", constraints=[eq, extra], options={"maxiter": 100}
    )
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-6)
    assert float(w.reshape(-1)[-1]) <= 1e-8
    assert_on_stiefel(m[0].weight)


def test_errors_name_the_fix() -> None:
    m = _model()
    c = EqConstraint(lambda: m[2].weight.sum(), 1.0)
    with pytest.raises(ValueError, match="dual_update"):
        scipy_minimize(lambda: _loss(m), m, method="L-BFGS-B", constraints=[c])
    with pytest.raises(TypeError, match="autograd"):
        scipy_minimize(lambda: _loss(m), m, jac=True)
    with pytest.raises(ValueError, match="scalar"):
        scipy_minimize(lambda: m[2].weight, m)
    frozen = _model().requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to optimize"):
        scipy_minimize(lambda: _loss(frozen), frozen)


def test_compiled_module_with_a_second_order_method_is_refused_up_front() -> None:
    m = _model()
    compiled = torch.compile(m)  # nothing is compiled until it is called
    with pytest.raises(TypeError, match="_orig_mod"):
        scipy_minimize(lambda: _loss(compiled), compiled, method="trust-ncg")


# --------------------------------------------------------------------- multipliers back
def _kkt_problem() -> tuple[list[nn.Parameter], Callable[[], torch.Tensor], list[Any], list[Any]]:
    """A separable problem, one constraint kind per variable, with known multipliers in the
    library's convention: the Lagrangian ``f + scale·λ·c`` with ``c = value - fn``,
    ``max - fn``, ``fn - min`` or the clamp kinds' ``clamp(fn) - fn`` is stationary,
    ``f' + scale·λ·∂c/∂fn = 0``."""
    a = nn.Parameter(torch.zeros(2, dtype=DTYPE))
    b, c, e, g, k = (nn.Parameter(torch.zeros((), dtype=DTYPE)) for _ in range(5))
    d = nn.Parameter(torch.tensor(0.5, dtype=DTYPE))
    h = nn.Parameter(torch.zeros(2, dtype=DTYPE))

    def f() -> torch.Tensor:
        return (
            (a**2).sum()
            + (b - 2) ** 2
            + (c + 2) ** 2
            + d**2
            + (e + 2) ** 2
            + (g - 2) ** 2
            + (h - torch.tensor([2.0, -2.0], dtype=DTYPE)).pow(2).sum()
            + (k - 3) ** 2
        )

    kw: dict[str, Any] = {"damping": 10.0, "dtype": DTYPE}
    constraints = [
        EqConstraint(lambda: a.sum(), 1.0, **kw),  # a = (.5, .5), ∇f = (1, 1): λ = 1
        MaxConstraint(lambda: b, 1.0, **kw),  # b = 1, f' = -2: λ = -2
        MinConstraint(lambda: c, -1.0, **kw),  # c = -1, f' = 2, ∂c/∂fn = +1: λ = -2
        MaxConstraint(lambda: d, 1.0, **kw),  # not binding: λ = 0
        MinConstraintHard(lambda: e, -1.0, **kw),  # e = -1, f' = 2: λ = 2
        MaxConstraintHard(lambda: g, 1.0, **kw),  # g = 1, f' = -2: λ = -2
        BoundConstraintHard(lambda: h, -1.0, 1.0, shape=(2,), **kw),  # λ = (-2, 2)
        EqConstraint(lambda: k, 1.0, scale=2.0, **kw),  # f' = -4 = 2λ: λ = -2
    ]
    expected = [1.0, -2.0, -2.0, 0.0, 2.0, -2.0, [-2.0, 2.0], -2.0]
    return [a, b, c, d, e, g, h, k], f, constraints, expected


@pytest.mark.filterwarnings("ignore:Equality and inequality constraints are specified")
@pytest.mark.filterwarnings("ignore:delta_grad == 0.0")  # scipy's BFGS on the linear `first`
@pytest.mark.parametrize("method", ["SLSQP", "trust-constr"])
def test_scipy_multipliers_come_back_in_the_library_convention(method: str) -> None:
    from scipy.optimize import NonlinearConstraint

    params, f, constraints, expected = _kkt_problem()
    z = nn.Parameter(torch.zeros(2, dtype=DTYPE))  # scipy's own constraints come first: one
    first = NonlinearConstraint(  # equality and one inequality row (SLSQP splits it in two)
        lambda x: x[-2:], [0.25, -np.inf], [0.25, 0.5]
    )
    res = scipy_minimize(
        lambda: f() + (z**2).sum(),
        [*params, z],
        method=method,
        constraints=[first, *constraints],
        options={"maxiter": 500},
    )
    assert res.success, res.message
    for con, want in zip(constraints, expected, strict=True):
        got = con.lmbda.detach()
        torch.testing.assert_close(got, torch.tensor(want, dtype=DTYPE), rtol=0, atol=1e-5)
        assert con.lmbda.grad is None

    # the augmented Lagrangian is stationary at scipy's solution (checked where fn's kind is
    # differentiable there: the clamp kinds' derivative at their bound is one-sided)
    mdmm = MDMM(constraints)
    grads = torch.autograd.grad(mdmm(f()).value, params[:4] + params[7:])
    assert max(float(gr.abs().max()) for gr in grads) < 1e-5


def test_training_continues_from_scipys_solution_with_the_method_of_multipliers() -> None:
    params, f, constraints, _ = _kkt_problem()
    params, constraints = params[:4] + params[7:], constraints[:4] + constraints[7:]
    mdmm = MDMM(constraints)
    scipy_minimize(f, params, method="SLSQP", constraints=mdmm)

    def solve() -> None:
        opt = torch.optim.LBFGS(params, line_search_fn="strong_wolfe", tolerance_grad=1e-12)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            value = mdmm(f()).value
            value.backward()
            return value

        opt.step(closure)

    def continue_training() -> float:
        """Three rounds of LBFGS on the augmented Lagrangian + dual_update; the farthest
        any round's solution went from the starting point."""
        start = [p.detach().clone() for p in params]
        moved = 0.0
        for _ in range(3):
            solve()
            dual_update(mdmm)
            moved = max(
                [moved] + [float((p - s).abs().max()) for p, s in zip(params, start, strict=True)]
            )
        return moved

    lambdas = [c.lmbda.detach().clone() for c in constraints]
    assert continue_training() < 1e-6  # from scipy's (x, λ): already a KKT point
    for c, lam in zip(constraints, lambdas, strict=True):
        torch.testing.assert_close(c.lmbda.detach(), lam, rtol=0, atol=1e-6)
    # from λ = 0 (what the multipliers were before) the first solve leaves the solution
    with torch.no_grad():
        for c in constraints:
            c.lmbda.zero_()
    assert continue_training() > 1e-2
