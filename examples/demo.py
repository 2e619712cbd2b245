"""The four hard constraints on one small model: register, train, print each violation.

    python examples/demo.py

A regression toy: y = f(x) for a random teacher; the student's layers are constrained to be
orthogonal, SPD, inside a box and nonnegative. Every constraint holds after training, to
round-off, because it holds by construction.
"""

from __future__ import annotations

import torch
from torch import nn

import manifoldparam as mp


class Student(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rotate = mp.orthogonal(nn.Linear(16, 16))  # orthogonal 16x16
        self.metric = mp.spd(nn.Linear(16, 16, bias=False), min_eigenvalue=1e-2)  # SPD
        self.gate = mp.bounded(nn.Linear(16, 8), low=-0.5, high=0.5)  # box
        self.mix = mp.nonnegative(nn.Linear(8, 1))  # orthant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.metric(self.rotate(x)))
        return self.mix(torch.tanh(self.gate(h)))


@torch.no_grad()
def violations(model: nn.Module) -> dict[str, float]:
    out = {}
    for mod_name, module in model.named_modules():
        for p in mp.hard.constraints_of(module, "weight"):
            out[f"{mod_name}.weight ({type(p).__name__})"] = float(p.distance(module.weight))
    return out


def main(steps: int = 300) -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 16)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
    with torch.no_grad():
        y = teacher(x)
    model = Student()
    before = violations(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    after = violations(model)
    print()
    print(f"{'constraint':<34}{'violation at start':>20}{'after training':>18}")
    for key in before:
        print(f"{key:<34}{before[key]:>20.2e}{after[key]:>18.2e}")


if __name__ == "__main__":
    main()
