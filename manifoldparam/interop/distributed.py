"""``torch.distributed`` (DDP) with constrained weights and Lagrange multipliers.

Constrained weights need nothing special: wrap the constrained model in
:class:`~torch.nn.parallel.DistributedDataParallel` as usual. The trainable tensors are the
coordinates (``...parametrizations.<name>.original``), whose gradients DDP averages; every
rank then applies the same update to the same coordinates, and buffers such as the orthogonal
base point are broadcast from rank 0 (DDP's ``broadcast_buffers=True``), so the constrained
weights stay identical on all ranks. That broadcast runs at every forward; the base changes
only at ``rebase`` or assignment, which every rank computes from the same coordinates, so
``DDP(model, broadcast_buffers=False)`` keeps the weights identical without the traffic when
every rank builds the model from the same seed (or after one :func:`broadcast_module`).

Multipliers live in an ``MDMM`` outside the DDP module, so DDP does not average their
gradients; when the constraint functions depend on each rank's data, the ranks would drift
apart. Either call :func:`all_reduce_grads` on ``mdmm.parameters()`` between ``backward()``
and ``step()`` (first-order MDMM), or average the constraint values with
:func:`all_reduce_mean` before :func:`manifoldparam.soft.dual_update` (method of
multipliers). Optimizers with a line search or trust region need the same loss *value* on
every rank: wrap their closure in :func:`global_closure`. :func:`replica_divergence` checks
that every rank holds the same tensors.

Example::

    model = DDP(constrained_model)
    mdmm = MDMM(soft_constraints(constrained_model))
    opt = mdmm.make_optimizer(model.parameters(), optimizer=torch.optim.Adam, lr=1e-3)
    broadcast_module(mdmm)                         # the same multipliers everywhere
    for x, y in shard:
        out = mdmm(loss_fn(model(x), y))
        opt.zero_grad(); out.value.backward()
        all_reduce_grads(mdmm.parameters())        # DDP averaged the model's already
        opt.step()
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from manifoldparam._torch import dtensor_of

__all__ = [
    "all_reduce_grads",
    "all_reduce_mean",
    "broadcast_module",
    "global_closure",
    "replica_divergence",
]

F = TypeVar("F", bound=Callable[..., Any])


def _require_initialized(what: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{what}: torch.distributed is not initialized; call "
            "torch.distributed.init_process_group(...) on every rank first."
        )


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy every parameter and buffer of ``module`` from rank ``src`` to all ranks.

    Use it for modules outside DDP (an ``MDMM``'s multipliers) or after a rank-local change.
    Collective: call it on every rank.

    Args:
        module: the module whose tensors are overwritten in place on every rank but ``src``.
        src: the rank whose values win.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialized.
    """
    _require_initialized("broadcast_module")
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src)


def all_reduce_grads(params: Iterable[Tensor]) -> None:
    """Average ``.grad`` over the ranks, in place (``None`` grads count as zeros).

    Args:
        params: the tensors whose gradients to average, e.g. ``mdmm.parameters()`` (the
            multipliers, which DDP does not see), between ``backward()`` and ``step()``.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialized.
    """
    _require_initialized("all_reduce_grads")
    world = dist.get_world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(world)


def all_reduce_mean(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The mean over the ranks of each tensor, e.g. constraint values for
    :func:`manifoldparam.soft.dual_update`::

        out = mdmm(loss)
        dual_update(mdmm, all_reduce_mean(out.fn_values))

    Args:
        tensors: one tensor per quantity, the same shapes on every rank.

    Returns:
        New detached tensors: each input's mean over the ranks.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialized.
    """
    _require_initialized("all_reduce_mean")
    world = dist.get_world_size()
    out = []
    for t in tensors:
        s = t.detach().clone()
        dist.all_reduce(s, op=dist.ReduceOp.SUM)
        out.append(s / world)
    return out


def global_closure(closure: F) -> F:
    """Wrap an optimizer closure so that every rank sees the mean loss over the ranks.

    Line searches and trust regions (``torch.optim.LBFGS(line_search_fn="strong_wolfe")``,
    torchzero, torchmin, scipy) decide from loss *values* how often to evaluate the closure.
    DDP averages the gradients but not the returned loss, so with each rank's own loss the ranks
    decide differently, call the closure a different number of times, and their collectives fall
    out of step (a hang, or tensors filled with another collective's bytes). The wrapped closure
    returns ``loss + (mean_over_ranks(loss) - loss).detach()``: the value every rank agrees on,
    with the rank's own graph (whose gradients DDP averages). Collective: call it on every rank::

        @global_closure
        @manifoldparam.cached_closure
        def closure():
            opt.zero_grad()
            loss = loss_fn(ddp(x), y)
            loss.backward()
            return loss

        opt.step(closure)  # the same steps on every rank

    Args:
        closure: the closure; it returns the loss (a tensor or a number).

    Returns:
        The wrapped closure.
    """

    @functools.wraps(closure)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        loss = closure(*args, **kwargs)
        if not isinstance(loss, Tensor):
            loss = torch.as_tensor(float(loss), dtype=torch.float64, device=_collective_device())
        mean = all_reduce_mean([loss])[0]
        return loss + (mean - loss).detach() if loss.requires_grad else mean

    return wrapped  # type: ignore[return-value]


@torch.no_grad()
def replica_divergence(*modules: nn.Module) -> float:
    """The largest ``|t - t_rank0|`` over every parameter, buffer and constrained value of
    ``modules`` on every rank (0.0 when all ranks hold bit-identical tensors). Sharded
    parameters (``fully_shard``) are gathered first, and each constrained value is the map of
    the gathered coordinates that each rank computes itself.

    Collective: call it on every rank. Example::

        assert replica_divergence(ddp.module, mdmm) == 0.0

    Args:
        modules: the modules to compare (the model, an ``MDMM``).

    Returns:
        ``max |t_r - t_0|`` over every tensor and rank ``r``, as a float; ``inf`` where NaNs
        differ.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialized.
    """
    _require_initialized("replica_divergence")
    from torch.nn.utils import parametrize

    worst = torch.zeros((), dtype=torch.float64)
    for module in modules:
        tensors: list[Tensor] = [*module.parameters(), *module.buffers()]
        for m in module.modules():
            if parametrize.is_parametrized(m):
                tensors += [getattr(m, name) for name in m.parametrizations]
        for t in tensors:
            if dtensor_of(t) is not None:  # a shard (fully_shard): compare the gathered whole
                t = t.full_tensor()
            t = t.detach() if t.is_floating_point() else t.detach().double()  # bool/int buffers
            ref = t.clone()
            dist.broadcast(ref, 0)
            diff = (t - ref).abs().amax().double().cpu() if t.numel() else worst
            nan = bool(torch.isnan(t).any() != torch.isnan(ref).any())
            worst = torch.maximum(worst, diff if not nan else torch.tensor(float("inf")))
    worst = worst.to(_collective_device())
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)


def _collective_device() -> torch.device:
    """Where a tensor made here for a collective must live: NCCL reduces CUDA tensors only."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
