"""torch.func through constrained modules: the coordinate-key convention, vmap per-sample grads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import manifoldparam as mp
from manifoldparam.caching import cached
from manifoldparam.interop import check_functional_keys, functional_call, per_sample_grads
from tests.conftest import assert_on_stiefel, assert_spd

DTYPE = torch.float64
W1 = "0.parametrizations.weight.original"


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Linear(4, 4, dtype=DTYPE), nn.Tanh(), nn.Linear(4, 4, bias=False, dtype=DTYPE)
    )
    mp.orthogonal(m[0])
    mp.spd(m[2])
    return m


def test_coordinates_keys_give_constrained_values_for_any_values_passed() -> None:
    m = _model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    params = {k: torch.randn_like(v) * 3 for k, v in m.named_parameters()}
    seen = {}

    def grab(module: nn.Module, inputs: object) -> None:
        seen[module] = module.weight.detach().clone()

    hooks = [m[0].register_forward_pre_hook(grab), m[2].register_forward_pre_hook(grab)]
    x = torch.randn(3, 4, dtype=DTYPE)
    out = functional_call(m, params, (x,))
    for h in hooks:
        h.remove()
    assert_on_stiefel(seen[m[0]])
    assert_spd(seen[m[2]])
    # the same as writing those coordinates into a copy of the model
    other = _model()
    with torch.no_grad():
        for k, p in other.named_parameters():
            p.copy_(params[k])
    torch.testing.assert_close(out, other(x), rtol=0, atol=0)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())  # source untouched


def test_constrained_keys_are_refused_with_the_coordinate_name() -> None:
    m = _model()
    with pytest.raises(KeyError, match=r"'0\.weight' -> '0\.parametrizations\.weight\.original'"):
        functional_call(m, {"0.weight": torch.eye(4, dtype=DTYPE)}, (torch.zeros(1, 4),))
    with pytest.raises(KeyError, match="unknown keys"):
        check_functional_keys(m, ["0.wieght"])
    check_functional_keys(m, [W1, "0.bias", "0.parametrizations.weight.0.base"])


def test_why_the_constrained_key_is_refused() -> None:
    """torch's own functional_call with "0.weight" assigns through the constraint: it rewrites
    the module's coordinates and base point (and fails for a value off the set)."""
    m = _model()
    base = m[0].parametrizations.weight[0].base.clone()
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=DTYPE))
    torch.func.functional_call(m, {"0.weight": q}, (torch.zeros(1, 4, dtype=DTYPE),))
    assert not torch.equal(m[0].parametrizations.weight[0].base, base)


def test_functional_call_inside_a_cached_block_uses_the_passed_tensors() -> None:
    m = _model()
    x = torch.randn(3, 4, dtype=DTYPE)
    params = {k: v + 0.5 for k, v in m.named_parameters()}
    with cached():
        own = m(x)  # caches the module's own weights
        passed = functional_call(m, params, (x,))
    assert not torch.allclose(own, passed)
    torch.testing.assert_close(passed, functional_call(m, params, (x,)), rtol=0, atol=0)


def test_vmap_per_sample_gradients_average_to_the_batch_gradient() -> None:
    m = _model()
    x = torch.randn(6, 4, dtype=DTYPE)
    y = torch.randn(6, 4, dtype=DTYPE)
    params = dict(m.named_parameters())
    grads = per_sample_grads(m, F.mse_loss, params, x, y)
    assert set(grads) == set(params)
    assert grads[W1].shape == (6, *params[W1].shape)
    F.mse_loss(m(x), y).backward()
    for k, p in params.items():
        torch.testing.assert_close(grads[k].mean(0), p.grad, rtol=1e-12, atol=1e-14)
    # per-sample: sample 2 alone
    m.zero_grad()
    F.mse_loss(m(x[2:3]).squeeze(0), y[2]).backward()
    torch.testing.assert_close(grads[W1][2], params[W1].grad, rtol=1e-12, atol=1e-14)
