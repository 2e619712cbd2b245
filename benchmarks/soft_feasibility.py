"""Soft-constraint feasibility: manifoldparam.soft against mdmm, cooper and humancompatible-train.

The problem (issue 4): a student MLP 16→32→32→1 (tanh) fit by MSE to a teacher of the same
shape whose layers have mean|W| = 1, N = 1024 inputs ~ N(0, I), label noise 0.1. Per layer
(weights only): ``mean|W_l| = 1`` (3 equalities) and ``‖W_l‖_F <= 1.1·√numel(W_l)``, written
``rms(W_l) = ‖W_l‖_F/√numel <= 1.1`` (3 inequalities, active: the Gaussian teacher has rms
≈ 1.25). Adam, lr 1e-2 decayed geometrically to 1e-4 over 5000 full-batch steps.

Reported per method: final loss (MSE), final violation (the largest over the 6 constraints
of |mean|W| - 1| and relu(rms - 1.1)), the first step from which the violation stays below
1e-2 and below 1e-3, and the median step time over the unconstrained loop's.

    python benchmarks/soft_feasibility.py            # the full table (≈ 1-2 min)
    python benchmarks/soft_feasibility.py --steps 1000 --only "mdmm d=10;ours d=10 + restoration"
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

import manifoldparam.soft as soft

D_IN, H, N, NOISE, RMS_MAX = 16, 32, 1024, 0.1, 1.1


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(D_IN, H), nn.Tanh(), nn.Linear(H, H), nn.Tanh(), nn.Linear(H, 1))


def linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def data(seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    teacher = mlp()
    with torch.no_grad():
        for lin in linears(teacher):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g))
            lin.weight.div_(lin.weight.abs().mean())
            lin.bias.copy_(0.1 * torch.randn(lin.bias.shape, generator=g))
        x = torch.randn(N, D_IN, generator=g)
        y = teacher(x) + NOISE * torch.randn(N, 1, generator=g)
    return x, y


def student(seed: int = 1) -> nn.Sequential:
    torch.manual_seed(seed)
    return mlp()


def mean_abs(w: Tensor) -> Tensor:
    return w.abs().mean()


def rms(w: Tensor) -> Tensor:
    return torch.linalg.vector_norm(w) / math.sqrt(w.numel())


@torch.no_grad()
def violation(model: nn.Module) -> Tensor:
    """The largest violation of the 6 constraints (0-dim tensor, no host sync)."""
    vs = []
    for lin in linears(model):
        vs.append((mean_abs(lin.weight) - 1).abs())
        vs.append((rms(lin.weight) - RMS_MAX).clamp_min(0))
    return torch.stack(vs).amax()


# --------------------------------------------------------------------------- methods
# A method builds its optimizer state from (model, x, y) and returns step() -> loss tensor.
Step = Callable[[], Tensor]


def lr_schedule(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=(1e-2) ** (1 / steps))


def unconstrained(model: nn.Module, x: Tensor, y: Tensor, steps: int) -> Step:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = lr_schedule(opt, steps)

    def step() -> Tensor:
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        return loss.detach()

    return step


def ours(damping: float = 10.0, dual_lr: float = 1e-2, restore: bool = True) -> Callable[..., Step]:
    """manifoldparam.soft: constraints declared on the weights, MDMM multipliers ascended by
    the same Adam (``maximize=True``, lr pinned at ``dual_lr``: the schedule decays the
    primal lr only), and with ``restore`` a Gauss–Newton feasibility step after each step
    once the violation is below 0.1.
    """

    def build(model: nn.Module, x: Tensor, y: Tensor, steps: int) -> Step:
        for lin in linears(model):
            soft.constrain(lin, "weight", soft.mean_abs, eq=1.0, damping=damping)
            soft.constrain(lin, "weight", soft.rms, max=RMS_MAX, damping=damping)
        mdmm = soft.MDMM(soft.soft_constraints(model), check_finite=False)
        opt = mdmm.make_optimizer(
            model.parameters(), optimizer=torch.optim.Adam, lr=1e-2, dual_lr=dual_lr
        )
        sched = lr_schedule(opt, steps)

        def step() -> Tensor:
            loss = nn.functional.mse_loss(model(x), y)
            out = mdmm(loss)
            opt.zero_grad()
            out.value.backward()
            opt.step()
            sched.step()
            if restore:
                soft.restore_feasibility(mdmm, within=1e-1)
            return loss.detach()

        return step

    return build


def mdmm_peer(damping: float) -> Callable[..., Step]:
    """mdmm 0.1.3 as its README says: make_optimizer with Adam, both groups scheduled."""

    def build(model: nn.Module, x: Tensor, y: Tensor, steps: int) -> Step:
        from functools import partial

        import mdmm

        cs = []
        for lin in linears(model):
            cs.append(mdmm.EqConstraint(partial(mean_abs, lin.weight), 1.0, damping=damping))
            cs.append(mdmm.MaxConstraint(partial(rms, lin.weight), RMS_MAX, damping=damping))
        module = mdmm.MDMM(cs)
        opt = module.make_optimizer(model.parameters(), optimizer=torch.optim.Adam, lr=1e-2)
        sched = lr_schedule(opt, steps)

        def step() -> Tensor:
            loss = nn.functional.mse_loss(model(x), y)
            out = module(loss)
            opt.zero_grad()
            out.value.backward()
            opt.step()
            sched.step()
            return loss.detach()

        return step

    return build


def constraint_values(model: nn.Module) -> tuple[Tensor, Tensor]:
    """(h, g): the 3 equalities h = mean|W| - 1 and the 3 inequalities g = rms - 1.1 <= 0."""
    ws = [lin.weight for lin in linears(model)]
    h = torch.stack([mean_abs(w) - 1 for w in ws])
    g = torch.stack([rms(w) - RMS_MAX for w in ws])
    return h, g


def cooper_peer(penalty: float = 10.0, dual_lr: float = 1e-2) -> Callable[..., Step]:
    """cooper-optim 1.x: augmented Lagrangian, Adam primal, SGD(maximize) dual, simultaneous."""

    def build(model: nn.Module, x: Tensor, y: Tensor, steps: int) -> Step:
        import cooper

        def constraint(kind: cooper.ConstraintType) -> cooper.Constraint:
            return cooper.Constraint(
                kind,
                formulation_type=cooper.formulations.AugmentedLagrangian,
                multiplier=cooper.multipliers.DenseMultiplier(num_constraints=3),
                penalty_coefficient=cooper.penalty_coefficients.DensePenaltyCoefficient(
                    torch.full((3,), penalty)
                ),
            )

        class Problem(cooper.ConstrainedMinimizationProblem):
            def __init__(self) -> None:
                super().__init__()
                self.eq = constraint(cooper.ConstraintType.EQUALITY)
                self.ineq = constraint(cooper.ConstraintType.INEQUALITY)

            def compute_cmp_state(self) -> cooper.CMPState:
                loss = nn.functional.mse_loss(model(x), y)
                h, g = constraint_values(model)
                return cooper.CMPState(
                    loss=loss,
                    observed_constraints={
                        self.eq: cooper.ConstraintState(violation=h),
                        self.ineq: cooper.ConstraintState(violation=g),
                    },
                )

        cmp = Problem()
        primal = torch.optim.Adam(model.parameters(), lr=1e-2)
        dual = torch.optim.SGD(cmp.dual_parameters(), lr=dual_lr, maximize=True)
        sched = lr_schedule(primal, steps)
        opt = cooper.optim.SimultaneousOptimizer(
            cmp=cmp, primal_optimizers=primal, dual_optimizers=dual
        )

        def step() -> Tensor:
            out = opt.roll()
            sched.step()
            return out.cmp_state.loss.detach()

        return step

    return build


def hct_peer(penalty: float = 10.0, dual_lr: float = 1e-2) -> Callable[..., Step]:
    """humancompatible-train: ALM dual optimizer (quadratic augmentation), forward_update."""

    def build(model: nn.Module, x: Tensor, y: Tensor, steps: int) -> Step:
        from humancompatible.train.dual_optim import ALM

        dual = ALM(m=3, lr=dual_lr, penalty=penalty, augmentation="quadratic")
        dual.add_constraint_group(m=3, lr=dual_lr, is_ineq=True)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        sched = lr_schedule(opt, steps)

        def step() -> Tensor:
            loss = nn.functional.mse_loss(model(x), y)
            h, g = constraint_values(model)
            lag = dual.forward_update(loss, [h, g])
            opt.zero_grad()
            lag.backward()
            opt.step()
            sched.step()
            return loss.detach()

        return step

    return build


METHODS: dict[str, Callable[..., Step]] = {
    "unconstrained": unconstrained,
    "mdmm d=1": mdmm_peer(1.0),
    "mdmm d=10": mdmm_peer(10.0),
    "mdmm d=50": mdmm_peer(50.0),
    "cooper AL ρ=10": cooper_peer(10.0),
    "humancompatible ALM ρ=10": hct_peer(10.0),
    "ours d=10 (multipliers only)": ours(10.0, restore=False),
    "ours d=10 + restoration": ours(10.0),
}


# --------------------------------------------------------------------------- measuring
def run(name: str, steps: int, seed: int = 1) -> dict[str, float]:
    x, y = data()
    model = student(seed)
    step = METHODS[name](model, x, y, steps)
    losses = torch.empty(steps)
    viols = torch.empty(steps)
    for t in range(steps):
        losses[t] = step()
        viols[t] = violation(model)
    row: dict[str, float] = {"loss": float(losses[-1]), "violation": float(viols[-1])}
    for thr in (1e-2, 1e-3):
        above = (viols >= thr).nonzero()
        first = 0 if above.numel() == 0 else int(above[-1]) + 1
        row[f"stay<{thr:g}"] = first if first < steps else math.nan
    return row


def step_time(name: str, steps: int, repeats: int = 5, window: int = 200) -> float:
    """Median time per step of ``name`` over the unconstrained loop's.

    The two loops alternate, window by window, so a change in machine load hits both.
    """
    x, y = data()
    loops = {}
    for key in (name, "unconstrained"):
        model = student()
        loops[key] = METHODS[key](model, x, y, steps)
        for _ in range(20):
            loops[key]()
    times: dict[str, list[float]] = {name: [], "unconstrained": []}
    for _ in range(repeats):
        for key, step in loops.items():
            t0 = time.perf_counter()
            for _ in range(window):
                step()
            times[key].append((time.perf_counter() - t0) / window)
    return statistics.median(times[name]) / statistics.median(times["unconstrained"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--only", default=";".join(METHODS), help="names separated by ';'")
    ap.add_argument("--seed", type=int, default=1, help="the student's initialisation")
    ap.add_argument("--no-timing", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = args.only.split(";")
    print(
        "| method | final loss | final violation | stays < 1e-2 from | stays < 1e-3 from "
        "| step time / unconstrained |"
    )
    print("|---|---|---|---|---|---|")
    for name in names:
        row = run(name, args.steps, args.seed)
        ratio = math.nan if args.no_timing else step_time(name, args.steps)
        fmt = lambda v: "never" if math.isnan(v) else f"{int(v)}"  # noqa: E731
        print(
            f"| {name} | {row['loss']:.4f} | {row['violation']:.1e} | {fmt(row['stay<0.01'])} "
            f"| {fmt(row['stay<0.001'])} | {ratio:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
