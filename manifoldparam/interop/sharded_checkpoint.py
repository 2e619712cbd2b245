"""Distributed checkpoints (``torch.distributed.checkpoint``, DCP) of constrained training.

A constrained model's state is its coordinates (``...parametrizations.weight.original``, the
tensors FSDP2 shards), its constraints' buffers (the orthogonal base point, bounds: small and
replicated, never sharded), the optimizer's state, and the Lagrange multipliers of an
``MDMM``, which live outside the model. :class:`TrainingState` puts the three behind one
:class:`~torch.distributed.checkpoint.stateful.Stateful`, so that ``dcp.save`` writes each
rank's shards and ``dcp.load`` reads them back on any number of ranks (one included, with
``no_dist=True``) through torch's ``get_state_dict`` / ``set_state_dict``. The multipliers
and the model share one key space (``model.<...>``, ``mdmm.<...>``) because the optimizer
that ``MDMM.make_optimizer`` builds holds both.

Loading goes through ``load_state_dict``, which drops the cached weights and checks every
loaded coordinate and buffer (:func:`manifoldparam.hard.registration.check_loaded_state`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["TrainingState"]


class TrainingState:
    """Model, optimizer and multipliers as one DCP ``Stateful``: sharded save, load anywhere.

    Args:
        model: the constrained model (``fully_shard``-ed, DDP's ``.module``, or plain).
        optimizer: the optimizer over ``model``'s parameters (and ``mdmm``'s multipliers, as
            ``mdmm.make_optimizer`` builds it), or None.
        mdmm: the :class:`~manifoldparam.MDMM` whose multipliers are saved, or None.

    Each rank saves its own shards; a replicated tensor (a base point, a multiplier) is
    written once. Resuming from it is bit-exact on the same number of ranks; on another number,
    each gradient is reduced in another order (equal to round-off).

    Example (every rank, a process group initialised)::

        import torch.distributed.checkpoint as dcp

        state = {"train": TrainingState(model, optimizer, mdmm)}
        dcp.save(state, checkpoint_id="ckpt/step100")
        ...
        dcp.load(state, checkpoint_id="ckpt/step100")  # in place: model, optimizer, mdmm

        # one process, no process group: the same files
        dcp.load({"train": TrainingState(model, optimizer, mdmm)},
                 checkpoint_id="ckpt/step100", no_dist=True)
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        mdmm: nn.Module | None = None,
    ) -> None:
        # One root for torch's state-dict API: it names each optimizer parameter by its key in
        # the root, and the multipliers are not in the model.
        self.root = nn.ModuleDict({"model": model})
        if mdmm is not None:
            self.root["mdmm"] = mdmm
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        """``{"model": ..., "optim": ...}``: sharded DTensors where the model is sharded."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.root, self._optimizers())
        return {"model": model, "optim": optim}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` returned (filled in place by ``dcp.load``)."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(
            self.root,
            self._optimizers(),
            model_state_dict=state_dict["model"],
            optim_state_dict=state_dict["optim"],
        )

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return [] if self.optimizer is None else [self.optimizer]
