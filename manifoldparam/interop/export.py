"""Export a constrained model as plain modules, without touching the source.

``copy.deepcopy`` of a parametrized model shares torch's generated ``Parametrized<Class>``
with the source, so ``remove_parametrizations`` on the copy deletes the property from that
shared class and breaks the *source* model (its ``.weight`` disappears). :func:`export`
never mutates a class: it deep-copies the model, then on the copy evaluates each
parametrized tensor once, puts the module back to its own class and stores the value as an
ordinary parameter (or buffer) under the same name -- what
``remove_parametrizations(..., leave_parametrized=True)`` leaves, minus the shared-class
hazard. Soft-constraint declarations and caches are dropped from the copy.

Example::

    plain = manifoldparam.export(model)         # nn.Linear etc., weight = the constrained value
    torch.save(plain, "model.pt")               # pickles (a parametrized model refuses)
    model(x)                                    # the source is untouched and still trainable
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = ["export"]

_SOFT_REGISTRY = "_mp_soft"


@torch.no_grad()
def _unparametrize(module: nn.Module, requires_grad: bool | None) -> None:
    """Replace every parametrized tensor of ``module`` (a copy) by its current value."""
    plists = module.parametrizations
    values: dict[str, tuple[Tensor, bool, bool]] = {}
    for name, plist in plists.items():
        value = getattr(module, name).detach().clone()
        originals = [plist.original] if plist.is_tensor else list(plist.originals)
        is_param = any(isinstance(o, nn.Parameter) for o in originals)
        grad = any(o.requires_grad for o in originals) if requires_grad is None else requires_grad
        values[name] = (value, is_param, grad)
    plain_class = parametrize.type_before_parametrizations(module)
    del module._modules["parametrizations"]
    module.__class__ = plain_class
    for name, (value, is_param, grad) in values.items():
        if is_param:
            module.register_parameter(name, nn.Parameter(value, requires_grad=grad))
        else:
            module.register_buffer(name, value)


def export(
    model: nn.Module, *, requires_grad: bool | None = None, keep_soft: bool = False
) -> nn.Module:
    r"""A deep copy of ``model`` with every parametrization replaced by its current value.

    Each constrained attribute becomes a plain parameter holding :math:`W = f(x)`, the value
    its map gives for the current coordinates :math:`x`; the outputs of the copy equal the
    source's.

    Args:
        model: any module, constrained or not. It is not modified.
        requires_grad: ``requires_grad`` of every exported parameter; ``None`` (default) keeps
            each one's (a constrained value's from its coordinates), ``False`` gives an
            inference-only model.
        keep_soft: keep soft-constraint declarations (:func:`manifoldparam.soft.constrain`)
            on the copy (default: dropped, the export is for inference).

    Returns:
        A plain model: its modules have their own classes (``nn.Linear``, not
        ``ParametrizedLinear``), ``state_dict`` keys are the plain ones (``fc.weight``), it
        pickles with ``torch.save(model)``. All parametrizations are removed, manifoldparam's
        and any other (``torch.nn.utils.parametrizations``).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.

    Example:
        >>> model = nn.Sequential(mp.orthogonal(nn.Linear(3, 3)), nn.Linear(3, 1))
        >>> plain = mp.export(model, requires_grad=False).eval()
        >>> list(plain.state_dict())
        ['0.bias', '0.weight', '1.weight', '1.bias']
        >>> x = torch.randn(2, 3)
        >>> bool(torch.equal(plain(x), model(x)))
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export: expected an nn.Module, got {type(model).__name__}")
    was_training = model.training
    out = copy.deepcopy(model)
    # innermost first: a parametrization may itself own parametrized modules
    for module in reversed(list(out.modules())):
        if parametrize.is_parametrized(module):
            _unparametrize(module, requires_grad)
    if requires_grad is not None:
        out.requires_grad_(requires_grad)
    if not keep_soft:
        for module in out.modules():
            module.__dict__.pop(_SOFT_REGISTRY, None)
    out.train(was_training)
    return out
