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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import geoopt
import pytest
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
    #: A set of complex matrices (complex64/128 weights, complex coordinates): the generic
    #: tests draw complex values, and skip what has no complex counterpart (half precision,
    #: autocast, scipy's real vectors) with the reason.
    complex: bool = False

    def dtype(self, real: torch.dtype) -> torch.dtype:
        """The weight's dtype for a test written for ``real``: its complex counterpart
        (complex64/complex128) for a complex set."""
        return _COMPLEX.get(real, real) if self.complex else real

    def randn(self, shape: Sequence[int], real: torch.dtype = torch.float32, **kw) -> Tensor:
        """Random values of ``self.dtype(real)`` (inputs, values to project)."""
        return torch.randn(*shape, dtype=self.dtype(real), **kw)

    def skip_if_complex(self, why: str) -> None:
        if self.complex:
            pytest.skip(f"{self.name}: {why}")


_COMPLEX = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def square(y: Tensor) -> Tensor:
    """``|y|²`` (a real loss for a complex output; ``y²`` itself for a real one)."""
    return y.abs().square() if y.is_complex() else y.square()


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


def sphere_oracle(radius: float, dim: int | None) -> Callable[[Tensor, torch.dtype], None]:
    """geoopt's unit sphere on each vector (the flattened tensor, or each slice along dim)."""

    def oracle(w: Tensor, dtype: torch.dtype) -> None:
        w = w.detach().double()
        rows = w.reshape(1, -1) if dim is None else w.movedim(dim, -1)
        n = rows.shape[-1]
        atol = 4 * torch.finfo(dtype).eps if dtype in HALF else 5 * n * torch.finfo(dtype).eps
        ok, why = geoopt.Sphere().check_point_on_manifold(
            rows / radius, atol=atol, rtol=0, explain=True
        )
        assert ok, why

    return oracle


class MatrixBatch(nn.Module):
    """A module holding a batch of square matrices (poses, per-head mixing), applied to x."""

    def __init__(self, batch: int, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(batch, n, n))

    def forward(self, x: Tensor) -> Tensor:
        # The first row only: a loss of all of Wx would not depend on a rotation (|Rx| = |x|).
        return torch.einsum("bj,nj->nb", self.weight[:, 0], x)


def _rotation(w: Tensor, dtype: torch.dtype) -> None:
    # Orthogonal (geoopt's Stiefel check; then det = ±1) and det > 0 (in float64).
    _stiefel(w, dtype)
    det = torch.linalg.det(w.double())
    assert bool((det > 0.5).all()), det


def _correlation(w: Tensor, dtype: torch.dtype) -> None:
    # Symmetric and unit diagonal exactly, positive definite (a float64 Cholesky of the stored
    # matrix itself) and geoopt's SPD check.
    assert bool(torch.isfinite(w).all()) and torch.equal(w, w.mT), "not symmetric"
    assert torch.equal(w.diagonal(dim1=-2, dim2=-1), torch.ones_like(w[..., 0])), "diagonal"
    assert_spd(w.double(), atol=1e-12)


def _unitary(w: Tensor, dtype: torch.dtype) -> None:
    # geoopt's Stiefel is real only: WᴴW = I checked directly, in complex128.
    assert w.is_complex() and bool(torch.isfinite(w).all())
    t = w.to(torch.complex128)
    t = t if t.shape[-2] >= t.shape[-1] else t.mT
    eye = torch.eye(t.shape[-1], dtype=t.dtype)
    err = float((t.mH @ t - eye).abs().max())
    assert err <= 5 * t.shape[-2] * torch.finfo(w.real.dtype).eps, err


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


def _skew(w: Tensor, dtype: torch.dtype) -> None:
    assert bool(torch.isfinite(w).all()) and torch.equal(w, -w.mT), "not skew-symmetric"
    assert not bool(w.diagonal(dim1=-2, dim2=-1).any()), "nonzero diagonal"


def simplex_oracle(dim: int) -> Callable[[Tensor, torch.dtype], None]:
    def oracle(w: Tensor, dtype: torch.dtype) -> None:
        w = w.detach().double()
        n = w.shape[dim]
        tol = 4 * torch.finfo(dtype).eps if dtype in HALF else 4 * n * torch.finfo(dtype).eps
        assert bool(torch.isfinite(w).all()) and bool((w >= 0).all()), float(w.min())
        err = float((w.sum(dim) - 1).abs().max())
        assert err <= tol, err

    return oracle


def psd_oracle(rank: int | None) -> Callable[[Tensor, torch.dtype], None]:
    def oracle(w: Tensor, dtype: torch.dtype) -> None:
        # symmetric to the bit; eigenvalues (float64 eigvalsh of the stored matrix) >= -slack;
        # at most `rank` of them above the slack
        w = w.detach().double()
        assert bool(torch.isfinite(w).all()) and torch.equal(w, w.mT), "not symmetric"
        n = w.shape[-1]
        slack = 16 * n * torch.finfo(dtype).eps * max(1.0, float(w.abs().max()))
        lam = torch.linalg.eigvalsh(w)
        assert float(lam.min()) >= -slack, float(lam.min())
        if rank is not None:
            assert int((lam > slack).sum(-1).max()) <= rank, lam

    return oracle


def rank_oracle(rank: int, exact: bool) -> Callable[[Tensor, torch.dtype], None]:
    """Singular values (float64 svdvals of the stored matrix): at most `rank` above the
    dtype's resolution of ‖W‖; with `exact`, the `rank`-th above it too."""

    def oracle(w: Tensor, dtype: torch.dtype) -> None:
        w = w.detach().double().reshape(w.shape[0], -1)
        assert bool(torch.isfinite(w).all())
        slack = 16 * max(w.shape) * torch.finfo(dtype).eps * max(1.0, float(w.abs().max()))
        s = torch.linalg.svdvals(w)
        assert int((s > slack).sum()) <= rank, s
        if exact:
            assert float(s[rank - 1]) > 0.0, s

    return oracle


def _user(m: nn.Module) -> nn.Module:
    return mp.register(m, "weight", Symmetric)


CASES = [
    Case("orthogonal", lambda: nn.Linear(12, 12), mp.orthogonal, (3, 12), _stiefel),
    Case("orthogonal-wide", lambda: nn.Linear(12, 5), mp.orthogonal, (3, 12), _stiefel),
    Case(  # the O(nk²) tall path, forced at a small size (a wide weight: its transpose is tall)
        "orthogonal-tall",
        lambda: nn.Linear(40, 6),
        lambda m: mp.orthogonal(m, tall=True),
        (3, 40),
        _stiefel,
    ),
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
    Case("psd", lambda: nn.Linear(6, 6, bias=False), mp.psd, (3, 6), psd_oracle(None)),
    Case(
        "psd-rank2",
        lambda: nn.Linear(6, 6, bias=False),
        lambda m: mp.psd(m, rank=2),
        (3, 6),
        psd_oracle(2),
    ),
    Case(
        "low-rank",
        lambda: nn.Linear(7, 5),
        lambda m: mp.low_rank(m, rank=2),
        (3, 7),
        rank_oracle(2, exact=False),
    ),
    Case(
        "fixed-rank",
        lambda: nn.Linear(5, 6),
        lambda m: mp.fixed_rank(m, rank=3),
        (3, 5),
        rank_oracle(3, exact=True),
    ),
    Case(
        "bounded",
        lambda: nn.Linear(6, 5),
        lambda m: mp.bounded(m, low=-0.3, high=0.7),
        (3, 6),
        box(-0.3, 0.7),
    ),
    Case(
        "sphere",
        lambda: nn.Linear(6, 5),
        lambda m: mp.sphere(m, radius=2.0),
        (3, 6),
        sphere_oracle(2.0, None),
    ),
    Case(
        "sphere-rows",
        lambda: nn.Linear(6, 5),
        lambda m: mp.sphere(m, dim=-1),
        (3, 6),
        sphere_oracle(1.0, -1),
    ),
    Case("symmetric", lambda: nn.Linear(5, 5), mp.symmetric, (3, 5), _symmetric),
    Case("skew", lambda: nn.Linear(5, 5), mp.skew, (3, 5), _skew),
    Case("simplex", lambda: nn.Linear(6, 5), mp.simplex, (3, 6), simplex_oracle(-1)),
    Case(
        "simplex-cols",
        lambda: nn.Linear(6, 5),
        lambda m: mp.simplex(m, dim=0),
        (3, 6),
        simplex_oracle(0),
    ),
    Case(
        "orthogonal-adapter",
        _adapter_layer,
        lambda m: mp.orthogonal_adapter(m, block_size=4),
        (3, 8),
        _adapter,
    ),
    Case("nonnegative", lambda: nn.Linear(6, 5), mp.nonnegative, (3, 6), _orthant),
    Case("correlation", lambda: nn.Linear(5, 5), mp.correlation, (3, 5), _correlation),
    Case("correlation-batched", lambda: MatrixBatch(3, 4), mp.correlation, (2, 4), _correlation),
    Case("grassmannian", lambda: nn.Linear(3, 7), mp.grassmannian, (2, 3), _stiefel),
    Case("grassmannian-wide", lambda: nn.Linear(6, 2), mp.grassmannian, (2, 6), _stiefel),
    Case("rotation", lambda: nn.Linear(3, 3), mp.rotation, (4, 3), _rotation),
    Case("rotation-batched", lambda: MatrixBatch(4, 3), mp.rotation, (2, 3), _rotation),
    Case("rotation-n", lambda: nn.Linear(5, 5), mp.rotation, (3, 5), _rotation),
    Case(
        "unitary",
        lambda: nn.Linear(5, 5).to(torch.complex64),
        mp.unitary,
        (3, 5),
        _unitary,
        complex=True,
    ),
    Case(
        "unitary-wide",
        lambda: nn.Linear(6, 2, bias=False).to(torch.complex64),
        mp.unitary,
        (3, 6),
        _unitary,
        complex=True,
    ),
    Case("user-symmetric", lambda: nn.Linear(5, 5), _user, (3, 5), _symmetric),
]
IDS = [c.name for c in CASES]
