"""torch.compile (inductor): first-order training of a constrained model; second-order refused
with a message that says what to do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import manifoldparam as mp
from manifoldparam.interop import check_second_order, scipy_minimize
from tests.conftest import assert_on_stiefel, assert_spd


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6, bias=False), nn.Linear(6, 2))
    mp.orthogonal(m[0])
    mp.bounded(m[0], "bias", low=-0.5, high=0.5)
    mp.spd(m[2])
    mp.nonnegative(m[3])
    return m


def test_compiled_training_and_second_order_message() -> None:
    pytest.importorskip("torch._inductor")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=g)
    with torch.no_grad():
        y = _model(seed=5)(x)  # a teacher of the same form: the fit can be good
    model = _model()
    compiled = torch.compile(model)  # inductor

    def loss() -> torch.Tensor:
        return ((compiled(x) - y) ** 2).mean()

    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    with torch.no_grad():
        start = float(((model(x) - y) ** 2).mean())
    for _ in range(20):
        value = loss()
        opt.zero_grad()
        value.backward()
        opt.step()
    with torch.no_grad():
        end = float(loss())
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    assert end < 0.8 * start
    assert_on_stiefel(model[0].weight)
    assert_spd(model[2].weight)
    assert bool(((model[0].bias >= -0.5) & (model[0].bias <= 0.5)).all())
    assert bool((model[3].weight >= 0).all())

    # second order: refused up front when the compiled module is passed ...
    with pytest.raises(TypeError, match=r"compiled\._orig_mod"):
        check_second_order(compiled, "newton-exact")
    # ... and torch's own error (a double backward through the compiled graph) is translated
    # when the objective calls a compiled module the bridge cannot see
    with pytest.raises(TypeError, match=r"torch\.compile.*uncompiled module"):
        scipy_minimize(loss, model, method="trust-ncg", options={"maxiter": 2})
    # the uncompiled module shares the parameters and works
    res = scipy_minimize(
        lambda: ((compiled._orig_mod(x) - y) ** 2).mean(),
        model,
        method="trust-ncg",
        options={"maxiter": 3},
    )
    assert res.fun <= end
    assert_on_stiefel(model[0].weight)
