"""The conformance suite: every constraint of ``tests/cases.py`` (the library's and a user's
own, written from the docs) runs the same property tests of the Parametrization contract.

Float64 throughout, seeded; the membership oracle of each case does not use the library.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.autograd import gradcheck
from torch.autograd.functional import jacobian

import manifoldparam as mp
from tests.cases import CASES, IDS, Case, square

DT = torch.float64
HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA"))]


def built(case: Case, device: str = "cpu", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return case.constrain(case.build().to(device=device, dtype=case.dtype(DT)))


def param(m: nn.Module) -> mp.Parametrization:
    p = m.parametrizations.weight[0]
    assert isinstance(p, mp.Parametrization)
    return p


def coords(m: nn.Module) -> Tensor:
    return m.parametrizations.weight.original


def cpu(t: Tensor) -> Tensor:
    return t.detach().cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_registration_keeps_the_weight_moved_to_the_nearest_point(case: Case, device) -> None:
    torch.manual_seed(0)
    m = case.build().to(device=device, dtype=case.dtype(DT))
    before = m.weight.detach().clone()
    case.constrain(m)
    w = m.weight.detach()
    case.oracle(cpu(w), DT)
    torch.testing.assert_close(w, param(m).project(before), atol=1e-10, rtol=0)
    # a weight already on the set is kept exactly (to round-off)
    m2 = case.build().to(device=device, dtype=case.dtype(DT))
    with torch.no_grad():
        m2.weight.copy_(w)
    case.constrain(m2)
    torch.testing.assert_close(m2.weight.detach(), w, atol=1e-10, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@given(seed=st.integers(0, 2**16), scale=st.sampled_from([0.1, 1.0, 5.0]))
def test_assignment_round_trips_and_off_set_values_are_refused(case: Case, seed, scale) -> None:
    """``module.weight = w`` for ``w`` on the set reads back ``w``; a value off the set raises a
    ValueError naming the attribute and changes nothing (coordinates and buffers bit-equal)."""
    m = built(case)
    g = torch.Generator().manual_seed(seed)
    raw = scale * case.randn(m.weight.shape, DT, generator=g)
    target = mp.project(m, "weight", raw)
    case.oracle(target, DT)
    m.weight = target
    torch.testing.assert_close(m.weight.detach(), target, atol=1e-10, rtol=0)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    off = 10 * case.randn(m.weight.shape, DT, generator=g) - 5
    with pytest.raises(ValueError, match=r"\.weight = X: X is not .* The weight is unchanged"):
        m.weight = off
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_check_explains(case: Case) -> None:
    m = built(case)
    p = param(m)
    assert p.check(m.weight) is True
    assert p.check(m.weight, explain=True) == (True, None)
    ok, why = p.check(10 * torch.randn_like(m.weight) - 5, explain=True)
    assert not ok and isinstance(why, str) and why
    ok, why = p.check(torch.zeros(3, dtype=DT), explain=True)
    assert not ok and "shape" in why


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_coordinates_are_minimal_with_a_full_rank_jacobian(case: Case) -> None:
    """``original.numel() == dim`` and the map's Jacobian at random coordinates has rank
    ``dim``: no direction of the coordinates is dead (torch's orthogonal: 21 of 36 at n = 6)."""
    m = built(case)
    p = param(m)
    assert coords(m).numel() == p.dim
    # (random moderate coordinates: registration's can sit where tanh or softplus saturate)
    x = 0.5 * torch.randn_like(coords(m).detach())
    rank = p.dim
    if case.complex:  # (real and imaginary parts; the set's real dimension, see Unitary)
        x = torch.view_as_real(x)
        rank = p.real_dimension

        def f(xr: Tensor) -> Tensor:
            return torch.view_as_real(p.map(torch.view_as_complex(xr)))

        jac = jacobian(f, x).reshape(2 * m.weight.numel(), x.numel())
    else:
        jac = jacobian(p.map, x).reshape(m.weight.numel(), p.dim)
    s = torch.linalg.svdvals(jac)
    assert int((s > 1e-9 * s.max()).sum()) == rank


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradcheck(case: Case) -> None:
    m = built(case)
    x = (coords(m).detach() + 0.2 * torch.randn_like(coords(m))).requires_grad_()
    assert gradcheck(param(m).map, (x,))


@pytest.mark.parametrize("mode", ["cached", "auto"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cached_equals_uncached(case: Case, mode: str) -> None:
    """Reads inside a cache give the uncached value and gradient (the map evaluated once)."""
    x = case.randn(case.inputs, DT)

    def run(m: nn.Module) -> tuple[Tensor, Tensor]:
        out = sum(square(m(x)).sum() for _ in range(3))  # three reads of the weight
        out.backward()
        return out.detach(), coords(m).grad.clone()

    ref = run(built(case))
    m = built(case)
    if mode == "auto":
        mp.auto_cache(m)
        got = run(m)
    else:
        with mp.cached():
            got = run(m)
    torch.testing.assert_close(got[0], ref[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(got[1], ref[1], atol=1e-12, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_dict_round_trip(case: Case) -> None:
    """A model of another seed loads the state and reads the same weight, bit for bit; a
    training step after the load matches too."""
    a, b = built(case, seed=0), built(case, seed=1)
    opt_steps = 2
    for m in (a,):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for _ in range(opt_steps):
            opt.zero_grad()
            square(m(torch.ones(case.inputs, dtype=case.dtype(DT)))).sum().backward()
            opt.step()
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.weight, a.weight)
    case.oracle(cpu(b.weight), DT)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_training_stays_on_the_set(case: Case, device) -> None:
    m = built(case, device)
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    x = case.randn(case.inputs, DT, device=device)
    for _ in range(10):
        opt.zero_grad()
        square(m(x)).mean().backward()
        opt.step()
        case.oracle(cpu(m.weight), DT)


def test_a_user_constraint_gets_everything_from_the_base() -> None:
    """The documented ``Symmetric`` (tests/cases.py runs the docstring's code): registration
    through mp.register, the checked assignment, caching (computed once), and a wrong ``dim``
    refused at registration with the module unchanged."""
    from tests.cases import Symmetric

    layer = mp.register(nn.Linear(4, 4).double(), "weight", Symmetric)
    assert coords(layer).numel() == 10
    with pytest.raises(ValueError, match=r"Linear\.weight = X: X is not symmetric"):
        layer.weight = torch.randn(4, 4, dtype=DT)
    calls = [0]
    original = Symmetric.map

    def counted(self: nn.Module, x: Tensor) -> Tensor:
        calls[0] += 1
        return original(self, x)

    Symmetric.map = counted  # type: ignore[method-assign]
    try:
        with mp.cached():
            for _ in range(5):
                layer(torch.ones(2, 4, dtype=DT))
    finally:
        Symmetric.map = original  # type: ignore[method-assign]
    assert calls[0] == 1

    class WrongDim(Symmetric):  # type: ignore[misc, valid-type]
        @property
        def dim(self) -> int:
            return 16

    other = nn.Linear(4, 4).double()
    w = other.weight.detach().clone()
    with pytest.raises(ValueError, match=r"returned 10 coordinates but the set has dimension 16"):
        mp.register(other, "weight", WrongDim)
    assert not torch.nn.utils.parametrize.is_parametrized(other)
    assert torch.equal(other.weight, w)


def test_a_subclass_missing_a_hook_is_refused_when_built() -> None:
    class Incomplete(mp.Parametrization):
        def map(self, x: Tensor) -> Tensor:
            return x

    with pytest.raises(TypeError, match="abstract"):
        Incomplete((3,))
