"""Where a pool may run, and how it starts, forks and stops with the process.

The recipes in the field start their thread at import and so run it twice under the reloader,
lose it in gunicorn's forked workers, and kill its work on SIGTERM. Here a pool starts once per
serving process, never in the reloader's watcher or in CLI commands such as ``flask shell``,
restarts in a forked child, and drains on SIGTERM/SIGINT or at interpreter exit.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import signal
import sys
import threading
import weakref
from types import FrameType
from typing import Any, Literal

import click
from flask.cli import ScriptInfo
from flask.helpers import get_debug_flag

from .runtime import Runtime

logger = logging.getLogger("flask_offload")

Plan = Literal["start", "after-fork", "watcher", "off"]

# Runtimes of this process that want a pool, so fork and exit hooks can find them.
_managed: weakref.WeakSet[Runtime] = weakref.WeakSet()
_hooks_installed = False
_signals_installed = False


def _cli_command() -> click.Context | None:
    """The click context of the running ``flask`` command, or None outside the Flask CLI."""
    ctx = click.get_current_context(silent=True)
    if ctx is None or ctx.find_object(ScriptInfo) is None:
        return None
    return ctx


def _is_reloader_watcher(ctx: click.Context) -> bool:
    """True in the process ``flask run --reload`` keeps to watch files and restart the server."""
    reload = ctx.params.get("reload")
    if reload is None:
        reload = get_debug_flag()
    return bool(reload) and os.environ.get("WERKZEUG_RUN_MAIN") != "true"


def _in_gunicorn_master() -> bool:
    """True while gunicorn's arbiter loads the app itself (``--preload``), before it forks.

    A forked worker still has the arbiter's frames below its own, so the worker's frames are
    what tell the two apart.
    """
    if "gunicorn.arbiter" not in sys.modules:
        return False
    frame: FrameType | None = sys._getframe()
    modules = set()
    while frame is not None:
        modules.add(str(frame.f_globals.get("__name__", "")))
        frame = frame.f_back
    return "gunicorn.arbiter" in modules and not any(
        name.startswith("gunicorn.workers") for name in modules
    )


def _uwsgi_without_threads() -> bool:
    try:
        uwsgi = importlib.import_module("uwsgi")  # present only inside a uWSGI process
    except ImportError:
        return False
    options: dict[str, Any] = uwsgi.opt
    return not (options.get("enable-threads") or options.get("threads"))


def plan(testing: bool, explicit_workers: bool, threads: int, eager: bool) -> Plan:
    """Decide whether this process runs a pool now, in its forked children, or not at all."""
    if eager or threads == 0 or (testing and not explicit_workers):
        return "off"
    ctx = _cli_command()
    if ctx is not None:
        if ctx.command.name != "run":
            return "off"
        return "watcher" if _is_reloader_watcher(ctx) else "start"
    if _uwsgi_without_threads():
        logger.error(
            "uWSGI runs no Python threads without 'enable-threads = true': "
            "Flask-Offload's pool is off (with a forking master also set 'lazy-apps' "
            "or 'py-call-osafterfork')"
        )
        return "off"
    if _in_gunicorn_master():
        return "after-fork"
    return "start"


def manage(
    runtime: Runtime, how: Plan, pools: list[tuple[int, tuple[str, ...] | None]] | None = None
) -> None:
    """Start ``runtime``'s pools as planned and tie them to the process's fork and exit."""
    if how == "watcher":
        hold_interrupt(runtime.settings.shutdown_timeout + 5)
    if how in ("off", "watcher"):
        return
    _install_hooks()
    _managed.add(runtime)
    if how == "start":
        runtime.start(pools)
        if _cli_command() is not None:
            install_signal_handlers()


def stop_all() -> None:
    """Drain every pool of this process (each within its ``SHUTDOWN_TIMEOUT``)."""
    for runtime in list(_managed):
        runtime.stop()


def _after_fork_in_child() -> None:
    global _signals_installed
    if _about_to_exec():
        return
    _signals_installed = False
    for runtime in list(_managed):
        runtime.after_fork()


def _about_to_exec() -> bool:
    """True in the child of ``subprocess.Popen(preexec_fn=...)``, which runs Python between
    fork and exec: a pool started there would claim jobs and vanish with them."""
    frame: FrameType | None = sys._getframe()
    while frame is not None:
        if frame.f_code.co_name == "_execute_child" and frame.f_globals.get("__name__") == (
            "subprocess"
        ):
            return True
        frame = frame.f_back
    return False


def _install_hooks() -> None:
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(stop_all)
    os.register_at_fork(after_in_child=_after_fork_in_child)


def install_signal_handlers() -> None:
    """On SIGTERM/SIGINT drain the pools, then hand the signal to the handler that was there.

    Only from the main thread, and only in processes that are ours (``flask run``, ``flask
    offload worker``); where a server owns the signals, the pools drain at exit instead.
    """
    global _signals_installed
    if _signals_installed or threading.current_thread() is not threading.main_thread():
        return
    _signals_installed = True
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)

        def handler(signum: int, frame: FrameType | None, previous: Any = previous) -> None:
            stop_all()
            _chain(previous, signum, frame)

        signal.signal(signum, handler)


def hold_interrupt(grace: float) -> None:
    """In ``flask run``'s reloader watcher: Ctrl-C reaches the serving child too, which drains
    its pool, but Werkzeug's watcher would kill that child 0.25 s later. Hold the interrupt
    until the child has exited (the watcher then exits with it) or ``grace`` seconds have
    passed; a second Ctrl-C goes through at once. (SIGTERM to the watcher is Werkzeug's own:
    it stops the child at once, and its jobs come back when their lease expires.)"""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGINT)

    def held(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGALRM, lambda _, frame: _chain(previous, signal.SIGINT, frame))
        signal.setitimer(signal.ITIMER_REAL, grace)

    signal.signal(signal.SIGINT, held)


def _chain(previous: Any, signum: int, frame: FrameType | None) -> None:
    """Hand a signal to the handler that was installed before ours."""
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
