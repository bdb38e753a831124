"""Which server or command is running this process, and which of its processes this is.

Every check is precise rather than a guess from one environment variable (DESIGN: gating on
``WERKZEUG_RUN_MAIN`` alone turns the pool off under gunicorn or leaves jobs pending): the Flask
CLI is asked through click, Werkzeug's reloader and gunicorn's arbiter are recognised by their
frames on the stack, and uWSGI by its own module, which exists only inside a uWSGI process.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from types import FrameType, ModuleType
from typing import Literal

import click
from flask.cli import ScriptInfo
from flask.helpers import get_debug_flag

Role = Literal["watcher", "reloader-child", "serving"]


def frames(top: FrameType | None) -> Iterator[FrameType]:
    """``top`` and every frame below it, innermost first."""
    while top is not None:
        yield top
        top = top.f_back


def module_of(frame: FrameType) -> str:
    return str(frame.f_globals.get("__name__", ""))


def cli_command() -> click.Context | None:
    """The click context of the running ``flask`` command, or None outside the Flask CLI."""
    ctx = click.get_current_context(silent=True)
    if ctx is None or ctx.find_object(ScriptInfo) is None:
        return None
    return ctx


def cli_reloader_role(ctx: click.Context) -> Role:
    """For ``flask run``: the reloader's watcher, its serving child, or a server without one."""
    reload = ctx.params.get("reload")
    if reload is None:
        reload = get_debug_flag()
    if not reload:
        return "serving"
    return "reloader-child" if os.environ.get("WERKZEUG_RUN_MAIN") == "true" else "watcher"


def werkzeug_role(top: FrameType | None) -> Role | None:
    """Where a thread running ``app.run()`` is: in the reloader's watcher (which only restarts
    the server and never loads new code), in the reloader's serving child, or serving without a
    reloader; None while it has not reached Werkzeug's server."""
    for frame in frames(top):
        where = (module_of(frame), frame.f_code.co_name)
        if where == ("werkzeug._reloader", "run_with_reloader"):
            run_main = os.environ.get("WERKZEUG_RUN_MAIN") == "true"
            return "reloader-child" if run_main else "watcher"
        if where == ("werkzeug.serving", "run_simple"):
            # With the reloader, run_simple goes on to run_with_reloader: not there yet.
            return None if frame.f_locals.get("use_reloader") else "serving"
        if where[0].startswith("waitress."):
            return "serving"  # waitress.serve(app), called by the script itself
    return None


def werkzeug_reloader_handler(handler: object) -> bool:
    """True for the SIGTERM handler that Werkzeug's ``run_with_reloader`` installs first
    thing, in its watcher and in its serving child alike, whoever called it (``flask run``,
    ``app.run``, Flask-SocketIO's ``socketio.run``, a script)."""
    return getattr(handler, "__module__", None) == "werkzeug._reloader"


def reloader_started() -> Role | None:
    """Once Werkzeug's reloader runs in this process, which of its processes this is: the
    serving child has ``WERKZEUG_RUN_MAIN``, the watcher has not. None before that."""
    if not werkzeug_reloader_handler(signal.getsignal(signal.SIGTERM)):
        return None
    return "reloader-child" if os.environ.get("WERKZEUG_RUN_MAIN") == "true" else "watcher"


def reloader_child_process(top: FrameType | None) -> subprocess.Popen[bytes] | None:
    """In Werkzeug's reloader watcher, waiting on its serving child: that child process."""
    stack = list(frames(top))
    if not any(
        module_of(frame) == "werkzeug._reloader" and frame.f_code.co_name == "restart_with_reloader"
        for frame in stack
    ):
        return None
    for frame in stack:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, subprocess.Popen):
            return candidate
    return None


def in_gunicorn_master() -> bool:
    """True while gunicorn's arbiter loads the app itself (``--preload``), before it forks.

    A forked worker still has the arbiter's frames below its own, so the worker's frames are
    what tell the two apart.
    """
    if "gunicorn.arbiter" not in sys.modules:
        return False
    modules = {module_of(frame) for frame in frames(sys._getframe())}
    return "gunicorn.arbiter" in modules and not any(
        name.startswith("gunicorn.workers") for name in modules
    )


def forked_by_gunicorn(caller: FrameType | None) -> bool:
    """True in a child forked by gunicorn's arbiter to be a worker: ``caller`` (the frame that
    called ``os.fork``) is the arbiter's ``spawn_worker``. A child that code inside a worker
    forks has that frame further down, not as the caller."""
    return (
        caller is not None
        and module_of(caller) == "gunicorn.arbiter"
        and caller.f_code.co_name == "spawn_worker"
    )


def uwsgi() -> ModuleType | None:
    """uWSGI's embedded module, present only inside a uWSGI process."""
    try:
        return importlib.import_module("uwsgi")
    except ImportError:
        return None


def uwsgi_threads_enabled(module: ModuleType) -> bool:
    options = module.opt
    return bool(options.get("enable-threads") or options.get("threads"))


def uwsgi_before_fork(module: ModuleType) -> bool:
    """True while uWSGI loads the app before forking its workers (no ``lazy-apps``): in the
    master, or in the first process when there is no master."""
    return bool(module.worker_id() == 0 and module.mule_id() == 0)


def reimported_by_multiprocessing() -> bool:
    """True while a ``multiprocessing`` child started by spawn or forkserver re-imports the
    parent's script (as ``__mp_main__``) to find its target: a child of the app, not a server."""
    return any(module_of(frame) == "__mp_main__" for frame in frames(sys._getframe()))


def setup_caller(frame: FrameType | None) -> FrameType | None:
    """The first frame below ``frame`` outside Flask-Offload: the code that called init_app."""
    for candidate in frames(frame):
        if not module_of(candidate).startswith("flask_offload"):
            return candidate
    return None


def about_to_exec() -> bool:
    """True in the child of ``subprocess.Popen(preexec_fn=...)``, which runs Python between
    fork and exec: nothing there may allocate or lock what the parent's threads held."""
    for frame in frames(sys._getframe()):
        if frame.f_code.co_name == "_execute_child" and module_of(frame) == "subprocess":
            return True
    return False
