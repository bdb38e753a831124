"""SIGTERM and SIGINT: drain the pools, then hand the signal on to the handler that was there.

A handler is installed only from the main thread, only over Python's own default (SIGTERM's
``SIG_DFL``, which would end the process without running ``atexit``, and SIGINT's
``KeyboardInterrupt``), never inside uWSGI or mod_wsgi, and it always chains. So it is there
under ``flask run``, ``flask offload worker``, waitress and plain scripts, and stays out of the
way of servers that own their signals (gunicorn's workers install theirs first; those drain at
exit instead).

The handler itself does no storage work and waits for nothing: it runs on whatever the main
thread was doing, maybe an enqueue holding the storage lock the drain needs. The first signal
starts the drain in a thread of its own, says on stderr what it waits for, and returns; when
the drain is done that thread sends the signal to the main thread again, and the handler then
hands it on. A second signal during the drain stops waiting: it says so and hands the signal
on at once, leaving the running jobs to their lease (the unstarted ones were put back already).

In Werkzeug's reloader watcher (``flask run --debug``, ``app.run(debug=True)``, a script calling
``run_with_reloader``) the same handler sees, from the interrupted frame, that the process only
waits on its serving child: it hands SIGINT to that child, which drains, and ends with it.
Werkzeug puts its own SIGTERM handler in both processes (``sys.exit(0)``, which in the watcher
kills the child at once); ``reclaim_sigterm`` puts ours back over it, so SIGTERM drains under
the reloader exactly as Ctrl-C does. When both processes get the signal, the child ignores the
watcher's copy; a second Ctrl-C reaches the watcher, which stops the child at once.
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, Literal

from . import servers

logger = logging.getLogger("flask_offload")

STOP_NOW = "stopping now: running jobs are left to their lease"
# A signal sent to the main thread just before it enters a blocking call (``waitpid``,
# ``sleep``) is only acted on once that call returns, so a thread that sends one sends it
# again every RESEND seconds until the handler has cleared its flag: the next one interrupts
# the call, and the two count as one. No bytecode between a flag's check and the send lets
# the main thread act on a signal in between, so none is acted on twice.
RESEND = 0.1

Drain = Callable[[], None]  # stops every pool of the process
InFlight = Callable[[], tuple[int, float]]  # jobs running, and how long a drain waits for them

# What signals have done in this process: nothing yet, a drain under way (in its own thread, or
# in the serving child), the drain done (the signal is being handed on), or a second signal
# that stopped waiting for it.
State = Literal["calm", "draining", "drained", "abandoned"]
_state: State = "calm"
# One token for ending a drain: the drain thread (done) and a second signal (stop now) race
# for it, and ``list.pop`` gives it to exactly one of them without a lock a handler could wait on.
_ending: list[None] = [None]
_drained = _thread.allocate_lock()  # held while a signal's drain runs
_handing_on = False  # the drain thread has sent the signal that hands the first one on
_exiting = False  # the interpreter is exiting: the drain thread hands no signal on
# In the reloader's serving child: its watcher forwards SIGINT that the terminal may have sent
# to both processes already, so a repeat is that copy, not a second Ctrl-C.
_watched_by_reloader = False
_installed = False
_reclaiming = False  # a SIGINT sent by reclaim_sigterm, not by a user
_sigint_handler: object = None
_main_thread = threading.main_thread().ident or 0
_grace = 0.0


def interrupted() -> bool:
    """True once SIGTERM or SIGINT has asked this process's pools to drain."""
    return _state != "calm"


def abandoned() -> bool:
    """True once a second signal stopped the drain: nothing waits for running jobs any more."""
    return _state == "abandoned"


def watched_by_parent() -> None:
    """This process is the reloader's serving child (its watcher forwards SIGINT) or a
    ``--processes`` supervisor's child (it passes SIGTERM on, which systemd and Heroku may
    have sent the child too): a repeat during the drain is that copy, not a second signal;
    the parent stops the child at once itself when a second signal reaches it."""
    global _watched_by_reloader
    _watched_by_reloader = True


def after_fork() -> None:
    """A forked child has been interrupted by nothing yet, whatever its parent went through."""
    global _state, _ending, _drained, _handing_on, _exiting, _watched_by_reloader, _reclaiming
    _state, _ending, _drained = "calm", [None], _thread.allocate_lock()
    _handing_on = _exiting = _watched_by_reloader = _reclaiming = False


def install(drain: Drain, in_flight: InFlight, grace: float) -> None:
    """Install the handlers where nobody else has claimed the signals (see the module doc).
    ``grace`` bounds how long a reloader watcher waits for its child to drain."""
    global _installed, _grace, _sigint_handler, _main_thread
    _grace = max(_grace, grace)
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    if servers.uwsgi() is not None or "mod_wsgi" in sys.modules:
        return
    _installed, _main_thread = True, threading.get_ident()
    defaults = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}
    for signum, default in defaults.items():
        previous = signal.getsignal(signum)
        if previous is default:
            handler = _handler(previous, drain, in_flight)
            signal.signal(signum, handler)
            if signum == signal.SIGINT:
                _sigint_handler = handler


def reclaim_sigterm() -> None:
    """Werkzeug's reloader has put its own SIGTERM handler in place of ours: put ours back
    over it, chaining to it. Only the main thread may set a handler, so this thread asks it
    by SIGINT, which our handler takes for this request while ``_reclaiming`` is set (a
    Ctrl-C in that instant, at the reloader's start, is taken for it too: press it again)."""
    global _reclaiming
    if _sigint_handler is None or signal.getsignal(signal.SIGINT) is not _sigint_handler:
        return
    _reclaiming = True
    while _reclaiming:  # the handler clears it (see RESEND)
        signal.pthread_kill(_main_thread, signal.SIGINT)
        time.sleep(RESEND)


def settle() -> None:
    """At interpreter exit: wait for a drain that a signal started, unless a second signal
    stops it; the drain then hands no signal on, the process being on its way out."""
    global _exiting
    _exiting = True
    if _state != "draining":
        return
    with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C, handed on by the handler
        while not _drained.acquire(timeout=0.1):
            if _state != "draining":
                return
        _drained.release()


def _handler(
    previous: Any, drain: Drain, in_flight: InFlight
) -> Callable[[int, FrameType | None], None]:
    def handle(signum: int, frame: FrameType | None) -> None:
        global _state, _handing_on, _reclaiming
        if _reclaiming and signum == signal.SIGINT:
            _reclaiming = False
            werkzeug = signal.getsignal(signal.SIGTERM)
            if servers.werkzeug_reloader_handler(werkzeug):
                signal.signal(signal.SIGTERM, _handler(werkzeug, drain, in_flight))
            return
        child = servers.reloader_child_process(frame)
        if child is not None:
            _hand_over(child, signum, previous, frame)
            return
        if _state == "calm":
            _state = "draining"
            _drained.acquire()  # free until now: this never waits
            # A bare thread: threading.Thread.start takes a lock of threading's own, which
            # the interrupted frame may hold.
            _thread.start_new_thread(_drain_then_hand_on, (signum, drain, in_flight))
            return
        if _state == "drained" and _handing_on:  # sent by the drain thread, once it is done
            _handing_on = False
        elif _watched_by_reloader:
            return  # the watcher's copy of the signal the terminal sent us too
        elif _state == "draining":
            if not _end():
                return  # the drain has just finished: its own signal hands this one on
            _state = "abandoned"
            say(STOP_NOW)
        _chain(previous, signum, frame)

    return handle


def _drain_then_hand_on(signum: int, drain: Drain, in_flight: InFlight) -> None:
    """The drain thread: say what it waits for, drain, then have the main thread hand the
    signal on (unless a second signal did already)."""
    global _state, _handing_on
    try:
        _announce(signum, *in_flight())
        drain()
    except Exception:
        logger.exception("the drain after %s failed", signal.Signals(signum).name)
    finally:
        _drained.release()
        if _end():
            _state, _handing_on = "drained", True
            while _handing_on and not _exiting:  # the handler clears it (see RESEND)
                signal.pthread_kill(_main_thread, signum)
                time.sleep(RESEND)


def _announce(signum: int, running: int, timeout: float) -> None:
    """Say what the drain waits for, and how to stop waiting."""
    if not running:
        return
    again = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    if running == 1:
        jobs, leave = "1 running job", "it to its"
    else:
        jobs, leave = f"{running} running jobs", "them to their"
    logger.info(
        "waiting up to %g s for %s; %s again to stop now and leave %s lease",
        timeout,
        jobs,
        again,
        leave,
    )


def _end() -> bool:
    """Take the one token that ends a drain; False if the other side took it first."""
    try:
        _ending.pop()
    except IndexError:
        return False
    return True


def _hand_over(child: Any, signum: int, previous: Any, frame: FrameType | None) -> None:
    """In the reloader's watcher: let the serving child drain (it takes SIGINT for either
    signal), then end with it. A second signal stops the child at once through the previous
    handler (Werkzeug's watcher kills it), and so does the grace period running out."""
    global _state
    if _state == "calm":
        _state = "draining"
        with contextlib.suppress(OSError):  # the child has just exited
            child.send_signal(signal.SIGINT)
        timer = threading.Timer(_grace, _stop_child, (child,))
        timer.daemon = True
        timer.start()
        return
    if _state == "draining":
        _state = "abandoned"
        say(STOP_NOW)
    _chain(previous, signum, frame)


def _stop_child(child: Any) -> None:
    """The grace period is over and the serving child still runs: end it now."""
    if child.poll() is None:
        logger.warning("the serving child did not stop within %g s: %s", _grace, STOP_NOW)
        with contextlib.suppress(OSError):
            child.kill()


def say(line: str) -> None:
    """One line on stderr from a signal handler (or a supervisor acting on a signal): a raw
    write, since the interrupted frame may be writing to ``sys.stderr`` or hold a logging lock."""
    with contextlib.suppress(OSError):
        os.write(2, f"flask_offload: {line}\n".encode())


def end_by(signum: int) -> None:
    """End this process by ``signum``, as its default handler would."""
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _chain(previous: Any, signum: int, frame: FrameType | None) -> None:
    """Hand a signal to the handler that was installed before ours."""
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        end_by(signum)
