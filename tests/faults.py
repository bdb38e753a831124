"""Storage faults for the tests: a wrapper of a real backend that raises on chosen calls.

This is a fault, not a mock: every call it lets through goes to the real storage, and the ones
it breaks fail as a dropped connection or a full disk would, either before the statement runs
(``after=False``) or after it ran and committed, as a reply lost on the way back (``after=True``).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from flask_offload.backends import Backend


class StorageFault(OSError):
    """What the wrapper raises in place of the storage's answer."""


class Faulty:
    """Wraps ``backend``; the ``n``-th call of a verb in ``fail`` raises if ``fail[verb](n)``."""

    def __init__(
        self, backend: Backend, fail: dict[str, Callable[[int], bool]], after: bool = False
    ) -> None:
        self.backend = backend
        self.fail = fail
        self.after = after
        self.calls: Counter[str] = Counter()
        self.raised: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        real = getattr(self.backend, name)
        if name not in self.fail:
            return real

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.calls[name] += 1
                broken = self.fail[name](self.calls[name])
                if broken:
                    self.raised[name] += 1
            if broken and not self.after:
                raise StorageFault(f"injected fault in {name}")
            value = real(*args, **kwargs)
            if broken:
                raise StorageFault(f"injected fault in {name} (reply lost)")
            return value

        return call


def every(k: int, limit: int = 1_000_000) -> Callable[[int], bool]:
    """Break every ``k``-th call from the first on (1st, k+1-th, ...), at most ``limit`` times."""
    return lambda n: (n - 1) % k == 0 and (n - 1) // k < limit


def once(n: int = 1) -> Callable[[int], bool]:
    """Break only the ``n``-th call."""
    return lambda call: call == n
