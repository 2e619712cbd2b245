"""mdmm compatibility: its README runs with ``import manifoldparam as mdmm``, and the same
hyperparameters give the same trajectory as mdmm 0.1.3 where mdmm is right (equality and the
clamp-based kinds) -- bit for bit, under Adamax (its default) and Adam."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

import manifoldparam


def readme_model(seed: int = 0) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    """mdmm's README has no model or data: a 4→8→1 tanh MLP and 32 random points (one draw)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    inputs, targets = torch.randn(32, 4), torch.randn(32, 1)
    return model, inputs, targets


def run_readme(mdmm, steps: int = 200) -> tuple[nn.Sequential, object]:
    """mdmm's README, verbatim apart from the model and the data."""
    model, inputs, targets = readme_model()
    loss_fn = nn.MSELoss()

    constraints = []
    for layer in model:
        if hasattr(layer, "weight"):
            fn = partial(lambda x: x.weight.abs().mean(), layer)
            constraints.append(mdmm.EqConstraint(fn, 1))
    mdmm_module = mdmm.MDMM(constraints)
    opt = mdmm_module.make_optimizer(model.parameters(), lr=2e-3)

    for _ in range(steps):
        outputs = model(inputs)
        loss = loss_fn(outputs, targets)
        mdmm_return = mdmm_module(loss)
        opt.zero_grad()
        mdmm_return.value.backward()
        opt.step()
    return model, mdmm_module


def test_readme_runs_with_manifoldparam_as_mdmm() -> None:
    mdmm = manifoldparam  # `import manifoldparam as mdmm`
    model, module = run_readme(mdmm)
    before, _, _ = readme_model()
    # the constraint pulled mean|W| (≈0.25 at init) towards 1
    for layer, layer0 in zip(model[::2], before[::2], strict=True):
        assert abs(layer.weight.abs().mean() - 1) < abs(layer0.weight.abs().mean() - 1) - 0.2
    ret = module(torch.tensor(0.0))
    assert len(ret.fn_values) == len(ret.infs) == 2
    assert ret.value.dim() == 0


def test_readme_trajectory_equals_mdmm() -> None:
    ref = pytest.importorskip("mdmm")
    ours_model, ours_mod = run_readme(manifoldparam)
    ref_model, ref_mod = run_readme(ref)
    for a, b in zip(ours_model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(ours_mod, ref_mod, strict=True):
        assert torch.equal(a.lmbda, b.lmbda)


KINDS = {
    "eq": lambda m, w: m.EqConstraint(lambda: w.sum(), 1.0, damping=2.0),
    "max_hard": lambda m, w: m.MaxConstraintHard(lambda: w.norm(), 0.5, scale=3.0),
    "min_hard": lambda m, w: m.MinConstraintHard(lambda: w[0], 0.3, damping=0.0),
    "bound_hard": lambda m, w: m.BoundConstraintHard(lambda: w[1], -0.1, 0.1, damping=5.0),
}


@pytest.mark.parametrize("optimizer", [torch.optim.Adamax, torch.optim.Adam, torch.optim.SGD])
def test_trajectory_parity(optimizer) -> None:
    ref = pytest.importorskip("mdmm")
    target = torch.tensor([2.0, 1.0, -1.0, 0.5, 0.0])

    def run(lib):
        w = nn.Parameter(torch.linspace(-1, 1, 5))
        module = lib.MDMM([make(lib, w) for make in KINDS.values()])
        opt = module.make_optimizer([w], optimizer=optimizer, lr=1e-2)
        trace = []
        for _ in range(300):
            out = module(((w - target) ** 2).sum())
            opt.zero_grad()
            out.value.backward()
            opt.step()
            trace.append((out.value.detach(), [i.detach() for i in out.infs]))
        return w, module, trace

    w1, m1, t1 = run(manifoldparam)
    w2, m2, t2 = run(ref)
    assert torch.equal(w1, w2)
    for a, b in zip(m1, m2, strict=True):
        assert torch.equal(a.lmbda, b.lmbda)
    for (v1, i1), (v2, i2) in zip(t1, t2, strict=True):
        assert torch.equal(v1, v2)
        assert all(torch.equal(x, y) for x, y in zip(i1, i2, strict=True))
    assert any(x.abs().item() > 0 for _, infs in t1 for x in infs)  # constraints were active


def test_state_dict_keys_match_mdmm_and_load_its_checkpoint() -> None:
    ref = pytest.importorskip("mdmm")
    w = nn.Parameter(torch.ones(3))
    theirs = ref.MDMM(
        [ref.EqConstraint(lambda: w.sum(), 1.0), ref.MaxConstraint(lambda: w[0], 2.0)]
    )
    theirs(w.sum())  # initialises mdmm's slack
    with torch.no_grad():
        theirs[0].lmbda.fill_(0.25)
        theirs[1].lmbda.fill_(-0.5)
    ours = manifoldparam.MDMM(
        [
            manifoldparam.EqConstraint(lambda: w.sum(), 1.0),
            manifoldparam.MaxConstraint(lambda: w[0], 2.0),
        ]
    )
    ours.load_state_dict(theirs.state_dict())  # the slack is eliminated: its key is dropped
    assert ours[0].lmbda.item() == 0.25 and ours[1].lmbda.item() == -0.5
    assert set(ours.state_dict()) == set(theirs.state_dict()) - {"1.slack"}


def run_restart_recipe(seed: int, steps: int, restart: bool) -> tuple[float, list, object]:
    """docs/soft.md's restart recipe on the README problem (ours: νPI, tangent, restoration)."""
    model, inputs, targets = readme_model(seed)
    weights = [model[0].weight, model[2].weight]
    mdmm = manifoldparam.MDMM(
        [
            manifoldparam.constrain(m, "weight", manifoldparam.soft.mean_abs, eq=1.0)
            for m in model[::2]
        ]
    )
    opt = mdmm.make_optimizer(model.parameters(), lr=2e-3, dual="pi", dual_lr=1e-2)
    restarted, viol = None, []
    for step in range(steps):
        loss = nn.functional.mse_loss(model(inputs), targets)
        opt.zero_grad()
        mdmm(loss).value.backward()
        manifoldparam.soft.tangent_gradients(mdmm, weights, within=0.05)
        opt.step()
        before = manifoldparam.soft.restore_feasibility(mdmm, weights, within=0.05)
        if restarted is None and before < 0.05:
            restarted = step
            if restart:
                for p in model.parameters():
                    opt.state.pop(p, None)
        viol.append(max(abs(w.abs().mean().item() - 1) for w in weights))
    final = nn.functional.mse_loss(model(inputs), targets).item()
    return final, viol[restarted + 1 :], opt.state[mdmm[0].lmbda]


def test_restart_recipe_descends_faster_along_the_constraint() -> None:
    """Dropping the model's Adamax state at the first restored step (the approach's large
    gradients no longer shrink its normaliser's steps) ends lower, as feasible, and keeps the
    νPI controller's state of the multipliers."""
    base, viol_base, _ = run_restart_recipe(1, 1000, restart=False)
    ours, viol, dual_state = run_restart_recipe(1, 1000, restart=True)
    assert ours < 0.8 * base  # 0.074 against 0.105 at step 1000
    assert max(viol) < 1e-3 and max(viol_base) < 1e-3
    assert dual_state  # the controller's ξ and step count survived the restart
