"""``torch.compile`` and constrained models: what works, and a clear error where it cannot.

First-order training of a compiled constrained model works as for any module: the
parametrizations are traced into the graph (their maps have no host synchronisation), and
caching steps aside while compiling::

    compiled = torch.compile(model)            # inductor
    loss = loss_fn(compiled(x), y)
    loss.backward(); optimizer.step()          # the optimizer holds model.parameters()

Second-order methods (Hessian-vector products, ``create_graph=True``: torchmin's
``newton-*``/``trust-*``, scipy's ``trust-ncg``/``Newton-CG``/``trust-constr`` through
:func:`manifoldparam.scipy_minimize`) need a double backward, which AOTAutograd's compiled
backward does not support; torch reports it with a message about "donated buffers". Give
those methods the uncompiled module (``compiled._orig_mod``, which shares its parameters).
:func:`check_second_order` raises that advice up front.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from manifoldparam._torch import optimized_module_type

__all__ = ["check_second_order", "compiled_submodules", "explain_double_backward_error"]


def compiled_submodules(module: nn.Module | Iterable[nn.Module]) -> list[str]:
    """Names of the ``torch.compile``-d modules in ``module`` (``""`` for the module itself)."""
    cls = optimized_module_type()
    if cls is None:
        return []
    modules = [("", module)] if isinstance(module, nn.Module) else enumerate(module)
    found: list[str] = []
    for prefix, m in modules:
        if not isinstance(m, nn.Module):
            continue
        for name, sub in m.named_modules():
            if isinstance(sub, cls):
                found.append(".".join(p for p in (str(prefix), name) if p))
    return found


def check_second_order(module: nn.Module | Iterable[nn.Module], method: str) -> None:
    """Refuse a second-order ``method`` on a compiled module, with the fix.

    A second-order method differentiates the gradient (a double backward), which a compiled
    backward does not support; the uncompiled module (``compiled._orig_mod``) has the same
    parameters.

    Args:
        module: a module (or several) that may be or contain ``torch.compile`` output.
        method: the method's name, for the message (``"trust-ncg"``, ``"newton-exact"``).

    Raises:
        TypeError: ``module`` is or contains a compiled module; the message names where and
            the fix.

    Example:
        >>> model = nn.Linear(2, 2)
        >>> mp.interop.check_second_order(model, "trust-ncg")          # fine: returns None
        >>> mp.interop.check_second_order(torch.compile(model), "trust-ncg")
        Traceback (most recent call last):
        ...
        TypeError: ...
    """
    found = compiled_submodules(module)
    if found:
        where = ", ".join(repr(f) if f else "the module itself" for f in found)
        raise TypeError(_message(method, where))


def _message(method: str, where: str) -> str:
    return (
        f"{method} needs Hessian-vector products (a double backward, create_graph=True), but "
        f"{where} is compiled with torch.compile, whose compiled backward cannot be "
        "differentiated again. Pass the uncompiled module for second-order methods "
        "(compiled._orig_mod shares the same parameters), or use a first-order / "
        "quasi-Newton method (BFGS, L-BFGS-B, torch.optim.LBFGS) with the compiled one."
    )


def explain_double_backward_error(err: BaseException, method: str) -> BaseException:
    """Turn torch's error for a double backward through a compiled graph into a clear one.

    Returns a new :class:`TypeError` (chain it with ``from err``) when ``err`` is that error,
    else ``err`` itself.
    """
    text = str(err)
    if isinstance(err, RuntimeError) and (
        "donated buffers" in text or "double backward" in text or "compiled_autograd" in text
    ):
        return TypeError(_message(method, "a module the objective calls"))
    return err
