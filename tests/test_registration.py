"""What every hard constraint shares: clear errors at registration, torch.parametrize
integration (is_parametrized, removal, state_dict), the train-and-stay-on-the-set pattern over
manifolds x sizes x Linear/Conv2d, and no host synchronisation in forward or backward."""

from __future__ import annotations

import copy

import geoopt
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils._python_dispatch import TorchDispatchMode

import manifoldparam as mp
from tests.cases import CASES as CONSTRAINT_CASES
from tests.cases import IDS as CASE_IDS
from tests.conftest import assert_on_stiefel, assert_spd

CONSTRAINTS = {
    "orthogonal": lambda m, name="weight": mp.orthogonal(m, name),
    "cayley": lambda m, name="weight": mp.orthogonal(m, name, map="cayley"),
    "spd": lambda m, name="weight": mp.spd(m, name, min_eigenvalue=1e-3),
    "bounded": lambda m, name="weight": mp.bounded(m, name, low=-0.2, high=0.3),
    "nonnegative": lambda m, name="weight": mp.nonnegative(m, name),
}


def assert_on_set(kind: str, w: torch.Tensor) -> None:
    if kind in ("orthogonal", "cayley"):
        assert_on_stiefel(w if w.dim() == 2 else w.reshape(w.shape[0], -1))
    elif kind == "spd":
        assert_spd(w, floor=1e-3 * (1 - 1e-6))
    elif kind == "bounded":
        assert bool(((w >= -0.2) & (w <= 0.3)).all())
    else:
        assert bool((w >= 0).all())


# ---------------------------------------------------------------- errors at registration
@pytest.mark.parametrize("kind", sorted(CONSTRAINTS))
def test_missing_attribute(kind):
    with pytest.raises(
        AttributeError, match=r"Linear has no parameter or buffer named 'wieght'.*'weight', 'bias'"
    ):
        CONSTRAINTS[kind](nn.Linear(3, 3), "wieght")


@pytest.mark.parametrize("kind", sorted(CONSTRAINTS))
def test_non_floating_dtype(kind):
    holder = nn.Module()
    holder.register_buffer("weight", torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(
        TypeError, match=r"Module\.weight has dtype torch\.int64.*module\.float\(\)"
    ):
        CONSTRAINTS[kind](holder)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("kind", sorted(CONSTRAINTS))
def test_nan_or_inf_weight(kind, bad):
    layer = nn.Linear(3, 3)
    with torch.no_grad():
        layer.weight[1, 2] = bad
    with pytest.raises(
        ValueError, match=r"Linear\.weight: the weight contains 1 NaN/Inf entries of 9"
    ):
        CONSTRAINTS[kind](layer)
    assert not parametrize.is_parametrized(layer)


@pytest.mark.parametrize("kind", sorted(CONSTRAINTS))
def test_nan_assignment_is_refused(kind):
    layer = CONSTRAINTS[kind](nn.Linear(3, 3))
    before = layer.weight.detach().clone()
    value = before.clone()
    value[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"Linear\.weight: the assigned value contains 1 NaN"):
        layer.weight = value
    torch.testing.assert_close(layer.weight, before, atol=0, rtol=0)


@pytest.mark.parametrize("kind", sorted(CONSTRAINTS))
def test_geoopt_manifold_parameter(kind):
    layer = nn.Linear(3, 3)
    layer.weight = geoopt.ManifoldParameter(layer.weight.detach(), manifold=geoopt.Stiefel())
    with pytest.raises(
        TypeError, match=r"Linear\.weight is a geoopt ManifoldParameter.*nn\.Parameter"
    ):
        CONSTRAINTS[kind](layer)


@pytest.mark.parametrize("kind", sorted(CONSTRAINTS))
def test_already_parametrized(kind):
    layer = CONSTRAINTS[kind](nn.Linear(3, 3))
    with pytest.raises(
        ValueError, match=r"Linear\.weight is already parametrized.*remove_parametrizations"
    ):
        mp.nonnegative(layer)


def test_class_built_for_another_shape():
    layer = nn.Linear(3, 4)
    with pytest.raises(ValueError, match=r"built for shape \(5, 5\).*shape \(4, 3\)"):
        mp.register(layer, "weight", mp.Orthogonal((5, 5)))
    assert not torch.nn.utils.parametrize.is_parametrized(layer)


def test_project_without_a_constraint():
    with pytest.raises(ValueError, match="has no manifoldparam constraint"):
        mp.project(nn.Linear(2, 2), "weight", torch.eye(2))


# ---------------------------------------------------------------- torch integration
@pytest.mark.parametrize("kind", sorted(CONSTRAINTS))
def test_torch_parametrize_integration(kind):
    layer = CONSTRAINTS[kind](nn.Linear(4, 4).double())
    assert parametrize.is_parametrized(layer, "weight")
    assert not parametrize.is_parametrized(layer, "bias")
    keys = set(layer.state_dict())
    assert "parametrizations.weight.original" in keys and "bias" in keys
    w = layer.weight.detach().clone()
    parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    assert not parametrize.is_parametrized(layer)
    torch.testing.assert_close(layer.weight, w, atol=0, rtol=0)


@pytest.mark.parametrize("kind", sorted(CONSTRAINTS))
def test_public_classes_work_with_register_parametrization(kind):
    """Direct use of the classes: the first right_inverse projects, later ones check."""
    classes = {
        "orthogonal": lambda s: mp.Orthogonal(s),
        "cayley": lambda s: mp.Orthogonal(s, map="cayley"),
        "spd": lambda s: mp.SPD(s, min_eigenvalue=1e-3),
        "bounded": lambda s: mp.Bounded(s, low=-0.2, high=0.3),
        "nonnegative": lambda s: mp.Nonnegative(s),
    }
    layer = nn.Linear(5, 5).double()
    parametrize.register_parametrization(
        layer, "weight", classes[kind](layer.weight.shape).double()
    )
    assert_on_set(kind, layer.weight)
    with pytest.raises(ValueError, match="The weight is unchanged"):
        layer.weight = torch.full((5, 5), -7.0, dtype=torch.float64)


@pytest.mark.parametrize("kind", sorted(CONSTRAINTS))
def test_state_dict_round_trip(kind):
    source = CONSTRAINTS[kind](nn.Linear(6, 6).double())
    with torch.no_grad():
        orig = source.parametrizations.weight.original
        orig.add_(0.3 * torch.randn_like(orig))
    if kind in ("orthogonal", "cayley"):  # a non-trivial base point must travel too
        source.weight = mp.project(source, "weight", torch.randn(6, 6, dtype=torch.float64))
        with torch.no_grad():
            orig.add_(0.3 * torch.randn_like(orig))
    state = copy.deepcopy(source.state_dict())
    target = CONSTRAINTS[kind](nn.Linear(6, 6).double())
    target.load_state_dict(state)
    torch.testing.assert_close(target.weight, source.weight, atol=0, rtol=0)


# ---------------------------------------------------------------- integration pattern
LAYERS = {
    "linear-square": lambda: nn.Linear(8, 8),
    "linear-tall": lambda: nn.Linear(3, 9),
    "linear-wide": lambda: nn.Linear(9, 3),
    "conv2d": lambda: nn.Conv2d(3, 4, 3),
}


CASES = [(k, n) for k in sorted(CONSTRAINTS) for n in sorted(LAYERS)]
CASES = [(k, n) for k, n in CASES if k != "spd" or n == "linear-square"]  # spd: square only


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind,layer_name", CASES)
def test_sample_assign_train_stays_on_set(kind, layer_name, dtype):
    layer = LAYERS[layer_name]().to(dtype)
    CONSTRAINTS[kind](layer)
    assert_on_set(kind, layer.weight)
    layer.weight = mp.project(layer, "weight", torch.randn_like(layer.weight))  # assign
    assert_on_set(kind, layer.weight)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    x = torch.randn(
        16, *((3, 6, 6) if layer_name == "conv2d" else (layer.in_features,)), dtype=dtype
    )
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = (layer(x) - 1.0).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]  # it trains
    assert_on_set(kind, layer.weight)


# ---------------------------------------------------------------- no host sync
class _SyncDetector(TorchDispatchMode):
    """Records every op that copies a tensor value to the host (item, bool, float, nonzero)."""

    SYNCS = ("aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero", "aten::equal")

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.SYNCS:
            self.seen.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def test_sync_detector_sees_a_sync():
    with _SyncDetector() as d:
        float(torch.ones(2).sum())
    assert d.seen == ["aten::_local_scalar_dense"]


SYNC_FREE = {**CONSTRAINTS, "orthogonal": lambda m: mp.orthogonal(m, max_squarings=10)}


@pytest.mark.parametrize("kind", sorted(SYNC_FREE))
def test_forward_and_backward_never_sync_with_the_host(kind):
    """What runs on an accelerator: the expm map with its sync-free (masked) squarings; on
    the CPU it reads four norms on the host instead, which costs nothing there."""
    layer = SYNC_FREE[kind](nn.Linear(6, 6))
    x = torch.randn(4, 6)
    with _SyncDetector() as d:
        layer(x).square().sum().backward()
    assert d.seen == []


@pytest.mark.parametrize("kind", sorted(CONSTRAINTS))
def test_weight_compiles_into_one_graph(kind):
    """fullgraph=True fails on any graph break (data-dependent Python branching)."""
    layer = CONSTRAINTS[kind](nn.Linear(5, 5))
    compiled = torch.compile(lambda: layer.weight, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(), layer.weight)


@pytest.mark.parametrize("case", CONSTRAINT_CASES, ids=CASE_IDS)
def test_registration_draws_nothing_from_the_global_rng(case) -> None:
    """Two models built from one seed are equal whatever was registered before: registration
    must not draw random numbers (the tied-weight check's first call built an nn.Linear probe,
    whose init shifted every later draw, once per process)."""
    from manifoldparam.hard import registration

    registration._refs_when_alone.cache_clear()
    torch.manual_seed(0)
    case.constrain(case.build())
    after = torch.randn(3)
    torch.manual_seed(0)
    case.build()
    assert torch.equal(torch.randn(3), after)
