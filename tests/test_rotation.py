"""mp.rotation: Rodrigues' closed form against torch.linalg.matrix_exp, the logarithm near 0 and
π, batched shapes, SO(n), nearest rotations and bad input. (The generic contract runs on the
rotation cases of tests/cases.py.)"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.autograd import gradcheck

import manifoldparam as mp
from manifoldparam.hard.rotation import hat, so3_exp, so3_log
from tests.cases import MatrixBatch

DT = torch.float64


def _axes(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return nn.functional.normalize(torch.randn(n, 3, generator=g, dtype=DT), dim=-1)


# angles on both sides of the series switch (θ² = 1/4) and of π, and large ones
ANGLES = [0.0, 1e-12, 1e-6, 1e-3, 0.1, 0.4999, 0.5, 0.5001, 1.0, 3.0, math.pi, 5.0, 30.0]


@pytest.mark.parametrize("theta", ANGLES)
def test_rodrigues_equals_matrix_exp_in_float64(theta: float) -> None:
    omega = theta * _axes(64)
    ref = torch.linalg.matrix_exp(hat(omega))
    got = so3_exp(omega)
    # (matrix_exp's own round-off grows with θ through its squarings)
    torch.testing.assert_close(got, ref, atol=4e-15 * max(1.0, theta), rtol=0)


@pytest.mark.parametrize("theta", ANGLES)
def test_gradient_equals_matrix_exp_gradient(theta: float) -> None:
    omega = (theta * _axes(16)).requires_grad_()
    probe = torch.randn(16, 3, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    (g,) = torch.autograd.grad((so3_exp(omega) * probe).sum(), omega)
    (ref,) = torch.autograd.grad((torch.linalg.matrix_exp(hat(omega)) * probe).sum(), omega)
    torch.testing.assert_close(g, ref, atol=1e-13 * max(1.0, theta), rtol=0)


@pytest.mark.parametrize("theta", [0.0, 1e-4, 0.49, 0.51, 2.0, 3.1])
def test_gradcheck(theta: float) -> None:
    omega = (theta * _axes(4)).requires_grad_()
    assert gradcheck(so3_exp, (omega,))


@pytest.mark.parametrize("scale", [1e-4, 0.3, 1.0, 3.0, 100.0, 1e4])
def test_float32_is_orthogonal_to_round_off(scale: float) -> None:
    omega = scale * torch.randn(4096, 3, generator=torch.Generator().manual_seed(2))
    r = so3_exp(omega)
    eps = torch.finfo(torch.float32).eps
    assert float((r.mT @ r - torch.eye(3)).abs().max()) <= 16 * eps
    assert float((torch.linalg.det(r.double()) - 1).abs().max()) <= 16 * eps


@pytest.mark.parametrize("theta", [0.0, 1e-9, 1e-4, 0.3, 1.5, 1.6, 3.0, math.pi - 1e-3])
def test_log_inverts_exp(theta: float) -> None:
    omega = theta * _axes(64, seed=3)
    torch.testing.assert_close(so3_log(so3_exp(omega)), omega, atol=1e-12, rtol=0)


@pytest.mark.parametrize("gap", [1e-2, 1e-5, 1e-8, 1e-12, 0.0])
def test_log_near_pi_gives_back_the_rotation(gap: float) -> None:
    """At θ → π the vector part of R vanishes; the axis comes from the symmetric part, so the
    rotation is reproduced to round-off (the ±π ambiguity at π itself is harmless)."""
    omega = (math.pi - gap) * _axes(64, seed=4)
    r = so3_exp(omega)
    back = so3_log(r)
    torch.testing.assert_close(so3_exp(back), r, atol=1e-14, rtol=0)
    assert float(torch.linalg.vector_norm(back, dim=-1).max()) <= math.pi + 1e-12


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-20, 20), min_size=3, max_size=3))
def test_log_is_a_logarithm(values: list[float]) -> None:
    r = so3_exp(torch.tensor(values, dtype=DT))
    back = so3_log(r)
    assert float(torch.linalg.vector_norm(back)) <= math.pi + 1e-12
    torch.testing.assert_close(so3_exp(back), r, atol=1e-13, rtol=0)


def test_batched_shapes_and_assignment() -> None:
    m = nn.Module()
    m.weight = nn.Parameter(torch.randn(2, 4, 3, 3, dtype=DT))
    mp.rotation(m)
    assert isinstance(m.parametrizations.weight[0], mp.hard.SO3)
    assert m.parametrizations.weight.original.shape == (2, 4, 3)
    target = so3_exp(torch.randn(2, 4, 3, dtype=DT))
    m.weight = target
    torch.testing.assert_close(m.weight, target, atol=1e-14, rtol=0)


def test_registration_moves_to_the_nearest_rotation() -> None:
    """W = R0·diag(3, 2, -1) (det < 0): the nearest rotation is R0 (the smallest singular
    direction flips); the polar factor, R0·diag(1, 1, -1), would be a reflection."""
    r0 = so3_exp(torch.tensor([0.4, -1.0, 2.2], dtype=DT))
    m = nn.Linear(3, 3, bias=False).double()
    with torch.no_grad():
        m.weight.copy_(r0 @ torch.diag(torch.tensor([3.0, 2.0, -1.0], dtype=DT)))
    mp.rotation(m)
    torch.testing.assert_close(m.weight, r0, atol=1e-14, rtol=0)


def test_a_reflection_is_refused_on_assignment() -> None:
    m = mp.rotation(nn.Linear(3, 3).double())
    before = m.weight.detach().clone()
    with pytest.raises(ValueError, match=r"Linear\.weight = X: .*determinant -1"):
        m.weight = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=DT))
    assert torch.equal(m.weight, before)


@pytest.mark.parametrize("n", [2, 4, 6])
def test_son_keeps_det_one_while_training(n: int) -> None:
    torch.manual_seed(n)
    m = mp.rotation(MatrixBatch(3, n).double())
    assert isinstance(m.parametrizations.weight[0], mp.hard.Rotation)
    assert m.parametrizations.weight.original.numel() == 3 * n * (n - 1) // 2
    opt = torch.optim.Adam(m.parameters(), lr=0.2)
    x = torch.randn(8, n, dtype=DT)
    for _ in range(20):
        opt.zero_grad()
        (m(x) - 1).pow(2).mean().backward()
        opt.step()
    w = m.weight.detach()
    torch.testing.assert_close(w.mT @ w, torch.eye(n, dtype=DT).expand_as(w), atol=1e-13, rtol=0)
    torch.testing.assert_close(torch.linalg.det(w), torch.ones(3, dtype=DT), atol=1e-13, rtol=0)


def test_expm_method_on_3x3_agrees_with_rodrigues() -> None:
    a = mp.rotation(nn.Linear(3, 3).double(), method="expm")
    assert isinstance(a.parametrizations.weight[0], mp.hard.Rotation)
    assert torch.linalg.det(a.weight) > 0


@pytest.mark.parametrize(
    ("shape", "match"),
    [((3, 4), r"Linear\.weight: rotation needs square matrices .* manifoldparam\.orthogonal")],
)
def test_a_rectangular_weight_is_refused(shape: tuple[int, int], match: str) -> None:
    m = nn.Linear(shape[1], shape[0])
    before = m.weight.detach().clone()
    with pytest.raises(ValueError, match=match):
        mp.rotation(m)
    assert torch.equal(m.weight, before)
    assert not torch.nn.utils.parametrize.is_parametrized(m)


def test_rodrigues_needs_3x3() -> None:
    msg = r"Linear\.weight: SO3 \(Rodrigues\) needs 3x3 .*method='expm'"
    with pytest.raises(ValueError, match=msg):
        mp.rotation(nn.Linear(4, 4), method="rodrigues")
    with pytest.raises(ValueError, match="method must be"):
        mp.rotation(nn.Linear(3, 3), method="quaternion")  # type: ignore[arg-type]
