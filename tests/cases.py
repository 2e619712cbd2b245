"""One registry of constraint cases: every generic test runs on every constraint.

Each :class:`Case` builds a plain module, constrains it, and brings an oracle for its set that
does not use the library (geoopt for Stiefel and SPD, plus a strict Cholesky; direct
comparisons for the box, the orthant and symmetry), in the dtype the weight is stored in.

The last case is a user's own constraint: the ``Symmetric`` class of
:class:`manifoldparam.Parametrization`'s docstring, executed from the docstring itself, so the
documented example is what gets every test (a new constraint joins by adding one case).
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import manifoldparam as mp
from tests.conftest import assert_on_stiefel, assert_spd

HALF = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Case:
    """One constraint on one module, and the independent membership test of its set."""

    name: str
    build: Callable[[], nn.Module]  # an unconstrained float32 module
    constrain: Callable[[nn.Module], nn.Module]
    inputs: tuple[int, ...]  # the shape of a batch for the module
    oracle: Callable[[Tensor, torch.dtype], None]  # raises if the weight is off the set


def _stiefel(w: Tensor, dtype: torch.dtype) -> None:
    # A float32-orthogonal matrix rounded to half: max|WᵀW - I| <= eps(dtype) + O(eps²).
    n = max(w.shape[-2:])
    atol = 2 * torch.finfo(dtype).eps if dtype in HALF else 5 * n * torch.finfo(dtype).eps
    assert_on_stiefel(w.float() if dtype in HALF else w, atol=atol)


def spd_oracle(floor: float) -> Callable[[Tensor, torch.dtype], None]:
    def oracle(w: Tensor, dtype: torch.dtype) -> None:
        # Strict in every dtype: the stored matrix itself has a Cholesky factor above the floor,
        # and its eigenvalues are above it to the round-off of the dtype the map runs in.
        w = w.double()
        assert torch.equal(w, w.mT), "not symmetric"
        assert_spd(w, floor=floor)
        eps = torch.finfo(torch.float32 if dtype in HALF else dtype).eps
        slack = 16 * w.shape[-1] * eps * max(1.0, float(w.abs().max()))
        assert float(torch.linalg.eigvalsh(w).min()) >= floor - slack

    return oracle


def box(low: float, high: float) -> Callable[[Tensor, torch.dtype], None]:
    def oracle(w: Tensor, dtype: torch.dtype) -> None:
        # (the bounds as registration rounds them: from float64 to the weight's dtype)
        lo, hi = (torch.tensor(b, dtype=torch.float64).to(dtype) for b in (low, high))
        assert bool(torch.isfinite(w).all())
        assert bool(((w >= lo) & (w <= hi)).all()), (float(w.min()), float(w.max()))

    return oracle


def _orthant(w: Tensor, dtype: torch.dtype) -> None:
    assert bool(torch.isfinite(w).all()) and bool((w >= 0).all())


def _cayley(m: nn.Module) -> nn.Module:
    return mp.orthogonal(m, map="cayley")


def _adapter_layer() -> nn.Module:
    """A Linear(8, 6) whose weight does not depend on the global seed: the oracle knows W₀."""
    m = nn.Linear(8, 6)
    with torch.no_grad():
        m.weight.copy_(torch.randn(6, 8, generator=torch.Generator().manual_seed(11)))
    return m


def _adapter(w: Tensor, dtype: torch.dtype) -> None:
    """W = W₀·R, R = diag(R₁, R₂) in SO(4)²: per column block, W_i W_iᵀ = X_i X_iᵀ (X = W₀, of
    full column rank, so W_i = X_i Q with Q orthogonal) and det(X_iᵀ W_i) > 0 (det Q = +1)."""
    x = _adapter_layer().weight.detach().to(dtype).double()
    w = w.double()
    eps = torch.finfo(torch.float32 if dtype in HALF else dtype).eps
    atol = 50 * 4 * eps * float(x.abs().max()) ** 2 + (
        8 * torch.finfo(dtype).eps if dtype in HALF else 0
    )
    assert bool(torch.isfinite(w).all())
    for i in range(2):
        xi, wi = x[:, 4 * i : 4 * i + 4], w[:, 4 * i : 4 * i + 4]
        torch.testing.assert_close(wi @ wi.T, xi @ xi.T, atol=atol * 10, rtol=0)
        assert float(torch.linalg.det(xi.T @ wi)) > 0


def documented_example() -> dict[str, object]:
    """Run the code block of ``Parametrization``'s docstring; return its namespace."""
    doc = mp.Parametrization.__doc__ or ""
    block = doc.split("::\n", 1)[1].split("\n    Args:", 1)[0]
    namespace: dict[str, object] = {"torch": torch, "nn": nn, "manifoldparam": mp}
    exec(textwrap.dedent(block), namespace)  # the documented code, verbatim
    return namespace


Symmetric = documented_example()["Symmetric"]


def _symmetric(w: Tensor, dtype: torch.dtype) -> None:
    assert bool(torch.isfinite(w).all()) and torch.equal(w, w.mT), "not symmetric"


def _user(m: nn.Module) -> nn.Module:
    return mp.register(m, "weight", Symmetric)


CASES = [
    Case("orthogonal", lambda: nn.Linear(12, 12), mp.orthogonal, (3, 12), _stiefel),
    Case("orthogonal-wide", lambda: nn.Linear(12, 5), mp.orthogonal, (3, 12), _stiefel),
    Case(
        "cayley",
        lambda: nn.Linear(8, 8),
        lambda m: mp.orthogonal(m, map="cayley"),
        (3, 8),
        _stiefel,
    ),
    Case(
        "orthogonal-batched",
        lambda: nn.Conv2d(3, 4, 3),
        lambda m: mp.orthogonal(m, batched=True),
        (2, 3, 7, 7),
        _stiefel,
    ),
    Case(
        "spd",
        lambda: nn.Linear(6, 6, bias=False),
        lambda m: mp.spd(m, min_eigenvalue=1e-2),
        (3, 6),
        spd_oracle(1e-2),
    ),
    Case(
        "bounded",
        lambda: nn.Linear(6, 5),
        lambda m: mp.bounded(m, low=-0.3, high=0.7),
        (3, 6),
        box(-0.3, 0.7),
    ),
    Case(
        "orthogonal-adapter",
        _adapter_layer,
        lambda m: mp.orthogonal_adapter(m, block_size=4),
        (3, 8),
        _adapter,
    ),
    Case("nonnegative", lambda: nn.Linear(6, 5), mp.nonnegative, (3, 6), _orthant),
    Case("user-symmetric", lambda: nn.Linear(5, 5), _user, (3, 5), _symmetric),
]
IDS = [c.name for c in CASES]
