"""Where a pool may run, and how it starts, forks and stops with the process.

The recipes in the field start their thread at import and so run it twice under the reloader,
lose it in gunicorn's forked workers, fork it with its locks held under uWSGI, and kill its
work on SIGTERM. Here one pool runs per serving process: the ``flask run`` or ``app.run()``
server (never the reloader's watcher), each gunicorn and uWSGI worker (never a master), waitress,
a plain script and ``flask offload worker``; none in CLI commands such as ``flask shell``, nor
in children the app's own code forks. It starts once the code that called ``init_app`` has
returned (see ``launch``), drains on SIGTERM/SIGINT (see ``interrupts``) or at interpreter exit,
and, under the reloader, a restart puts its running jobs back at once instead of holding the
edit loop (they run again in the new child: at least once).
"""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import sys
import threading
import time
import weakref
from types import FrameType
from typing import Literal

from flask import Flask, request_started

from . import interrupts, servers
from .launch import Launcher, from_script
from .runtime import Runtime
from .servers import Role

logger = logging.getLogger("flask_offload")

# start: now (``flask offload worker``); launch: once the setup code has returned;
# reloader-child: launch, in the reloader's serving child; after-fork: in each worker a server
# forks from this process; watcher: none, but forward signals to the serving child.
Plan = Literal["start", "launch", "reloader-child", "after-fork", "watcher", "off"]
Pools = list[tuple[int, tuple[str, ...] | None]]

# Runtimes of this process that want a pool, so fork and exit hooks can find them.
_managed: weakref.WeakSet[Runtime] = weakref.WeakSet()
# The runtime running the pool for each (storage, task registry, queues) in this process.
_by_storage: weakref.WeakValueDictionary[tuple[object, ...], Runtime] = (
    weakref.WeakValueDictionary()
)
_launcher = Launcher()
_draining = threading.Lock()  # held by the drain under way; a second stop_all waits for it
_hooks_installed = False
_uwsgi_hooked = False
_under_reloader = False
_watching_for_reloader = False

# How long after init_app a process may still turn out to run Werkzeug's reloader (a script
# that sets up more, then calls ``run_with_reloader`` itself), and how often it is looked at:
# often under ``flask run --debug``, whose reloader starts at once, and less often in a plain
# script, which may never start one: each look wakes a thread, and at 50 a second for the
# watch's 30 s they cost an idle process 0.7 % of a core (bench: idle).
RELOADER_WATCH = 30.0
RELOADER_TICK = 0.02
SCRIPT_TICK = 0.1


def plan(testing: bool, explicit_workers: bool, threads: int, eager: bool) -> Plan:
    """Decide whether this process runs a pool, in its forked workers, or not at all."""
    if eager or threads == 0 or (testing and not explicit_workers):
        return "off"
    if servers.reimported_by_multiprocessing():
        return "off"
    ctx = servers.cli_command()
    if ctx is not None:
        if ctx.command.name != "run":
            return "off"
        role = servers.cli_reloader_role(ctx)
        if role == "serving":
            return "launch"
        return "watcher" if role == "watcher" else "reloader-child"
    uwsgi = servers.uwsgi()
    if uwsgi is not None:
        if not servers.uwsgi_threads_enabled(uwsgi):
            logger.error(
                "uWSGI runs no Python threads without 'enable-threads = true' (or 'threads'): "
                "Flask-Offload's pool is off in this process"
            )
            return "off"
        return "after-fork" if servers.uwsgi_before_fork(uwsgi) else "launch"
    if servers.in_gunicorn_master():
        return "after-fork"
    return "launch"


def manage(
    runtime: Runtime, how: Plan, pools: Pools | None = None, app: Flask | None = None
) -> None:
    """Run ``runtime``'s pools as planned and tie them to the process's fork and exit."""
    caller = servers.setup_caller(sys._getframe(1))
    if how in ("start", "launch", "reloader-child", "watcher"):
        interrupts.install(stop_all, in_flight, runtime.settings.shutdown_timeout + 5)
    if how in ("reloader-child", "watcher"):
        _watch_for_reloader(RELOADER_TICK)
    elif how == "launch" and caller is not None and from_script(caller):
        _watch_for_reloader(SCRIPT_TICK)
    if how in ("off", "watcher") or not _first_on_storage(runtime, app):
        return
    _install_hooks()
    _managed.add(runtime)
    if how == "start":
        runtime.start(pools)
    elif how in ("launch", "reloader-child"):
        if how == "reloader-child":
            _serve_under_reloader()
        if caller is None:
            runtime.start(pools)
        else:
            _launch_later(runtime, pools, app, caller)
    elif servers.uwsgi() is not None:
        _hook_uwsgi_fork()


def _launch_later(
    runtime: Runtime, pools: Pools | None, app: Flask | None, caller: FrameType
) -> None:
    """Start the pools once ``caller`` has returned (see ``launch``), or when ``app`` begins
    its first request, whichever comes first: by then its setup is over."""
    app_ref = weakref.ref(app) if app is not None else None

    def on_request(sender: Flask, **extra: object) -> None:
        now()

    def launched(role: Role | None) -> None:
        owner = app_ref() if app_ref is not None else None
        if owner is not None:
            request_started.disconnect(on_request, sender=owner)
        if role == "reloader-child":
            _serve_under_reloader()
        runtime.start(pools)

    now = _launcher.add(launched, caller, app)
    if app is not None:
        request_started.connect(on_request, sender=app, weak=False)


def _watch_for_reloader(tick: float) -> None:
    """Until Werkzeug's reloader starts in this process (or ``RELOADER_WATCH`` has passed),
    whoever starts it, looking every ``tick`` seconds: then take SIGTERM back from it (see
    ``interrupts``), and in its watcher stop any pool started already. The watcher only
    restarts the server: no job runs there."""
    global _watching_for_reloader
    if _watching_for_reloader:
        return
    _watching_for_reloader = True

    def watch() -> None:
        until = time.monotonic() + RELOADER_WATCH
        while (role := servers.reloader_started()) is None:
            if time.monotonic() > until:
                return
            time.sleep(tick)
        if role == "watcher":
            _stop_in_watcher()
        else:
            _serve_under_reloader()
        interrupts.reclaim_sigterm()

    threading.Thread(target=watch, name="offload-reloader-watch", daemon=True).start()


def _stop_in_watcher() -> None:
    """This process turned out to be a reloader's watcher after its pools started (or were
    about to): stop them now, putting their jobs back for the serving child."""
    started = [runtime for runtime in list(_managed) if runtime.started]
    for runtime in list(_managed):
        runtime.stop(0.0)
    if started:
        logger.warning(
            "this process is Werkzeug's reloader watcher, which only restarts the server: "
            "its worker pool stops, and the serving child runs the jobs"
        )


def _serve_under_reloader() -> None:
    global _under_reloader
    _under_reloader = True
    interrupts.watched_by_parent()


def _first_on_storage(runtime: Runtime, app: Flask | None) -> bool:
    """One pool per storage, task registry and queues in a process: a second app built by the
    same factory (a task module calling ``create_app()`` itself) would only double the threads
    and the heartbeat rows. Say so, since it is rarely what the developer meant."""
    location = runtime.backend.location
    if location is None:
        return True
    key = (location, id(runtime.tasks), runtime.settings.queues)
    first = _by_storage.get(key)
    if first is None or first.stopped:
        _by_storage[key] = runtime
        return True
    logger.warning(
        "app %r uses the same storage (%s) and tasks as another app of this process, which "
        "runs the worker pool for both: no second pool (is create_app() called twice?)",
        app.name if app is not None else "?",
        location,
    )
    return False


def stop_all(timeout: float | None = None) -> None:
    """Drain every pool of this process (each within its ``SHUTDOWN_TIMEOUT``, or ``timeout``);
    nothing once a second signal has said to stop now, leaving running jobs to their lease.
    A call during another's drain (SIGTERM while a worker process recycles itself) waits for
    that drain instead of returning at once, which would end the process under its jobs."""
    if interrupts.abandoned():
        return
    with _draining:
        for runtime in list(_managed):
            runtime.stop(timeout)


def in_flight() -> tuple[int, float]:
    """How many jobs this process's pools are running, and how long a drain waits for them."""
    runtimes = [runtime for runtime in list(_managed) if runtime.started]
    running = sum(pool.running_jobs() for runtime in runtimes for pool in runtime.pools)
    timeout = max((runtime.settings.shutdown_timeout for runtime in runtimes), default=0.0)
    return running, timeout


def _at_exit() -> None:
    """Drain at interpreter exit. Under the reloader an exit that no signal asked for is a
    restart after an edit: put running jobs back at once rather than hold the edit loop. A
    drain that a signal started is waited for (see ``interrupts.settle``)."""
    interrupts.settle()
    stop_all(0.0 if _under_reloader and not interrupts.interrupted() else None)


def _after_fork_in_child() -> None:
    """In every forked child: the parent's pools, connections and claimed jobs are not the
    child's. Only a gunicorn worker starts its pools here (uWSGI's start in its own post-fork
    hook); a child the app forks (``multiprocessing``, ``os.fork``) runs none."""
    global _under_reloader, _draining
    if servers.about_to_exec():
        return
    try:
        caller: FrameType | None = sys._getframe(1)
    except ValueError:  # called from C with no Python frame (uWSGI's py-call-osafterfork)
        caller = None
    serving = servers.forked_by_gunicorn(caller)
    _launcher.forget()
    interrupts.after_fork()
    _under_reloader, _draining = False, threading.Lock()
    for runtime in list(_managed):
        runtime.after_fork()
        if serving:
            runtime.start()


def _uwsgi_post_fork() -> None:
    """uWSGI's post-fork hook: start the pools in each worker (not in mules or spoolers)."""
    uwsgi = servers.uwsgi()
    if uwsgi is None or uwsgi.worker_id() == 0:
        return
    _launcher.forget()
    for runtime in list(_managed):
        runtime.after_fork()
        runtime.start()


def _hook_uwsgi_fork() -> None:
    """Run ``_uwsgi_post_fork`` after uWSGI forks each worker. With a master, through
    ``uwsgidecorators.postfork``, so the app's own ``@postfork`` functions keep running (and
    importing uwsgidecorators later does not drop ours); without one, by chaining
    ``uwsgi.post_fork_hook``."""
    global _uwsgi_hooked
    uwsgi = servers.uwsgi()
    if _uwsgi_hooked or uwsgi is None:
        return
    _uwsgi_hooked = True
    if uwsgi.masterpid() != 0:
        try:
            importlib.import_module("uwsgidecorators").postfork(_uwsgi_post_fork)
            return
        except Exception:  # uwsgidecorators missing or broken: chain the hook ourselves
            logger.debug("uwsgidecorators unavailable; chaining uwsgi.post_fork_hook")
    previous = getattr(uwsgi, "post_fork_hook", None)

    def hook() -> None:
        if callable(previous):
            previous()
        _uwsgi_post_fork()

    setattr(uwsgi, "post_fork_hook", hook)  # noqa: B010 - a module only uWSGI provides


def _install_hooks() -> None:
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(_at_exit)
    os.register_at_fork(after_in_child=_after_fork_in_child)
