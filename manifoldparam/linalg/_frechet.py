"""The reverse- and forward-mode derivatives of the scheme in :mod:`._scheme`: the
Al-Mohy--Higham Fréchet derivative at ``Aᴴ`` (reverse) and at ``A`` (forward), reusing the
forward's intermediates."""

from __future__ import annotations

import torch
from torch import Tensor

from manifoldparam.linalg._scheme import (
    _C7,
    _C13,
    _TAYLOR,
    _X1,
    _X2,
    _X3,
    _X5,
    _X6,
    _X7,
    _Y2,
    _add_product,
    _combine,
    _expand,
    _pade,
    _scale,
    _squarings,
    _taylor_saved,
)


def _tail(ga: Tensor, ga2: Tensor, a: Tensor, projected: bool) -> Tensor:
    """The last step of the adjoint, ``A² = A·A``: ``Ā = ga + ga2·Aᴴ + Aᴴ·ga2`` (``ga``, a
    fresh temporary, is updated in place on the projected path).

    ``projected`` (``A`` skew by construction, e.g. ``L - Lᴴ`` made by :func:`expm_skew`,
    whose only use of ``Ā`` is ``P(Ā) = Ā - Āᴴ``, the gradient w.r.t. ``L``): with
    ``Aᴴ = -A`` and ``S = ga2 + ga2ᴴ``, ``P(ga2·Aᴴ + Aᴴ·ga2) = -(S·A + A·S) = -(X - Xᴴ)``
    for ``X = S·A`` (``(SA)ᴴ = -AS``), so ``Y = ga - S·A`` has ``P(Y) = P(Ā)``: one product
    instead of two. ``Y`` is returned as the gradient w.r.t. ``A``; it is not ``Ā`` (only its
    skew part is), which is exact for ``L`` because the subtraction ``L - Lᴴ`` applies ``P``
    in its backward.
    """
    if projected:
        return _add_product(ga, ga2 + ga2.mH, a, alpha=-1.0)
    ah = a.mH
    return ga + ga2 @ ah + ah @ ga2


def _adjoint(
    g: Tensor,
    saved: tuple,
    m: int,
    s_max: int,
    uniform: bool,
    solve_lu: bool,
    projected: bool = False,
) -> Tensor:
    """Reverse-mode derivative of :func:`_forward`: the gradient w.r.t. the input A, or with
    ``projected`` one whose skew part is that gradient (see :func:`_tail`)."""
    a, a2, a4, a6, w, w1, z1, lu, piv, r, sq, s = saved
    # Squarings, reversed: X_{j+1} = X_j X_j.
    for j in range(s_max - 1, -1, -1):
        xj = sq[j].mH
        gj = _add_product(xj @ g, g, xj)
        g = gj if uniform else torch.where(_expand(s > j), gj, g)
    if m == _TAYLOR:  # (a4, w, w1 hold P₁, Q₁, Q₂)
        return _unscale(_adjoint_taylor(g, a, a2, a4, w, w1, projected), s, s_max, uniform)
    # R = Q^{-1} P with Q = V - U, P = V + U.
    if solve_lu:
        gp = torch.linalg.lu_solve(lu, piv, g, adjoint=True)
    else:  # differentiable path: lu holds Q itself
        gp = torch.linalg.solve_ex(lu.mH, g)[0]
    gq = -(gp @ r.mH)
    gu, gv = gp - gq, gp + gq
    # U = A W.
    ga = gu @ w.mH
    gw = a.mH @ gu
    if m == 7:
        c = _C7
        ga6 = c[7] * gw + c[6] * gv
        ga4 = c[5] * gw + c[4] * gv
        ga2 = c[3] * gw + c[2] * gv
    else:
        c = _C13
        # W = A6 W1 + W2, V = A6 Z1 + Z2.
        a6h = a6.mH
        ga6 = gw @ w1.mH + gv @ z1.mH
        gw1 = a6h @ gw
        gz1 = a6h @ gv
        ga6 = ga6 + c[13] * gw1 + c[12] * gz1 + c[7] * gw + c[6] * gv
        ga4 = c[11] * gw1 + c[10] * gz1 + c[5] * gw + c[4] * gv
        ga2 = c[9] * gw1 + c[8] * gz1 + c[3] * gw + c[2] * gv
    # A6 = A4 A2, A4 = A2 A2, A2 = A A.
    a2h = a2.mH
    ga4 = ga4 + ga6 @ a2h
    ga2 = ga2 + a4.mH @ ga6 + ga4 @ a2h + a2h @ ga4
    return _unscale(_tail(ga, ga2, a, projected), s, s_max, uniform)


def _unscale(ga: Tensor, s: Tensor, s_max: int, uniform: bool) -> Tensor:
    """The last step of the adjoint, the scaling ``A_s = 2^{-s} A``: ``ga`` (a fresh temporary)
    times ``2^{-s}``, in place when every matrix has the same ``s``."""
    if s_max == 0:
        return ga
    return ga.mul_(2.0**-s_max) if uniform else _scale(ga, s, s_max, uniform)


def _adjoint_taylor(
    g: Tensor,
    a: Tensor,
    a2: Tensor,
    p1: Tensor,
    q1: Tensor,
    q2: Tensor,
    projected: bool = False,
) -> Tensor:
    """Reverse-mode derivative of :func:`_taylor8` (six products; five with ``projected``)."""
    g_q1 = g @ q2.mH
    g_q2 = q1.mH @ g
    c = _combine(g, g_q2, g_q1, _Y2, _X6, _X3)
    g_a4 = g_q1.add_(g_q2, alpha=_X7)  # (g_q1 is not needed any more)
    ga2 = _add_product(c, g_a4, p1.mH)
    g_p1 = a2.mH @ g_a4
    ga2 = ga2.add_(g_p1, alpha=_X2)
    return _tail(_combine(g, g_q2, g_p1, 1.0, _X5, _X1), ga2, a, projected)


def _recompute(a: Tensor, m: int, s: Tensor, s_max: int, uniform: bool) -> tuple:
    """The forward intermediates with tracked ops (for double backward), same m and s."""
    if s_max > 0:
        a = _scale(a, s, s_max, uniform)
    a2 = a @ a
    if m == _TAYLOR:
        return _taylor_saved(a, a2, s, s_max, uniform)[1]
    a4 = a2 @ a2
    a6 = a4 @ a2
    u, v, w, w1, z1 = _pade(a, a2, a4, a6, m)
    q = v - u
    x = torch.linalg.solve_ex(q, v + u)[0]
    r = x
    x, sq = _squarings(x, s, s_max, uniform)
    return (a, a2, a4, a6, w, w1, z1, q, None, r, sq, s)


def _tangent(e: Tensor, saved: tuple, m: int, s_max: int, uniform: bool) -> Tensor:
    """Forward-mode derivative of :func:`_forward`: L_r(A, E), Al-Mohy & Higham's scheme."""
    a, a2, a4, a6, w, w1, z1, lu, piv, r, sq, s = saved
    if s_max > 0:
        e = _scale(e, s, s_max, uniform)
    if m == _TAYLOR:  # (a2, a4, a6, w, w1) hold (A², P₁, -, Q₁, Q₂)
        p1, q1, q2 = a4, w, w1
        d2 = a @ e + e @ a
        dp1 = (e * _X1).add_(d2, alpha=_X2)
        d4 = d2 @ p1 + a2 @ dp1
        dq1 = (d2 * _X3).add_(d4)
        dq2 = _combine(e, d2, d4, _X5, _X6, _X7)
        lx = (dq1 @ q2).add_(q1 @ dq2).add_(d2, alpha=_Y2).add_(e)
        return _tangent_squarings(lx, sq, s, s_max, uniform)
    m2 = a @ e + e @ a
    m4 = a2 @ m2 + m2 @ a2
    m6 = a4 @ m2 + m4 @ a2
    if m == 7:
        c = _C7
        lw = c[7] * m6 + c[5] * m4 + c[3] * m2
        lv = c[6] * m6 + c[4] * m4 + c[2] * m2
    else:
        c = _C13
        lw1 = c[13] * m6 + c[11] * m4 + c[9] * m2
        lz1 = c[12] * m6 + c[10] * m4 + c[8] * m2
        lw = a6 @ lw1 + m6 @ w1 + (c[7] * m6 + c[5] * m4 + c[3] * m2)
        lv = a6 @ lz1 + m6 @ z1 + (c[6] * m6 + c[4] * m4 + c[2] * m2)
    lu_ = a @ lw + e @ w
    # R = Q^{-1} P: dR = Q^{-1}(dP - dQ R) = Q^{-1}(Lu + Lv + (Lu - Lv) R).
    rhs = lu_ + lv + (lu_ - lv) @ r
    lx = torch.linalg.solve_ex(lu, rhs)[0] if piv is None else torch.linalg.lu_solve(lu, piv, rhs)
    return _tangent_squarings(lx, sq, s, s_max, uniform)


def _tangent_squarings(lx: Tensor, sq: Tensor, s: Tensor, s_max: int, uniform: bool) -> Tensor:
    """Forward-mode derivative of :func:`_squarings`."""
    for j in range(s_max):
        xj = sq[j]
        lj = _add_product(xj @ lx, lx, xj)
        lx = lj if uniform else torch.where(_expand(s > j), lj, lx)
    return lx
