"""Mixed precision: every constraint under torch.autocast and with bfloat16/float16 weights.

The policy (``manifoldparam.hard.base``): the map runs with autocast off, in float32 for
half-precision coordinates, and returns the coordinates' dtype. So under autocast a float32
weight is exactly the float32 weight (autocast casts it per op, like a plain weight), and a
weight stored in half precision lies on its set to that dtype's precision.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import manifoldparam as mp
from tests.cases import CASES, HALF, IDS, Case, box, spd_oracle


def _coordinates(m: nn.Module) -> Tensor:
    return m.parametrizations.weight.original


def _train(case: Case, m: nn.Module, steps: int, dtype: torch.dtype) -> None:
    """SGD with momentum on a loss through the module, checking the set after every step.
    (Not Adam: its eps = 1e-8 is 0 in float16, so a pure-float16 Adam divides by zero, which
    the library then names as NaN coordinates; mixed precision keeps float32 weights.)"""
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(case.inputs, dtype=dtype)
    for _ in range(steps):
        opt.zero_grad()
        (m(x).float() ** 2).mean().backward()
        opt.step()
        assert m.weight.dtype == dtype
        case.oracle(m.weight.detach(), dtype)


@pytest.mark.parametrize("cache", ["off", "cached", "auto"])
@pytest.mark.parametrize("amp", HALF)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_autocast_reads_the_float32_weight(case: Case, amp: torch.dtype, cache: str) -> None:
    """Under autocast the weight is the float32 weight, bit for bit, on its set in float32;
    the layer's output is in the autocast dtype; the coordinates' gradient through an
    autocast forward is finite and matches float32's to the autocast dtype's precision.
    (Before: orthogonal raised 'mat1 and mat2 must have the same dtype'; SPD returned a
    bfloat16 matrix below its floor.)"""
    case.skip_if_complex("autocast covers real dtypes only")
    m = case.constrain(case.build())
    if cache == "auto":
        mp.auto_cache(m)
    x = torch.randn(case.inputs)
    plain = m.weight.detach().clone()

    def step(amp_on: bool) -> tuple[Tensor, Tensor, Tensor]:
        _coordinates(m).grad = None
        with torch.autocast("cpu", dtype=amp, enabled=amp_on):
            if cache == "cached":
                with mp.cached():
                    w, y = m.weight, m(x)
            else:
                w, y = m.weight, m(x)
        (y.float() ** 2).mean().backward()  # (backward outside the block, as torch advises)
        return w.detach(), y, _coordinates(m).grad.clone()

    w, y, g = step(True)
    assert w.dtype == torch.float32 and torch.equal(w, plain)
    case.oracle(w, torch.float32)
    assert y.dtype == amp
    *_, g32 = step(False)
    assert bool(torch.isfinite(g).all())
    eps = torch.finfo(amp).eps
    scale = float(g32.abs().max())
    assert float((g - g32).abs().max()) <= 64 * eps * scale + 1e-6


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_half_precision_weights_register_train_and_assign(case: Case, dtype: torch.dtype) -> None:
    """A module stored in bfloat16/float16: registration keeps the weight (its nearest point
    of the set, to the dtype's precision), 20 SGD steps keep it on the set in that dtype, and
    a projected value assigns and reads back. (Before: an index error for orthogonal and SPD,
    'lu_cpu not implemented' for Cayley.)"""
    case.skip_if_complex("there is no complex half precision")
    m = case.build().to(dtype)
    before = m.weight.detach().clone()
    case.constrain(m)
    w = m.weight.detach()
    assert w.dtype == dtype and _coordinates(m).dtype == dtype
    case.oracle(w, dtype)
    # the nearest point, computed in float32 from the same weight (independent of the library
    # for the elementwise sets; the polar factor for Stiefel)
    ref = m.parametrizations.weight[0]
    nearest = ref.project(before.float())
    eps = torch.finfo(dtype).eps
    assert float((w.float() - nearest).abs().max()) <= 4 * eps * max(
        1.0, float(nearest.abs().max())
    )
    _train(case, m, 20, dtype)
    target = mp.project(m, "weight", torch.randn_like(before))
    assert target.dtype == dtype
    m.weight = target
    got = m.weight.detach()
    case.oracle(got, dtype)
    assert float((got.float() - target.float()).abs().max()) <= 4 * eps * max(
        1.0, float(target.float().abs().max())
    )


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_converted_to_half_after_registration(case: Case, dtype: torch.dtype) -> None:
    """``module.half()`` / ``.bfloat16()`` after registration: the weight stays on the set in
    the new dtype, through training. (Before: Cayley failed in lu_cpu.)"""
    case.skip_if_complex("there is no complex half precision")
    m = case.constrain(case.build()).to(dtype)
    case.oracle(m.weight.detach(), dtype)
    _train(case, m, 10, dtype)


@pytest.mark.parametrize("dtype", HALF)
@given(
    log_cond=st.floats(0.0, 6.0),
    floor=st.sampled_from([0.0, 1e-4, 1e-1]),
    n=st.integers(2, 32),
    seed=st.integers(0, 2**16),
)
def test_spd_stays_positive_definite_when_rounded(
    dtype: torch.dtype, log_cond: float, floor: float, n: int, seed: int
) -> None:
    """SPD weights stored in half precision: for any spectrum the stored
    matrix itself is symmetric with a Cholesky factor above the floor (condition up to 1e6).
    Plain rounding does not guarantee that: the old bfloat16 map gave eigenvalues of -3e-4
    (``SPD.to_storage`` shifts by the rounding bound)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.logspace(0, -log_cond, n, dtype=torch.float64) + floor
    target = (q * lam) @ q.mT
    m = mp.spd(nn.Linear(n, n, bias=False).double(), min_eigenvalue=floor)
    m.weight = 0.5 * (target + target.mT)
    m = m.to(dtype)
    spd_oracle(floor)(m.weight.detach(), dtype)


@pytest.mark.parametrize(
    ("dtype", "low", "high", "match"),
    [
        (torch.bfloat16, 0.999, 1.0, r"in torch\.bfloat16, low and high collapse.*float32"),
        (torch.float32, 1.0, 1.0 + 1e-8, r"in torch\.float32, low and high collapse.*float64"),
        (torch.float16, -1e5, 1e5, r"the bounds overflow torch\.float16"),
    ],
)
def test_bounds_that_collapse_or_overflow_in_the_dtype_are_refused(dtype, low, high, match):
    """Bounds are rounded to the weight's dtype; when that makes them equal or infinite,
    registration raises with the fix, and leaves the module untouched. (Before: all-NaN.)"""
    layer = nn.Linear(4, 4).to(dtype)
    w = layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"Linear\.weight: " + match):
        mp.bounded(layer, low=low, high=high)
    assert not torch.nn.utils.parametrize.is_parametrized(layer)
    assert torch.equal(layer.weight, w)


@pytest.mark.parametrize("dtype", [*HALF, torch.float32])
@given(low=st.floats(-7e4, 7e4, allow_nan=False), width=st.floats(1e-9, 1.4e5, allow_nan=False))
def test_bounded_is_never_nan(dtype: torch.dtype, low: float, width: float) -> None:
    """Any box: registration either refuses it (bounds that collapse or overflow in the dtype)
    or gives finite weights inside the dtype-rounded box, also for extreme coordinates.
    (Before: bounds of ±4e4 in float16 overflowed high - low and gave all-NaN weights.)"""
    high = low + width
    layer = nn.Linear(3, 4).to(dtype)
    try:
        mp.bounded(layer, low=low, high=high)
    except ValueError as e:
        assert "collapse" in str(e) or "overflow" in str(e)
        lo, hi = torch.tensor(low).to(dtype), torch.tensor(high).to(dtype)
        assert not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)) and bool(lo < hi))
        return
    with torch.no_grad():
        _coordinates(layer).copy_(
            torch.tensor([-1e4, -3.0, 0.0, 3.0, 1e4]).repeat(3)[:12].view(4, 3)
        )
    box(low, high)(layer.weight.detach(), dtype)


def test_bounded_fp16_wide_box_from_the_issue() -> None:
    """``low=-4e4, high=4e4`` in float16: ``high - low`` is Inf there, the map is not."""
    layer = mp.bounded(nn.Linear(4, 4).half(), low=-4e4, high=4e4)
    with torch.no_grad():
        _coordinates(layer).copy_(torch.linspace(-5, 5, 16).view(4, 4))
    w = layer.weight.detach()
    box(-4e4, 4e4)(w, torch.float16)
    assert float(w.float().abs().max()) > 3e4  # tanh(5)·4e4: really uses the box


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("n", [12, 256])
def test_half_precision_assignment_is_still_checked(dtype: torch.dtype, n: int) -> None:
    """The half-precision tolerance of Stiefel is a few eps(dtype) whatever n, so a matrix 5%
    off the set is refused (with 16·n·eps(dtype), as in float32, anything passed: 24 at
    n = 256 in bfloat16), and a rounded orthogonal matrix is accepted."""
    m = mp.orthogonal(nn.Linear(n, n).to(dtype))
    q = mp.project(m, "weight", torch.randn(n, n).to(dtype))
    m.weight = q  # on the set to the dtype's precision
    with pytest.raises(ValueError, match=r"Linear\.weight = X: X is not orthogonal"):
        m.weight = (1.05 * q.float()).to(dtype)
    assert torch.equal(m.weight.detach(), m.weight.detach())
