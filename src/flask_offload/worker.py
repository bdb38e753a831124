"""Deprecated: the thread pool that was ``flask_offload.worker.Worker`` is
``flask_offload.pool.Pool`` ("worker" names a process, which runs one pool or more)."""

from __future__ import annotations

import warnings
from typing import Any

from .pool import Pool

_warned = False


def __getattr__(name: str) -> Any:
    """``Worker``: ``Pool``, with a DeprecationWarning the first time it is asked for."""
    global _warned
    if name != "Worker":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if not _warned:
        _warned = True
        warnings.warn(
            "flask_offload.worker.Worker is deprecated: use flask_offload.pool.Pool (a pool of "
            "threads; a worker is a process, which runs one pool or more)",
            DeprecationWarning,
            stacklevel=2,
        )
    return Pool
