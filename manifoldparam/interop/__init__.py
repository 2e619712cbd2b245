"""Interoperability: any optimizer, checkpoints, export, compile, DDP, ``torch.func``.

* :func:`scipy_minimize` -- :func:`scipy.optimize.minimize` over the flat vector of a model's
  coordinates, autograd gradients and Hessian-vector products, soft constraints as native
  scipy constraints (:mod:`.scipy_bridge`);
* :func:`export` -- plain modules for inference, the source untouched (:mod:`.export`);
* :func:`load_plain_state_dict`, :func:`training_state`, :func:`load_training_state` --
  plain checkpoints into constrained models, bit-for-bit resume (:mod:`.checkpoint`);
* :func:`functional_call`, :func:`per_sample_grads`, :func:`check_functional_keys` -- the
  coordinate-key convention for ``torch.func`` (:mod:`.functional`);
* :func:`check_second_order` -- a clear error where a second-order method meets a compiled
  module (:mod:`.compile`);
* :func:`all_reduce_grads`, :func:`all_reduce_mean`, :func:`broadcast_module`,
  :func:`global_closure`, :func:`replica_divergence` -- multipliers and line searches under
  DDP, replicas checked (also under FSDP2) (:mod:`.distributed`);
* :class:`TrainingState` -- model, optimizer and multipliers in distributed (sharded)
  checkpoints, ``torch.distributed.checkpoint`` (:mod:`.sharded_checkpoint`).
"""

from manifoldparam.interop.checkpoint import (
    PlainLoadReport,
    ProjectedOnLoadWarning,
    load_plain_state_dict,
    load_training_state,
    training_state,
)
from manifoldparam.interop.compile import check_second_order
from manifoldparam.interop.distributed import (
    all_reduce_grads,
    all_reduce_mean,
    broadcast_module,
    global_closure,
    replica_divergence,
)
from manifoldparam.interop.export import export
from manifoldparam.interop.flat import FlatObjective
from manifoldparam.interop.functional import (
    check_functional_keys,
    functional_call,
    per_sample_grads,
)
from manifoldparam.interop.scipy_bridge import scipy_minimize
from manifoldparam.interop.sharded_checkpoint import TrainingState

__all__ = [
    "FlatObjective",
    "PlainLoadReport",
    "ProjectedOnLoadWarning",
    "TrainingState",
    "all_reduce_grads",
    "all_reduce_mean",
    "broadcast_module",
    "check_functional_keys",
    "check_second_order",
    "export",
    "functional_call",
    "global_closure",
    "load_plain_state_dict",
    "load_training_state",
    "per_sample_grads",
    "replica_divergence",
    "scipy_minimize",
    "training_state",
]
