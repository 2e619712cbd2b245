"""Caching of parametrized weights that is never stale (see :mod:`.cache`)."""
