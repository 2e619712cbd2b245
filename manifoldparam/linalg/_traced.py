r"""Under ``torch.compile``: the exponential of real skew matrices, with its number of squarings
chosen inside the graph, so that inductor traces and fuses the common case.

Eagerly, :func:`~.skew_blocks.expm_skew_blocks` chooses the number of squarings :math:`s` of
its degree-8 Taylor polynomial :math:`T_8` from two traces read on the host. A compiled graph
cannot read them while it is traced, so here the first two products and the same bound are
traced, and ``torch.cond`` takes the rest of :math:`T_8` traced for :math:`s \le 2` (with the
Newton--Schulz step where the eager path takes it) or the custom op beyond (more squarings,
NaN, overflow). The backward is the exact derivative of the same computation (as eagerly),
its branch picked the same way. Used for OFT's blocks (coordinates in, the gradient on the
coordinates) and for the dense skew matrix of ``mp.orthogonal`` (``A`` in, a gradient whose
skew part is exact, as :func:`~.expm.expm_projected` returns).

Two rules keep ``torch.cond`` sound here (torch 2.13). The conds sit inside one
``autograd.Function``, not in cond's own autograd, so no tensor the backward's cond receives is
read after it: inductor writes into a donated input of a cond branch in a backward graph, which
gave wrong gradients where that input was read again. And the branches transpose with
``.transpose(-2, -1)``: Dynamo lifts an argument's ``.mT`` as a second input aliasing the first,
which cond refuses.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

import manifoldparam.linalg.op  # noqa: F401  (registers manifoldparam::expm_v2)
from manifoldparam._device import autocast_off
from manifoldparam._torch import compiling_all_dynamic
from manifoldparam.linalg._scheme import (
    _C1,
    _ELL8_F64,
    _THETA,
    _X1,
    _X2,
    _X3,
    _X4,
    _X5,
    _X6Q,
    _X7,
    _Y2,
    _taylor_cap,
)

#: Squarings computed in the traced branches; beyond them, the custom ops.
TRACED_SQUARINGS = 2


def _tail(s: int):  # type: ignore[no-untyped-def]
    """The traced rest for ``s`` squarings: ``(R, A, A², P, Q₁, Q₂, R₀, s)`` at ``2^{-s}A``
    (for ``s = 0``: ``Q₂`` and never-read slots; the outer ``A, A², P, Q₁`` are saved)."""

    def tail(x: Tensor, a: Tensor, a2: Tensor, p: Tensor, q1: Tensor, *index: Tensor):  # type: ignore[no-untyped-def]
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        if s:  # (2^{-s}A: A² is rescaled, the second product redone)
            a, a2 = a * 2.0**-s, a2 * 4.0**-s
            p = a2 + _C1 * a
            q1 = torch.baddbmm(a2, a2, p, beta=_X3, alpha=_X2)
        q2 = a * _X5 + a2 * _X6Q + q1 * _X7 + _X4 * eye
        r0 = torch.baddbmm(a + _Y2 * a2 + eye, q1, q2)
        steps = x.new_full((), s, dtype=torch.int64)
        if not s:
            unused = [torch.empty_like(r0) for _ in range(5)]
            return r0, *unused[:4], q2, unused[4], steps
        r = r0
        for _ in range(s):
            r = torch.bmm(r, r)
        if s > _taylor_cap(a.dtype != torch.float64):  # R(3I - RᵀR)/2, unseen by the backward
            r = torch.baddbmm(r, r, torch.bmm(r.transpose(-2, -1), r), beta=1.5, alpha=-0.5)
        return r, a, a2, p, q1, q2, r0, steps

    return tail


def _blocks_op(x: Tensor, a: Tensor, a2: Tensor, p: Tensor, q1: Tensor, *index: Tensor):  # type: ignore[no-untyped-def]
    return tuple(torch.ops.manifoldparam.expm_skew_blocks_v1(x, *index))


def _dense_op(x: Tensor, a: Tensor, a2: Tensor, p: Tensor, q1: Tensor, *index: Tensor):  # type: ignore[no-untyped-def]
    # (its backward recomputes the op's forward from A: this branch saves nothing)
    r = torch.ops.manifoldparam.expm_v2(x, -1, True)[0]
    unused = [torch.empty_like(r) for _ in range(6)]
    return r, *unused, x.new_full((), -1, dtype=torch.int64)


def _grad_a(g: Tensor, a: Tensor, a2: Tensor, p: Tensor, q1: Tensor, q2: Tensor) -> Tensor:
    """The gradient w.r.t. ``A`` of ``T_8(A)`` (its skew part exact: see ``skew_blocks``)."""
    gq2 = torch.bmm(q1.transpose(-2, -1), g)
    gq1 = torch.baddbmm(gq2 * _X7, g, q2.transpose(-2, -1))
    gp = torch.bmm(a2.transpose(-2, -1), gq1)
    ga2 = torch.baddbmm(gp, gq1, p.transpose(-2, -1)) * _X2 + gq1 * _X3 + gq2 * _X6Q + g * _Y2
    return torch.baddbmm(g + gq2 * _X5 + gp * _X1, ga2 + ga2.transpose(-2, -1), a, alpha=-1.0)


def _finish(ga: Tensor, index: tuple[Tensor, ...]) -> Tensor:
    """On the coordinates (blocks: ``index``), or ``A``'s gradient itself (dense)."""
    if not index:
        return ga
    flat = ga.flatten(1)
    return flat.index_select(1, index[2]) - flat.index_select(1, index[3])


# saved: the outer A, A², P, Q₁ (s = 0), then the branch's A, A², P, Q₁, Q₂, R₀, s
def _grad(s: int):  # type: ignore[no-untyped-def]
    def grad(g: Tensor, saved: list[Tensor], *index: Tensor) -> Tensor:
        if not s:
            return _finish(_grad_a(g, *saved[:4], saved[8]), index)
        squares = [saved[9]]  # X₀ = R₀, X_{j+1} = X_j X_j
        for _ in range(s - 1):
            squares.append(torch.bmm(squares[-1], squares[-1]))
        for xj in reversed(squares):
            xt = xj.transpose(-2, -1)
            g = torch.baddbmm(torch.bmm(xt, g), g, xt)
        return _finish(_grad_a(g, *saved[4:9]), index) * 2.0**-s

    return grad


def _op_grad(g: Tensor, saved: list[Tensor], *index: Tensor) -> Tensor:
    if index:
        return torch.ops.manifoldparam.expm_skew_blocks_backward_v1(
            g, saved[4:10], saved[10], *index
        )
    a = saved[0]
    x, mats, piv, s, meta = torch.ops.manifoldparam.expm_v2(a, -1, True)
    return torch.ops.manifoldparam.expm_backward_v2(a, x, g, mats, piv, s, meta, True)


def _chain(preds: list[Tensor], branches: list, operands: tuple):  # type: ignore[no-untyped-def]
    """``branches[i]`` for the first true ``preds[i]``, else ``branches[-1]`` (nested conds)."""
    if not preds:
        return branches[0](*operands)

    def rest(*ops):  # type: ignore[no-untyped-def]
        return _chain(preds[1:], branches[1:], ops)

    return torch.cond(preds[0], branches[0], rest, operands)


class _TracedExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, *index: Tensor) -> Tensor:  # type: ignore[override]
        if index:  # blocks: A from the coordinates
            take, sign = index[0], index[1]
            k, b = x.shape[0], math.isqrt(sign.shape[0])
            a = x.index_select(1, take).view(k, b, b) * sign.to(x.dtype).view(b, b)
        else:
            a = x
        a2 = torch.bmm(a, a)
        p = a2 + _C1 * a
        q1 = torch.baddbmm(a2, a2, p, beta=_X3, alpha=_X2)
        t2 = a2.square().sum((-2, -1))
        t3 = (t2 * _X3 - (a2 * q1).sum((-2, -1))) / _X2
        t2m, t3m = t2.amax().double().clamp_min(0.0), t3.amax().double().clamp_min(0.0)
        rho = torch.minimum((t2m / 2).sqrt(), (t3m / 2) ** (1 / 3)).sqrt()  # rho_bound
        # (NaN compares False: the op). The blocks take expm_skew_blocks' thresholds; the dense
        # map in float64 eager expm's for T_8's derivative, whose gap to exp's (ρ⁸/8!) is 60
        # ulps at _THETA there (in float32 it is 6, below what a further squaring costs).
        if not index and x.dtype == torch.float64:
            theta = _ELL8_F64
        else:
            theta = _THETA[x.dtype]
        preds = [rho <= theta * 2**s for s in range(TRACED_SQUARINGS + 1)]
        tails = [_tail(s) for s in range(TRACED_SQUARINGS + 1)]
        op = _blocks_op if index else _dense_op
        r, *branch_saved = _chain(preds, [*tails, op], (x, a, a2, p, q1, *index))
        ctx.save_for_backward(*preds, a, a2, p, q1, *branch_saved, *index)
        return r

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        saved = ctx.saved_tensors
        m = TRACED_SQUARINGS + 1
        preds, rest, index = list(saved[:m]), list(saved[m : m + 11]), saved[m + 11 :]
        grads = [_grad(s) for s in range(m)]
        with autocast_off(g):
            gx = _chain(preds, [*grads, _op_grad], (g, rest, *index))
        return gx, *(None for _ in index)


def traced_ok(x: Tensor) -> bool:
    """Whether the traced path applies: a real float32/float64 CPU tensor (on a GPU the cond
    would read the bound on the host, a sync), static shapes and no ``torch.export``
    (torch 2.13 traces no cond inside a Function with every size symbolic, nor under
    ``torch.export(strict=True)``)."""
    return (
        x.is_cpu
        and x.dtype in (torch.float32, torch.float64)
        and not compiling_all_dynamic()
        and not torch.compiler.is_exporting()
    )


def traced_exp(x: Tensor, *index: Tensor) -> Tensor:
    """``exp`` of the skew blocks with coordinates ``x`` (``(k, p)``, ``index`` the
    ``SkewIndex``) or of the skew matrices ``x`` (``(k, n, n)``, no index), for a graph being
    compiled (float32/float64)."""
    with autocast_off(x):
        return _TracedExp.apply(x, *index)
