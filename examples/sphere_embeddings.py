"""A normalised-embedding (cosine) classifier on scikit-learn's digits: class prototypes on
the unit sphere (``mp.sphere(dim=-1)``, the oblique manifold) and a rank-8 encoder
(``mp.low_rank``), against the same network unconstrained.

The embedding of an image is ``e = normalize(f(x))``; its logits are ``s · ⟨e, w_c⟩`` for
unit-norm class prototypes ``w_c`` (the rows of the classifier, on the sphere by
construction: no renormalisation in the forward), a fixed scale ``s = 10``. The first layer
has rank at most 8 (960 coordinates instead of 4096). Both models see the same batches and
initial weights. Saves ``examples/out/sphere_embeddings.png``: test accuracy over training,
and the cosines between the learnt prototypes.

    python examples/sphere_embeddings.py --quick     # 150 steps
    python examples/sphere_embeddings.py             # 400 steps
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from _shared import command_line, digits
from torch import nn
from tqdm import tqdm

import manifoldparam as mp

SCALE = 10.0  # the cosine logits' temperature


class Net(nn.Module):
    def __init__(self, constrained: bool) -> None:
        super().__init__()
        self.constrained = constrained
        self.encoder = nn.Linear(64, 64)
        self.embed = nn.Linear(64, 16)
        self.classifier = nn.Linear(16, 10, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(torch.tanh(self.encoder(x)))
        if not self.constrained:
            return self.classifier(h)
        return SCALE * F.normalize(h, dim=-1) @ self.classifier.weight.T


def main() -> None:
    args, steps = command_line(__doc__, quick=150, steps=400)
    x, y, train, test = digits()

    torch.manual_seed(1)
    plain = Net(constrained=False)
    ours = Net(constrained=True)
    ours.load_state_dict(plain.state_dict())  # the same initial weights, then constrained:
    mp.low_rank(ours.encoder, rank=8)  # the nearest rank-8 matrix of the init
    mp.sphere(ours.classifier, dim=-1)  # each prototype a unit vector
    models = {"unconstrained": plain, "sphere prototypes + rank-8 encoder": ours}
    opts = {k: torch.optim.Adam(m.parameters(), lr=1e-2) for k, m in models.items()}
    acc: dict[str, list[float]] = {k: [] for k in models}
    gen = torch.Generator().manual_seed(2)

    for _ in tqdm(range(steps), desc="digits (cosine classifier)"):
        batch = train[torch.randint(len(train), (128,), generator=gen)]
        for key, model in models.items():
            opts[key].zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            opts[key].step()
            with torch.no_grad():
                acc[key].append(float((model(x[test]).argmax(-1) == y[test]).float().mean()))

    w = ours.classifier.weight.detach()
    norms = w.norm(dim=-1)
    rank = int(torch.linalg.matrix_rank(ours.encoder.weight.detach()))
    coords = ours.encoder.parametrizations.weight.original.numel()
    for key in models:
        print(f"{key:36s} test accuracy {acc[key][-1]:.3f} (best {max(acc[key]):.3f})")
    print(f"prototype norms: max|‖w_c‖ - 1| = {float((norms - 1).abs().max()):.1e}")
    print(f"encoder: rank {rank}, {coords} coordinates (unconstrained: 4096)")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    for key, values in acc.items():
        ax0.plot(values, label=key)
    ax0.set(xlabel="step", ylabel="test accuracy", ylim=(0.5, 1.0), title="digits, 397 test images")
    ax0.legend(loc="lower right")
    im = ax1.imshow((w @ w.T).numpy(), cmap="coolwarm", vmin=-1, vmax=1)
    ax1.set(title="cosines between the class prototypes", xlabel="class", ylabel="class")
    ax1.set_xticks(range(10))
    ax1.set_yticks(range(10))
    fig.colorbar(im, ax=ax1)
    fig.tight_layout()
    path = out_dir / "sphere_embeddings.png"
    fig.savefig(path, dpi=100)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
