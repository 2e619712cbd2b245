"""torch's own parametrization utilities on our constraints (gaps found by running PyTorch's
parametrization tests against us): ``transfer_parametrizations_and_params`` and so
``torch.ao.quantization.prepare_qat`` keep the source intact and the target constrained;
``remove_parametrizations(..., leave_parametrized=False)`` leaves a tensor of the weight's
shape; a 1-D attribute is not silently made a unit vector."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import manifoldparam as mp
from tests.cases import CASES, IDS, square


def trained(case, seed: int = 0) -> nn.Module:
    """A constrained module moved off its starting point (an orthogonal base matters then)."""
    torch.manual_seed(seed)
    m = case.constrain(case.build().to(case.dtype(torch.float64)))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        square(m(case.randn(case.inputs, torch.float64))).sum().backward()
        opt.step()
    return m


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_transfer_keeps_the_source_and_constrains_the_target(case) -> None:
    source = trained(case)
    before = {k: v.clone() for k, v in source.state_dict().items()}
    weight = source.weight.detach().clone()
    target = case.build().to(case.dtype(torch.float64))  # its own weight, off the set
    parametrize.transfer_parametrizations_and_params(source, target, "weight")

    for k, v in source.state_dict().items():  # the source bit for bit, buffers included
        assert torch.equal(v, before[k]), k
    assert torch.equal(source.weight, weight)
    assert torch.equal(target.weight, weight)  # the source's coordinates, shared
    assert target.parametrizations.weight[0] is source.parametrizations.weight[0]
    case.oracle(target.weight.detach(), torch.float64)

    opt = torch.optim.SGD(target.parameters(), lr=0.1)  # trains, and stays on the set
    square(target(case.randn(case.inputs, torch.float64))).sum().backward()
    opt.step()
    case.oracle(target.weight.detach(), torch.float64)
    assert not torch.equal(target.weight, weight)


def test_prepare_qat_keeps_the_float_model_and_an_orthogonal_qat_weight() -> None:
    import torch.ao.quantization as q

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    mp.orthogonal(model[0])
    with torch.no_grad():
        model[0].parametrizations.weight.original.add_(0.3)
    mp.rebase(model)  # a base point away from the identity
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.qconfig = q.get_default_qat_qconfig("fbgemm")
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notices of eager quantization
        qat = q.prepare_qat(model, inplace=False)

    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert isinstance(qat[0], torch.ao.nn.qat.Linear)
    assert parametrize.is_parametrized(qat[0], "weight")
    torch.testing.assert_close(qat[0].weight, model[0].weight, rtol=0, atol=0)
    x = torch.randn(4, 8)
    opt = torch.optim.SGD(qat.parameters(), lr=0.1)
    qat(x).square().sum().backward()
    opt.step()
    w = qat[0].weight.detach()
    torch.testing.assert_close(w.T @ w, torch.eye(8), rtol=0, atol=1e-5)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("leave", [True, False])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_removal_leaves_the_weight_whatever_leave_parametrized_says(case, leave: bool) -> None:
    """The coordinates are minimal (another shape), so there is no unparametrized tensor of the
    weight's shape to restore: ``leave_parametrized=False`` leaves the current value too, in the
    same Parameter, and the module still runs."""
    m = trained(case)
    weight = m.weight.detach().clone()
    coords = m.parametrizations.weight.original
    parametrize.remove_parametrizations(m, "weight", leave_parametrized=leave)
    assert not parametrize.is_parametrized(m)
    assert m.weight is coords and isinstance(m.weight, nn.Parameter)
    assert torch.equal(m.weight, weight)
    m(case.randn(case.inputs, torch.float64))


def test_other_parametrizations_keep_torch_semantics_on_removal() -> None:
    class Double(nn.Module):
        def forward(self, x):
            return 2 * x

    m = nn.Linear(3, 3)
    original = m.weight.detach().clone()
    parametrize.register_parametrization(m, "weight", Double())
    parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
    assert torch.equal(m.weight, original)


@pytest.mark.parametrize("map_", ["expm", "cayley"])
def test_a_vector_is_not_silently_made_a_unit_vector(map_: str) -> None:
    m = nn.Linear(4, 4)
    bias = m.bias.detach().clone()
    with pytest.raises(ValueError, match=r"Linear\.bias: orthogonal needs a matrix.*vector_norm"):
        mp.orthogonal(m, "bias", map=map_)
    assert not parametrize.is_parametrized(m) and torch.equal(m.bias, bias)
