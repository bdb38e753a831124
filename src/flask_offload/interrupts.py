"""SIGTERM and SIGINT: drain the pools, then hand the signal on to the handler that was there.

A handler is installed only from the main thread, only over Python's own default (SIGTERM's
``SIG_DFL``, which would end the process without running ``atexit``, and SIGINT's
``KeyboardInterrupt``), never inside uWSGI or mod_wsgi, and it always chains. So it is there
under ``flask run``, ``flask offload worker``, waitress and plain scripts, and stays out of the
way of servers that own their signals (gunicorn's workers install theirs first; those drain at
exit instead).

In Werkzeug's reloader watcher (``flask run --debug``, ``app.run(debug=True)``) the same
handler sees, from the interrupted frame, that the process is only waiting on its serving
child: it hands SIGINT to that child, which drains, and lets the watcher end with it. Sent to
the watcher alone (an IDE's stop button, a process manager) the signal thus drains as Ctrl-C
to the whole terminal group does; when both get it, the child ignores the copy.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from . import servers

# Set once a signal has started a drain in this process.
_interrupted = False
# In the reloader's serving child: its watcher forwards SIGINT that the terminal may have sent
# to both processes already, so a repeat while draining is that copy, not a second Ctrl-C.
_watched_by_reloader = False
_installed = False
_grace = 0.0


def interrupted() -> bool:
    """True once SIGTERM or SIGINT has asked this process's pools to drain."""
    return _interrupted


def watched_by_reloader() -> None:
    """This process is the reloader's serving child (its watcher forwards SIGINT)."""
    global _watched_by_reloader
    _watched_by_reloader = True


def after_fork() -> None:
    """A forked child has been interrupted by nothing yet, whatever its parent went through."""
    global _interrupted, _watched_by_reloader
    _interrupted = _watched_by_reloader = False


def install(drain: Callable[[], None], grace: float) -> None:
    """Install the handlers where nobody else has claimed the signals (see the module doc).
    ``drain`` stops every pool; ``grace`` bounds how long a reloader watcher waits for its
    child to drain before ending it."""
    global _installed, _grace
    _grace = max(_grace, grace)
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    if servers.uwsgi() is not None or "mod_wsgi" in sys.modules:
        return
    _installed = True
    defaults = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}
    for signum, default in defaults.items():
        previous = signal.getsignal(signum)
        if previous is default:
            signal.signal(signum, _handler(drain, previous))


def _handler(drain: Callable[[], None], previous: Any) -> Callable[[int, FrameType | None], None]:
    def handle(signum: int, frame: FrameType | None) -> None:
        global _interrupted
        child = servers.reloader_child_process(frame) if signum == signal.SIGINT else None
        if child is not None:
            _hand_over(child, signum, previous)
            return
        if _interrupted and _watched_by_reloader:
            return
        _interrupted = True
        drain()
        _chain(previous, signum, frame)

    return handle


def _hand_over(child: Any, signum: int, previous: Any) -> None:
    """In the reloader's watcher: let the serving child drain, then end with it. A second
    signal goes straight to the previous handler (Python then stops the child), and so does
    the first if the child has not exited within the grace period."""
    signal.signal(signum, previous)
    with contextlib.suppress(OSError):  # the child has just exited
        child.send_signal(signum)
    timer = threading.Timer(_grace, _thread.interrupt_main)
    timer.daemon = True
    timer.start()


def _chain(previous: Any, signum: int, frame: FrameType | None) -> None:
    """Hand a signal to the handler that was installed before ours."""
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
