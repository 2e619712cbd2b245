"""What the examples share: their command line, and scikit-learn's digits split once."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from sklearn.datasets import load_digits

OUT = Path(__file__).parent / "out"


def command_line(doc: str, quick: int, steps: int) -> tuple[argparse.Namespace, int]:
    """``--quick`` (``quick`` steps), ``--steps`` (default ``steps``), ``--out``; the parsed
    arguments and the number of steps to run. Seeds torch with 0, one thread."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"{quick} steps")
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    return args, quick if args.quick else args.steps


def digits(train: int = 1400) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits (bundled, no download): pixels scaled to [0, 1], labels, and a
    random split (``train`` indices, the rest for testing) drawn from torch's generator."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x))
    return x, y, perm[:train], perm[train:]
