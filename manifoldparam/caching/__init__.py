"""Caching of parametrized weights that is never stale.

* :func:`cached` -- a block (or decorator) in which every parametrized weight is computed once;
* :func:`auto_cache` -- the same without a block, per model (:func:`set_auto` per unit);
* :func:`invalidate` -- drop cached values after writes no version counter sees (``.data``);
* :func:`cached_closure` -- a fresh cache for each evaluation of an optimizer closure.

:mod:`.cache` holds what is keyed (the contract), :mod:`.api` the functions above, :mod:`.read`
the read path of a parametrized attribute (a few microseconds, which an RNN pays at every time
step) and the adoption of attributes registered with torch's own API.
"""

from manifoldparam.caching.api import (
    auto_cache,
    cached,
    cached_closure,
    invalidate,
    is_auto,
    set_auto,
)
from manifoldparam.caching.cache import cached_forward, note_change, value_of

__all__ = [
    "auto_cache",
    "cached",
    "cached_closure",
    "cached_forward",
    "invalidate",
    "is_auto",
    "note_change",
    "set_auto",
    "value_of",
]
