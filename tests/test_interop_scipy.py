"""The scipy bridge: flat coordinates, autograd gradients / HVPs, native soft constraints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import manifoldparam as mp
from manifoldparam.caching import cached_closure
from manifoldparam.interop import FlatObjective, scipy_minimize
from manifoldparam.soft import MDMM, EqConstraint, constrain, row_norms, soft_constraints
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
    constrain(m[2], "bias", torch.sum, min=-0.1, max=0.1, hard=True)  # a two-sided bound
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
