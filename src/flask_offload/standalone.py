"""``flask offload worker`` once its options are read: run the pools until a signal, or
supervise worker processes that each do (``--processes``, see ``supervisor``).

A supervised child is the same command run again with ``supervisor.CHILD_ENV`` set. It
counts the jobs it finishes through the app's own signals and, at ``--max-jobs-per-child`` or
``--max-memory-per-child``, drains (stops claiming, finishes what runs, puts back what has not
started) and exits with ``supervisor.RECYCLE`` so that its supervisor replaces it. It drains
as on SIGTERM when its supervisor dies.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
import time
from typing import Any, NoReturn

import click
from flask import Flask

from . import interrupts, lifecycle, signals
from .runtime import Runtime
from .supervisor import (
    RECYCLE,
    Recycling,
    Supervisor,
    child_number,
    resident_bytes,
    watch_supervisor,
)

logger = logging.getLogger("flask_offload")

# Seconds a supervisor gives its children past OFFLOAD_SHUTDOWN_TIMEOUT to drain and exit
# (their start, if a signal came during it, and their last outcomes' store) before it kills them.
DRAIN_MARGIN = 15.0
FINISHED = (signals.job_succeeded, signals.job_failed, signals.job_cancelled, signals.job_retrying)
RECYCLE_POLL = 0.1  # seconds between looks at a recycling child's running jobs
UNITS = {"": 2**20, "K": 2**10, "M": 2**20, "G": 2**30}  # of --max-memory-per-child
Pools = list[tuple[int, tuple[str, ...] | None]]


class MemorySize(click.ParamType):  # type: ignore[type-arg]
    """A size of memory: ``512M``, ``2G``, ``800000K``; MiB when no unit is given."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)(?:i?B)?\s*", str(value), re.I)
        if found is None or float(found[1]) <= 0:
            self.fail(f"{value!r} is not a size such as 512M or 2G", param, ctx)
        return int(float(found[1]) * UNITS[found[2].upper()])


def supervise(runtime: Runtime, processes: int) -> NoReturn:
    """Run ``processes`` worker processes under a supervisor until SIGTERM or SIGINT, then
    exit with its status. The supervisor itself holds no storage connection."""
    if os.name == "nt":
        raise click.UsageError("--processes needs POSIX signals (Linux, macOS, BSD)")
    if runtime.backend.location is None:
        raise click.UsageError(
            "--processes needs storage that processes share (a SQLite file or PostgreSQL), "
            "not memory://"
        )
    runtime.backend.close()  # each child opens its own connections
    grace = runtime.settings.shutdown_timeout + DRAIN_MARGIN
    status = Supervisor(_child_command(), processes, grace).run()
    raise click.exceptions.Exit(status)


def _child_command() -> list[str]:
    """The command line that started this process, run again by this interpreter: each child
    loads the app the way this process did (``flask --app``, ``python -m flask``, an app's own
    command-line script)."""
    argv = list(getattr(sys, "orig_argv", sys.argv))
    if not any(arg == "--processes" or arg.startswith("--processes=") for arg in argv[1:]):
        raise click.UsageError(
            "--processes starts each worker process with this command line again, so it works "
            "only from one: flask --app APP offload worker --processes N"
        )
    return [sys.executable, *argv[1:]]


def work(app: Flask, runtime: Runtime, pools: Pools, limits: tuple[int | None, ...] | None) -> None:
    """Run the pools until SIGTERM or Ctrl-C (see ``interrupts``); in a supervised child
    (``limits`` given), until the limits say to recycle it, or its supervisor dies."""
    done = threading.Event()

    def recycle(reason: str) -> None:
        def drain() -> None:
            logger.info(
                "worker process %s reached %s: finishing its running jobs, to be replaced",
                child_number(),
                reason,
            )
            # Nothing waits on a recycle, so it finishes the running jobs however long they
            # take (leases renewed, timeouts enforced), instead of putting back at
            # SHUTDOWN_TIMEOUT a job that this exit would then cut short, to be run again from
            # its start. A signal meanwhile drains as usual, within SHUTDOWN_TIMEOUT.
            for pool in runtime.pools:
                pool.begin_stop()  # claim no more; put back what has not started
            while not interrupts.interrupted() and any(p.running_jobs() for p in runtime.pools):
                time.sleep(RECYCLE_POLL)
            lifecycle.stop_all()
            done.set()

        threading.Thread(target=drain, name="offload-recycle").start()

    if limits is not None:
        max_jobs, max_bytes = limits
        if max_jobs is not None or max_bytes is not None:
            counter = Recycling(max_jobs, max_bytes, recycle)

            def finished(sender: Flask, **extra: object) -> None:
                counter.job_finished()

            for signal_ in FINISHED:
                signal_.connect(finished, sender=app, weak=False)
            size = resident_bytes()
            if max_bytes is not None and size is not None and size > max_bytes:
                logger.warning(
                    "--max-memory-per-child (%.0f MiB) is below this worker process's size "
                    "at start (%.0f MiB): it will be replaced after every job",
                    max_bytes / 2**20,
                    size / 2**20,
                )
        watch_supervisor(_orphaned)
        interrupts.watched_by_parent()  # a repeated SIGTERM is the service manager's copy
    lifecycle.manage(runtime, "start", pools)
    try:
        while not done.wait(3600):
            pass
    except KeyboardInterrupt:
        lifecycle.stop_all()
        return
    raise click.exceptions.Exit(RECYCLE)


def _orphaned() -> None:
    """The supervisor is gone: drain as on SIGTERM (unless a signal started a drain already)."""
    if interrupts.interrupted():
        return
    logger.warning("the supervisor of this worker process is gone: draining and exiting")
    os.kill(os.getpid(), signal.SIGTERM)
