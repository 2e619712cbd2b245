r"""The orthogonal map of a tall Stiefel point in :math:`O(nk^2 + k^3)`: no :math:`n\times n`
matrix is formed.

Math. Let :math:`U \in \mathbb{R}^{n\times k}` have orthonormal columns and
:math:`U_\perp \in \mathbb{R}^{n\times(n-k)}` complete it to an orthogonal
:math:`[U, U_\perp]`. For :math:`S` skew :math:`k\times k` and
:math:`C \in \mathbb{R}^{(n-k)\times k}` the square map's value is
:math:`[U, U_\perp]\,\phi(A)\,E_k` with
:math:`A = \begin{pmatrix} S & -C^\top \\ C & 0\end{pmatrix}` (:math:`\phi = \exp` or the
Cayley map). With :math:`X = U_\perp C` this is :math:`\phi(\Omega)\,U` for the
:math:`n\times n` skew matrix
:math:`\Omega = USU^\top + XU^\top - UX^\top = P N P^\top`, :math:`P = [U, X]`,
:math:`N = \begin{pmatrix} S & -I \\ I & 0\end{pmatrix}`. Since
:math:`\Omega^m = P (NG)^{m-1} N P^\top` with :math:`G = P^\top P = \mathrm{diag}(I, C^\top C)`
(:math:`U^\top X = 0`), every power series (and the Cayley map, a rational function)
satisfies :math:`\phi(\Omega) U = U + P\,(\phi(M) - I)\,E_k` for the :math:`2k\times 2k`
matrix :math:`M = NG = \begin{pmatrix} S & -C^\top C \\ I & 0\end{pmatrix}` (and
:math:`N P^\top U = M E_k`), i.e.

.. math::
    W = U\,F_1 + U_\perp (C F_2), \qquad \begin{pmatrix} F_1 \\ F_2 \end{pmatrix}
    = \phi(M)\,E_k.

This is Edelman, Arias & Smith's (1998) reduction of the geodesic to a :math:`2k\times 2k`
exponential, without the QR factorisation of :math:`X` (:math:`X = QR`, :math:`M` is similar
to the skew :math:`\begin{pmatrix} S & -R^\top \\ R & 0\end{pmatrix}`): QR's derivative is
singular where :math:`C` is rank deficient, at :math:`C = 0` (the base point) in particular;
:math:`M` is polynomial in :math:`C`, so the map is smooth everywhere and its derivatives of
every order are those of the exponential. :math:`M` is not normal; it is balanced by the
similarity :math:`\mathrm{diag}(I, \alpha I)` with :math:`\alpha = \max(1, \max|C^\top C|)^{-1/2}`
(a constant: the value does not depend on it) so that its blocks have comparable norms.

:math:`U_\perp` is never formed: it is :math:`Q\,[0; I_{n-k}]` for the Householder
:math:`Q = I - V T V^\top` of a QR factorisation of :math:`U` (compact WY form, :math:`V`
:math:`n\times k` unit lower trapezoidal, :math:`T` :math:`k\times k` upper triangular), so
:math:`U_\perp Y = [0; Y] - V\,(T\,(V_{k:}^\top Y))`: two :math:`n\times k` products.

Cost per matrix: forward, five :math:`n\times k` by :math:`k\times k` products
(:math:`C^\top C`, :math:`C F_2`, two for :math:`U_\perp`, :math:`U F_1`) and one
:math:`2k\times 2k` exponential (or solve); the backward about twice that.
"""

from __future__ import annotations

import torch
from torch import Tensor

from manifoldparam._device import may_read_on_host
from manifoldparam._torch import is_functorch_wrapped, is_tracing
from manifoldparam.linalg.expm import _expm
from manifoldparam.linalg.op import expm_op

__all__ = ["complement", "householder_frame", "orthonormalize", "polar", "stiefel_map"]


def polar(w: Tensor) -> Tensor:
    r"""The polar factor :math:`UV^\top` of a tall ``w`` (``(*, n, k)``, :math:`n \ge k`), the
    nearest matrix with orthonormal columns, in :math:`O(nk^2)`.

    Where the value can be read (eager, CPU or CUDA) and ``w`` is well conditioned
    (:math:`\kappa(w^\top w) \le 16`, e.g. a random initialisation), as
    :math:`w\,(w^\top w)^{-1/2}`: two products in ``w``'s dtype and the ``eigh`` of the
    :math:`k\times k` Gram matrix in float64 (relative error about :math:`\kappa u`), several
    times faster than an SVD of ``w`` for :math:`k \ll n` (3x at 30000x50 float32); else from
    the thin SVD of ``w`` (also for a rank-deficient ``w``)."""
    if may_read_on_host(w) and not is_functorch_wrapped(w) and w.numel():
        lam, vec = torch.linalg.eigh((w.mT @ w).to(torch.float64))
        if float((lam[..., :1] / lam[..., -1:]).amin()) >= 1 / 16:
            root = (vec * lam.rsqrt().unsqueeze(-2)) @ vec.mT
            return w @ root.to(w.dtype)
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    return u @ vh


def orthonormalize(u: Tensor, tol: float, max_steps: int = 8) -> Tensor:
    r"""Newton--Schulz steps :math:`u \leftarrow u(3I - u^\top u)/2` (each maps
    :math:`\delta = \max|u^\top u - I|` to about :math:`3\delta^2/4`) until
    :math:`\delta \le` ``tol``, for a nearly orthonormal tall ``u`` (:math:`\delta < 1/2`):
    two :math:`n\times k` products a step, one Gram product to stop (δ is read on the host;
    where it cannot be, two steps)."""
    eye = torch.eye(u.shape[-1], dtype=u.dtype, device=u.device)
    readable = may_read_on_host(u) and not is_functorch_wrapped(u)
    for _ in range(max_steps if readable else 2):
        gram = u.mT @ u
        delta = float((gram - eye).abs().amax()) if readable else 1.0
        if delta <= tol:
            break
        # u(3I - G)/2 = u + u(I - G)/2: one fused product-accumulate
        half = (eye - gram).mul_(0.5)
        u = torch.addmm(u, u, half) if u.dim() == 2 else u + u @ half
        if delta * delta <= tol:  # (the step left about 3δ²/4 + round-off: no Gram to check)
            break
    return u


def householder_frame(u: Tensor) -> tuple[Tensor, Tensor]:
    r"""``(V, T)`` with ``Q = I - V T Vᵀ`` orthogonal and ``Q[:, :k] = U·D`` (``D`` a diagonal
    of ±1) for ``u`` (``(*, n, k)``) with orthonormal columns, in compact WY form.

    Not by a Householder QR of ``u`` (``geqrf``: a column at a time, memory bound for
    :math:`k \ll n`) but by reconstructing the reflectors from ``u`` itself (Ballard, Demmel,
    Grigori, Jacquelin, Nguyen & Solomonik 2015): :math:`Q E_k = UD` means
    :math:`V\,(T V_1^\top) = E_k - UD`, an LU factorisation without pivoting of an
    :math:`n\times k` matrix, stable when each sign :math:`d_i` is chosen during the
    elimination so that the pivot is at least 1 in modulus. An LU of the top :math:`k\times k`
    block (:math:`O(k^3)`), then one triangular solve for the other :math:`n - k` rows
    (:math:`O(nk^2)`, a level-3 kernel), and :math:`T = R\,V_1^{-\top}`.
    """
    k = u.shape[-1]
    e = torch.eye(k, dtype=u.dtype, device=u.device).expand(*u.shape[:-2], k, k).clone()
    f = u[..., :k, :].clone()
    low = torch.zeros_like(e)
    d = u.new_empty(*u.shape[:-2], k)
    for i in range(k):
        ei, fi = e[..., i, i], f[..., i, i]
        di = -torch.where(fi * ei >= 0, 1.0, -1.0).to(u.dtype)
        d[..., i] = di
        col = e[..., i + 1 :, i] - di.unsqueeze(-1) * f[..., i + 1 :, i]
        li = col / (ei - di * fi).unsqueeze(-1)
        low[..., i + 1 :, i] = li
        # the row operations of this step, on what is left of both parts
        e[..., i + 1 :, i + 1 :] -= li.unsqueeze(-1) * e[..., i : i + 1, i + 1 :]
        f[..., i + 1 :, i + 1 :] -= li.unsqueeze(-1) * f[..., i : i + 1, i + 1 :]
    r = (e - f * d.unsqueeze(-2)).triu()
    v1 = low + torch.eye(k, dtype=u.dtype, device=u.device)
    v2 = torch.linalg.solve_triangular(r, -u[..., k:, :] * d.unsqueeze(-2), upper=True, left=False)
    t = torch.linalg.solve_triangular(v1.mT, r, upper=True, left=False, unitriangular=True)
    return torch.cat([v1, v2], dim=-2), t


def complement(v: Tensor, t: Tensor, y: Tensor, out: Tensor | None = None) -> Tensor:
    r"""``U⊥ y = Q [0; y]`` (shape ``(*, n, j)``) for ``y`` of shape ``(*, n - k, j)``, with
    ``Q = I - V T Vᵀ`` from :func:`householder_frame`: :math:`O(nkj)`, no :math:`n\times n`
    matrix. With ``out`` (``(*, n, j)``): ``out + U⊥ y``, one product fused into it."""
    k = v.shape[-1]
    z = t @ (v[..., k:, :].mT @ y)
    if out is None:
        w = -(v @ z)
    elif out.dim() == v.dim() == z.dim() == 2:
        w = torch.addmm(out, v, z, alpha=-1)
    else:
        w = out - v @ z
    w[..., k:, :] += y  # (in place: no product's backward reads w)
    return w


def stiefel_map(
    s: Tensor,
    c: Tensor,
    base: Tensor,
    v: Tensor,
    t: Tensor,
    *,
    cayley: bool = False,
    max_squarings: int | None = None,
) -> Tensor:
    r"""``[U, U⊥] φ(A) E_k`` (see the module docstring) in :math:`O(nk^2 + k^3)`.

    Args:
        s: the skew :math:`k\times k` block :math:`S` (shape ``(*, k, k)``).
        c: the :math:`(n-k)\times k` block :math:`C`, coordinates in the complement.
        base: :math:`U` (``(*, n, k)``, orthonormal columns).
        v, t: the compact WY form of a Householder :math:`Q` with :math:`Q E_k = U D`
            (:func:`householder_frame`), which defines :math:`U_\perp = Q[:, k:]`.
        cayley: :math:`\phi` is the Cayley map :math:`(I - M/2)^{-1}(I + M/2)` (a
            :math:`2k\times 2k` solve) instead of the exponential.
        max_squarings: passed to the exponential (:func:`~manifoldparam.linalg.expm.expm`).

    Returns:
        The :math:`n\times k` point :math:`W = U F_1 + U_\perp(C F_2)` of the Stiefel manifold
        (to round-off), differentiable (to every order) in ``s`` and ``c``.

    Example:
        >>> from manifoldparam.linalg import householder_frame, polar, stiefel_map
        >>> u = polar(torch.randn(1000, 8, dtype=torch.float64))   # a base point
        >>> v, t = householder_frame(u)                             # its complement, implicit
        >>> s = torch.zeros(8, 8, dtype=torch.float64)
        >>> c = 0.1 * torch.randn(992, 8, dtype=torch.float64)
        >>> w = stiefel_map(s, c, u, v, t)
        >>> bool((w.mT @ w - torch.eye(8, dtype=torch.float64)).abs().max() < 1e-13)
        True
    """
    k = s.shape[-1]
    gram = c.mT @ c
    # (a constant of the similarity: the value does not depend on it, so no gradient)
    alpha = gram.detach().abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1.0).rsqrt()
    eye = torch.eye(k, dtype=s.dtype, device=s.device)
    lower = torch.cat([(eye / alpha).expand_as(gram), torch.zeros_like(gram)], dim=-1)
    upper = torch.cat([s.expand_as(gram), -alpha * gram], dim=-1)
    m = torch.cat([upper, lower], dim=-2)
    if cayley:
        eye2 = torch.eye(2 * k, dtype=s.dtype, device=s.device)
        # solve_ex: no error check, no device sync (M is similar to a skew matrix).
        f = torch.linalg.solve_ex(eye2 - 0.5 * m, (eye2 + 0.5 * m)[..., :k])[0]
    elif torch.compiler.is_compiling():  # our exponential and backward as one opaque op
        f = expm_op(m, max_squarings, projected=False)[..., :k]
    elif is_tracing():  # (torch.jit.trace records no Function with non-tensor outputs)
        f = torch.linalg.matrix_exp(m)[..., :k]
    else:
        f = _expm(m, max_squarings, projected=False)[0][..., :k]
    return complement(v, t, c @ (alpha * f[..., k:, :]), out=base @ f[..., :k, :])


def _cayley(a: Tensor, k: int) -> Tensor:
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    rhs = (eye + 0.5 * a)[..., :k]
    # solve_ex: no error check, so no device sync (I - A/2 is nonsingular for skew A).
    return torch.linalg.solve_ex(eye - 0.5 * a, rhs)[0]


def _newton_schulz_correction(t: Tensor, steps: int) -> Tensor:
    """``NS^steps(t) - t`` for a (detached) nearly orthonormal ``t``.

    Added to the tracked ``t``, the value is ``NS^steps(t)`` (up to one rounding) while the
    backward (and forward-mode tangent) of the correction is zero: the differential of NS at an
    orthonormal ``t`` is the identity on tangent vectors, and every variation of ``B·φ(A)`` is
    tangent, so the gradient equals the one through NS up to ``O(|tᵀt - I|)`` (float round-off)
    -- and so do all higher derivatives, since NS∘(B·φ) and B·φ are the same function on the
    manifold. This saves the four products of NS's backward.
    """

    # NS(y) - y = y/2 - y(yᵀy)/2: one fused product, and no cancellation in the difference.
    def step(y: Tensor) -> Tensor:
        if y.dim() == 2:
            return torch.addmm(y, y, y.mT @ y, beta=0.5, alpha=-0.5)
        return torch.matmul(y, y.mT @ y).mul_(-0.5).add_(y, alpha=0.5)

    d = step(t)
    for _ in range(steps - 1):
        d = d + step(t + d)
    return d
