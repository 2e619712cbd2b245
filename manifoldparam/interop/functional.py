"""``torch.func.functional_call`` and ``vmap`` per-sample gradients through constrained modules.

The key convention
------------------
Pass the **coordinates**, under the keys ``model.named_parameters()`` gives:
``"fc.parametrizations.weight.original"`` (and buffers such as
``"fc.parametrizations.weight.0.base"`` if you substitute them). The constrained value
``fc.weight`` is then computed from them inside the call, so it lies on its set for any
values passed, and gradients flow to the coordinates -- what an optimizer, a meta-learning
inner loop or an ensemble (``torch.func.stack_module_state``) needs.

Do **not** pass the constrained key ``"fc.weight"``: torch implements it by *assigning*
``module.weight = value`` (``right_inverse``), which writes the source module's coordinates
and base point, fails for a value off the set, and fails inside ``vmap``/``grad``.
:func:`functional_call` here checks the keys and raises with the right name instead.

Example (per-sample gradients of the coordinates)::

    params = {k: v.detach() for k, v in model.named_parameters()}
    grads = per_sample_grads(model, loss_fn, params, x, y)
    grads["fc.parametrizations.weight.original"].shape     # (batch, *original.shape)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = ["check_functional_keys", "functional_call", "per_sample_grads"]

_MARK = "parametrizations."


def _constrained_keys(model: nn.Module) -> dict[str, str]:
    """``"fc.weight"`` -> ``"fc.parametrizations.weight.original"`` for the model."""
    out = {}
    for path, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for name, plist in module.parametrizations.items():
                head = f"{path}." if path else ""
                orig = "original" if plist.is_tensor else "original0"
                out[f"{head}{name}"] = f"{head}{_MARK}{name}.{orig}"
    return out


def check_functional_keys(model: nn.Module, keys: Any) -> None:
    """Raise a :class:`KeyError` if ``keys`` name a constrained tensor (``"fc.weight"``)
    instead of its coordinates, or a tensor ``model`` does not have.

    Example::

        check_functional_keys(model, ["fc.parametrizations.weight.original"])   # fine
        check_functional_keys(model, ["fc.weight"])                             # KeyError
    """
    constrained = _constrained_keys(model)
    bad = [k for k in keys if k in constrained]
    if bad:
        fix = ", ".join(f"{k!r} -> {constrained[k]!r}" for k in bad)
        raise KeyError(
            f"functional_call on {type(model).__name__}: {bad} name constrained tensors; torch "
            "would assign them through the constraint, writing the module's own coordinates "
            "(and failing for a value off the set or under vmap/grad). Pass the coordinates "
            f"instead: {fix} (the keys of model.named_parameters())."
        )
    known = set(dict(model.named_parameters())) | set(dict(model.named_buffers()))
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise KeyError(
            f"functional_call on {type(model).__name__}: unknown keys {unknown}; the model's "
            f"parameters and buffers are {sorted(known)}."
        )


def functional_call(
    model: nn.Module,
    params: Mapping[str, Tensor],
    args: Any = (),
    kwargs: Mapping[str, Any] | None = None,
    **options: Any,
) -> Any:
    """:func:`torch.func.functional_call` after :func:`check_functional_keys`.

    ``params`` maps coordinate keys (``model.named_parameters()``'s) to tensors; the
    constrained values are computed from them inside the call. ``options`` go to torch
    (``tie_weights=``, ``strict=``)::

        out = functional_call(model, {k: v * 1.1 for k, v in model.named_parameters()}, (x,))
    """
    check_functional_keys(model, list(params))
    return torch.func.functional_call(model, dict(params), args, kwargs, **options)


def per_sample_grads(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    params: Mapping[str, Tensor],
    inputs: Tensor,
    targets: Tensor,
) -> dict[str, Tensor]:
    """Per-sample gradients of ``loss_fn(model(x_i), y_i)`` w.r.t. ``params``, with ``vmap``.

    Args:
        model: the (constrained) model; not modified.
        loss_fn: ``loss_fn(output, target)`` on one sample (no batch dimension).
        params: coordinate-keyed tensors (e.g. ``dict(model.named_parameters())``);
            gradients are returned for every entry.
        inputs, targets: batches; the first dimension is the sample.

    Returns ``{key: tensor of shape (batch, *params[key].shape)}``. Their mean over the batch
    equals the gradient of the mean loss. Example::

        grads = per_sample_grads(model, F.mse_loss, dict(model.named_parameters()), x, y)
    """
    check_functional_keys(model, list(params))
    detached = {k: v.detach() for k, v in params.items()}

    def one(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = torch.func.functional_call(model, p, (x.unsqueeze(0),))
        return loss_fn(out.squeeze(0), y)

    return torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(detached, inputs, targets)
