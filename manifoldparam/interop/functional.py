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
    """Check the keys of a ``torch.func.functional_call`` dict against ``model``.

    Args:
        model: the (constrained) model.
        keys: the keys to check; the right ones are ``model.named_parameters()``'s (for a
            constrained attribute, its coordinates ``fc.parametrizations.weight.original``).

    Raises:
        KeyError: a key names a constrained tensor (``"fc.weight"``) instead of its
            coordinates (the message gives the right key), or a tensor ``model`` does not
            have.

    Example:
        >>> model = nn.Sequential(mp.orthogonal(nn.Linear(2, 2)))
        >>> mp.interop.check_functional_keys(model, ["0.parametrizations.weight.original"])
        >>> mp.interop.check_functional_keys(model, ["0.weight"])
        Traceback (most recent call last):
        ...
        KeyError: "functional_call on Sequential: ['0.weight'] name constrained tensors; ...
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
    r""":func:`torch.func.functional_call` after :func:`check_functional_keys`.

    Computes ``model(*args, **kwargs)`` with the tensors of ``params`` in place of the
    module's: a constrained attribute is :math:`f(x')` for the coordinates :math:`x'` passed,
    so it is on its set for any values, and gradients are with respect to :math:`x'`.

    Args:
        model: the (constrained) model; not modified.
        params: coordinate keys (``model.named_parameters()``'s) to tensors.
        args: positional arguments of the forward (a tuple, or one tensor).
        kwargs: keyword arguments of the forward.
        **options: passed to torch (``tie_weights=``, ``strict=``).

    Returns:
        What ``model``'s forward returns.

    Raises:
        KeyError: a key names a constrained tensor or a tensor ``model`` does not have.

    Example:
        >>> model = nn.Sequential(mp.orthogonal(nn.Linear(2, 2, bias=False)))
        >>> params = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
        >>> base = model[0].parametrizations.weight[0].base     # W = B·exp(0) = B
        >>> x = torch.randn(3, 2)
        >>> out = mp.interop.functional_call(model, params, (x,))
        >>> bool(torch.allclose(out, x @ base.T, atol=1e-6))
        True
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
    r"""Per-sample gradients :math:`g_i = \nabla_x \ell(\mathrm{model}_x(x_i), y_i)` with
    respect to the coordinates, with ``vmap(grad(...))``.

    Args:
        model: the (constrained) model; not modified.
        loss_fn: ``loss_fn(output, target)`` on one sample (no batch dimension).
        params: coordinate-keyed tensors (e.g. ``dict(model.named_parameters())``);
            gradients are returned for every entry.
        inputs: a batch of inputs; the first dimension is the sample.
        targets: the batch of targets, likewise.

    Returns:
        ``{key: tensor of shape (batch, *params[key].shape)}``. Their mean over the batch
        equals the gradient of the mean loss.

    Raises:
        KeyError: a key names a constrained tensor or a tensor ``model`` does not have.

    Example:
        >>> model = nn.Sequential(mp.orthogonal(nn.Linear(3, 3)), nn.Linear(3, 1))
        >>> params = dict(model.named_parameters())
        >>> x, y = torch.randn(5, 3), torch.randn(5, 1)
        >>> g = mp.interop.per_sample_grads(model, nn.functional.mse_loss, params, x, y)
        >>> g["0.parametrizations.weight.original"].shape    # (batch, n(n-1)/2)
        torch.Size([5, 3])
    """
    check_functional_keys(model, list(params))
    detached = {k: v.detach() for k, v in params.items()}

    def one(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = torch.func.functional_call(model, p, (x.unsqueeze(0),))
        return loss_fn(out.squeeze(0), y)

    return torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(detached, inputs, targets)
