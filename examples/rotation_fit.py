"""A PCA subspace on the Grassmannian, then a Procrustes rotation in SO(3), on scikit-learn's
digits.

1. ``mp.grassmannian``: the 3-dimensional principal subspace of the digits (64 pixels) of one
   half of the data, found by Adam maximising the captured variance ``tr(UᵀΣU)`` over
   ``Gr(64, 3)`` (3·61 = 183 coordinates: only the span moves). Checked against the top three
   eigenvectors of Σ (the projection distance between the spans).
2. ``mp.rotation``: the embeddings of all digits in that subspace and in the principal basis of
   the *other* half (computed by an eigendecomposition: another basis, signs and order of
   its own) differ by nearly a rotation. The best rotation ``R ∈ SO(3)``
   (``min ‖Z_A R - Z_B‖²``, Procrustes) is fitted by Adam on 3 Rodrigues coordinates and
   checked against the closed-form solution (Kabsch/Umeyama: the SVD with the determinant's
   sign fixed).

Both weights stay on their sets by construction; the script records the loss and the
constraint violation (``max|UᵀU - I|``, ``max|RᵀR - I|``, ``|det R - 1|``) at every step and
saves ``examples/out/rotation_fit.png``.

    python examples/rotation_fit.py --quick     # 300 + 200 steps, ≈ 5 s
    python examples/rotation_fit.py             # 1000 + 500 steps
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from torch import nn
from tqdm import tqdm

import manifoldparam as mp


def violation(w: torch.Tensor) -> float:
    w = w.detach().double()
    eye = torch.eye(w.shape[-1], dtype=w.dtype)
    return float((w.mT @ w - eye).abs().max())


def fit_subspace(cov: torch.Tensor, k: int, steps: int) -> tuple[nn.Module, list, list]:
    basis = mp.grassmannian(nn.Linear(k, cov.shape[0], bias=False))  # U: 64×3, orthonormal
    opt = torch.optim.Adam(basis.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses, viol = [], []
    for _ in tqdm(range(steps), desc="Gr(64, 3): PCA subspace"):
        opt.zero_grad()
        u = basis.weight
        loss = -torch.trace(u.T @ cov @ u)  # minus the captured variance
        loss.backward()
        opt.step()
        sched.step()
        losses.append(-float(loss.detach()))
        viol.append(violation(u))
    return basis, losses, viol


def fit_rotation(za: torch.Tensor, zb: torch.Tensor, steps: int) -> tuple[nn.Module, list, list]:
    rot = mp.rotation(nn.Linear(3, 3, bias=False))  # R: 3 Rodrigues coordinates
    opt = torch.optim.Adam(rot.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses, viol = [], []
    for _ in tqdm(range(steps), desc="SO(3): Procrustes"):
        opt.zero_grad()
        r = rot.weight
        loss = ((za @ r - zb) ** 2).sum(-1).mean()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        det = float(torch.linalg.det(r.detach().double()))
        viol.append(max(violation(r), abs(det - 1)))
    return rot, losses, viol


def kabsch(za: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
    """The closed-form minimiser of ‖Z_A R - Z_B‖ over SO(3) (Umeyama's sign fix)."""
    u, _, vh = torch.linalg.svd(za.T.double() @ zb.double())
    d = torch.ones(3, dtype=torch.float64)
    d[-1] = torch.sign(torch.linalg.det(u @ vh))
    return (u * d) @ vh


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="300 + 200 steps")
    ap.add_argument("--out", default=str(Path(__file__).parent / "out"))
    args = ap.parse_args()
    steps_gr, steps_rot = (300, 200) if args.quick else (1000, 500)
    torch.manual_seed(0)
    torch.set_num_threads(1)

    x = torch.tensor(load_digits().data, dtype=torch.float32) / 16.0
    x = x - x.mean(0)
    perm = torch.randperm(len(x))
    half_a, half_b = x[perm[: len(x) // 2]], x[perm[len(x) // 2 :]]
    cov_a = half_a.T @ half_a / len(half_a)

    basis, gr_loss, gr_viol = fit_subspace(cov_a, 3, steps_gr)
    u = basis.weight.detach()
    top = torch.linalg.eigh(cov_a.double()).eigenvectors[:, -3:].float()
    best = float(torch.trace(top.T @ cov_a @ top))
    dist = float(mp.hard.subspace_distance(u, top))
    print(
        f"Gr(64, 3): variance {gr_loss[-1]:.5f} (eigenvectors: {best:.5f}), "
        f"distance to the principal subspace {dist:.2e}, max|UᵀU - I| {gr_viol[-1]:.1e}"
    )

    cov_b = half_b.T @ half_b / len(half_b)
    basis_b = torch.linalg.eigh(cov_b.double()).eigenvectors[:, -3:].float()
    za, zb = x @ u, x @ basis_b  # every digit in both bases
    rot, r_loss, r_viol = fit_rotation(za, zb, steps_rot)
    r_star = kabsch(za, zb).float()
    opt_loss = float(((za @ r_star - zb) ** 2).sum(-1).mean())
    gap = float((rot.weight.detach() - r_star).abs().max())
    print(
        f"SO(3): loss {r_loss[-1]:.6f} (closed form {opt_loss:.6f}), max|R - R*| {gap:.1e}, "
        f"max(|RᵀR - I|, |det R - 1|) {r_viol[-1]:.1e}"
    )

    fig, ax = plt.subplots(1, 3, figsize=(14, 3.8))
    ax[0].plot([max(best - v, 1e-9) for v in gr_loss], label="tr(top-3 eigenvectors) − tr(UᵀΣU)")
    ax[0].set(xlabel="step", yscale="log", title="Gr(64, 3): variance left to capture")
    ax[1].plot([max(v - opt_loss, 1e-9) for v in r_loss], label="‖Z_A R − Z_B‖²/N − Kabsch's")
    ax[1].set(xlabel="step", yscale="log", title="SO(3): Procrustes loss above the optimum")
    ax[2].plot(gr_viol, label="max|UᵀU − I| (Grassmannian)")
    ax[2].plot(r_viol, label="max(|RᵀR − I|, |det R − 1|) (rotation)")
    ax[2].axhline(torch.finfo(torch.float32).eps, color="k", ls=":", lw=1, label="float32 eps")
    ax[2].set(xlabel="step", yscale="log", ylim=(1e-9, 1e-3), title="constraint violation")
    for a in ax:
        a.legend(fontsize=8)
    fig.tight_layout()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "rotation_fit.png"
    fig.savefig(path, dpi=100)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
