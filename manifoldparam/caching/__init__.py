"""Caching of parametrized weights that is never stale (see :mod:`.cache`).

* :func:`cached` -- a block (or decorator) in which every constrained weight is computed once;
* :func:`auto_cache` -- the same without a block, per model (``set_auto`` per parametrization);
* :func:`invalidate` -- drop cached values after writes no version counter sees (``.data``);
* :func:`cached_closure` -- a fresh cache for each evaluation of an optimizer closure.

:mod:`.read` gives each constrained attribute a read path that reaches the cache without
going through ``torch.nn.utils.parametrize``'s ``ParametrizationList`` module (installed by
the constructors; a read costs a few microseconds, which an RNN pays at every time step).
"""

from manifoldparam.caching.cache import (
    auto_cache,
    cached,
    cached_closure,
    evaluate,
    invalidate,
    is_auto,
    set_auto,
)

__all__ = [
    "auto_cache",
    "cached",
    "cached_closure",
    "evaluate",
    "invalidate",
    "is_auto",
    "set_auto",
]
