"""Start a pool once the code that set the app up has returned, without waiting for a request.

``init_app`` runs inside the app factory, before the factory has set up what tasks may need
(other extensions, configuration, blueprints). A pool started there could run a job left over
from before a restart against a half-built app (a ``KeyError`` for an extension initialised
after ``init_app``). So ``init_app`` only records who called it, and a launcher thread starts
the pool once every frame of the caller's package that was on the calling thread's stack has
returned: the factory and the helpers in its package it called ``init_app`` through, or the
module that calls ``init_app`` at import time. Where some of those frames hold the app in a
variable, only they are waited for: they are the factory and its helpers, while the code that
called the factory (a ``main()`` that goes on to use the app) gets the app only on return.

A script (the app set up from the program's own ``__main__``) is different: its top-level code
never returns while it serves, and it may be about to call ``app.run(debug=True)``, whose first
process becomes the reloader's watcher and must run no pool. There the pool starts when the
script's thread enters the server (in the reloader's serving child, never in its watcher), or,
for a script that serves some other way or just waits, ``SCRIPT_GRACE`` seconds after its
setup function returned (after ``init_app``, when called at the script's top level).

Code that calls ``init_app`` and then goes on to use the app itself, never returning (a
``main()`` that serves, a test function), has its pool started by the app's first request, or
``FALLBACK`` seconds after ``init_app``, said in the log.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Literal

from .servers import Role, frames, module_of, werkzeug_role

logger = logging.getLogger("flask_offload")

TICK = 0.01
SCRIPT_GRACE = 1.0
FALLBACK = 10.0
# Programs that load the app themselves: their own ``__main__`` is not the app's script.
LAUNCHERS = ("flask.cli", "gunicorn", "waitress", "_pytest", "pytest", "uwsgi", "hupper")

Verdict = Literal["wait", "start", "never"]


def _package(frame: FrameType) -> str:
    return module_of(frame).partition(".")[0]


def _holds(frame: FrameType, app: object) -> bool:
    return app is not None and any(value is app for value in frame.f_locals.values())


def from_script(caller: FrameType) -> bool:
    """True when ``caller`` runs for the program's own ``__main__`` script, not for a server,
    the Flask CLI or a test runner that loads the app."""
    stack = list(frames(caller))
    return any(module_of(frame) == "__main__" for frame in stack) and not any(
        module_of(frame).startswith(LAUNCHERS) for frame in stack
    )


@dataclass
class Pending:
    """A pool waiting for the setup code to return: ``start(role)`` starts it."""

    start: Callable[[Role | None], None]
    thread_id: int
    script: bool
    watched: list[FrameType]
    since: float = field(default_factory=time.monotonic)
    added: float = field(default_factory=time.monotonic)

    @classmethod
    def from_caller(
        cls, start: Callable[[Role | None], None], caller: FrameType, app: object = None
    ) -> Pending:
        stack = list(frames(caller))
        package = _package(caller)
        script = from_script(caller)
        watched = [
            frame
            for frame in stack
            if _package(frame) == package
            and not (module_of(frame) == "__main__" and frame.f_code.co_name == "<module>")
        ]
        # The factory holds the app while init_app runs; its caller gets it only on return.
        holders = [frame for frame in watched if _holds(frame, app)]
        return cls(start, threading.get_ident(), script, holders or watched)

    def verdict(self, top: FrameType | None, now: float) -> tuple[Verdict, Role | None]:
        """Whether to start now, given the calling thread's current innermost frame."""
        if top is None:
            return "start", None  # the thread that set the app up has finished
        role = werkzeug_role(top) if self.script else None
        if role == "watcher":
            return "never", role
        if role is not None:
            return "start", role
        if self.watched:
            running = {id(frame) for frame in frames(top)}
            if any(id(frame) in running for frame in self.watched):
                if now - self.added < FALLBACK:
                    return "wait", None
                logger.info(
                    "starting the worker pool %.0f s after init_app: the code that called it "
                    "has not returned",
                    FALLBACK,
                )
                return "start", None
            self.watched, self.since = [], now  # the setup code has just returned
        if not self.script or now - self.since >= SCRIPT_GRACE:
            return "start", None
        return "wait", None


class Launcher:
    """One thread that polls the pending pools' setup threads and starts each in turn; it
    exits when none is left, so a process that has started its pools runs no launcher."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[Pending] = []
        self._thread: threading.Thread | None = None

    def add(
        self, start: Callable[[Role | None], None], caller: FrameType, app: object = None
    ) -> Callable[[], None]:
        """Start ``start`` once ``caller`` (or, within it, the factory holding ``app``) has
        returned; the function returned starts it now (the app serves its first request: its
        setup is over)."""
        pending = Pending.from_caller(start, caller, app)
        with self._lock:
            self._pending.append(pending)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="offload-launcher", daemon=True
                )
                self._thread.start()
        return lambda: self._launch(pending, "start", self._role_now(pending))

    @staticmethod
    def _role_now(pending: Pending) -> Role | None:
        """Where the script's thread is when a first request starts the pool before this
        launcher saw it enter the server: a reloader's serving child must know it is one."""
        if not pending.script:
            return None
        return werkzeug_role(sys._current_frames().get(pending.thread_id))

    def forget(self) -> None:
        """In a forked child: the parent's pending pools and its thread are not ours."""
        self._lock = threading.Lock()
        self._pending = []
        self._thread = None

    def _run(self) -> None:
        while True:
            time.sleep(TICK)
            with self._lock:
                if not self._pending:
                    self._thread = None
                    return
                pending = list(self._pending)
            for item in pending:
                top = sys._current_frames().get(item.thread_id)
                verdict, role = item.verdict(top, time.monotonic())
                del top
                if verdict != "wait":
                    self._launch(item, verdict, role)

    def _launch(self, item: Pending, verdict: Verdict, role: Role | None) -> None:
        """Take ``item`` off the list (once, whichever thread comes first) and start it."""
        with self._lock:
            if item not in self._pending:
                return
            self._pending.remove(item)
        if verdict == "start":
            try:
                item.start(role)
            except Exception:
                logger.exception("could not start the worker pool")
