"""Shared oracles and settings: geoopt decides membership, tests are seeded."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from typing import Any

import geoopt
import pytest
import torch
from hypothesis import HealthCheck, settings
from torch import Tensor, nn

import manifoldparam as mp
from manifoldparam.hard.base import Parametrization

settings.register_profile(
    "ci",
    derandomize=True,  # seeded: the same examples on every run
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci")
torch.set_num_threads(2)


def atol_for(dtype: torch.dtype, n: int) -> float:
    """The oracle's tolerance: 1e-10 in float64, ~5·n·eps in float32 (ANCHORS)."""
    return 1e-10 if dtype == torch.float64 else 5 * max(n, 4) * torch.finfo(dtype).eps


def assert_on_stiefel(w: torch.Tensor, atol: float | None = None) -> None:
    """geoopt's Stiefel check on each matrix (transposed when wide: geoopt needs tall)."""
    mats = w if w.dim() >= 2 else w.unsqueeze(-1)
    if mats.shape[-1] > mats.shape[-2]:
        mats = mats.mT
    tol = atol if atol is not None else atol_for(w.dtype, mats.shape[-2])
    ok, why = geoopt.Stiefel().check_point_on_manifold(
        mats.detach(), atol=tol, rtol=0, explain=True
    )
    assert ok, why


def assert_spd(w: torch.Tensor, floor: float = 0.0, atol: float | None = None) -> None:
    """geoopt's SPD check plus a Cholesky factorisation (geoopt passes singular matrices)."""
    w = w.detach()
    n = w.shape[-1]
    tol = atol if atol is not None else atol_for(w.dtype, n) * max(1.0, float(w.abs().max()))
    ok, why = geoopt.SymmetricPositiveDefinite().check_point_on_manifold(
        w, atol=tol, rtol=0, explain=True
    )
    assert ok, why
    sym = 0.5 * (w + w.mT)
    eye = torch.eye(n, dtype=w.dtype, device=w.device)
    assert bool((torch.linalg.cholesky_ex(sym - floor * eye).info == 0).all()), "no Cholesky factor"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@contextlib.contextmanager
def counting(cls: type[Parametrization] = mp.Orthogonal) -> Iterator[list[int]]:
    """Count the evaluations of ``cls.map`` (the constrained weight's computation)."""
    calls = [0]
    original = cls.map

    def counted(self: Parametrization, x: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return original(self, x)

    cls.map = counted  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        cls.map = original  # type: ignore[method-assign]


def via_bytes(obj: Any, map_location: Any = None) -> Any:
    """``obj`` through ``torch.save`` / ``torch.load(weights_only=True)`` in memory."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True, map_location=map_location)


class RNN(nn.Module):
    """A small orthogonal RNN whose recurrent kernel is read once per time step."""

    def __init__(self, n: int = 6, d: int = 3, out: int = 2, map: str = "expm") -> None:
        super().__init__()
        self.inp = nn.Linear(d, n)
        self.rec = mp.orthogonal(nn.Linear(n, n, bias=False), map=map)
        self.head = mp.bounded(nn.Linear(n, out), "weight", low=-0.5, high=0.5)

    def forward(self, xs: Tensor) -> Tensor:
        h = xs.new_zeros(xs.shape[1], self.rec.in_features)
        for x in xs:
            h = torch.tanh(self.inp(x) + self.rec(h))
        return self.head(h)


#: Cached against uncached values and gradients (float64): equal to round-off.
TOL = {"atol": 1e-12, "rtol": 0.0}


def loss_of(model: nn.Module, xs: Tensor, y: Tensor) -> Tensor:
    return ((model(xs) - y) ** 2).mean()


def grads(model: nn.Module) -> dict[str, Tensor | None]:
    return {
        k: None if p.grad is None else p.grad.detach().clone() for k, p in model.named_parameters()
    }


def assert_same(a: dict[str, Tensor | None], b: dict[str, Tensor | None]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        assert (x is None) == (y is None), k
        if x is not None and y is not None:
            torch.testing.assert_close(x, y, **TOL, msg=k)


def solve_lbfgs(mdmm: Any, params: list[torch.Tensor], f: Any, outer: int = 30) -> None:
    """The method of multipliers: LBFGS on the augmented Lagrangian, then dual_update."""
    opt = torch.optim.LBFGS(
        params,
        lr=1,
        max_iter=100,
        tolerance_grad=1e-13,
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )
    for _ in range(outer):

        def closure() -> torch.Tensor:
            opt.zero_grad()
            value = mdmm(f()).value
            value.backward()
            return value

        opt.step(closure)
        mp.soft.dual_update(mdmm)
