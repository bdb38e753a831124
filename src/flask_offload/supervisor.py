"""Worker processes under one supervisor: ``flask offload worker --processes N``.

CPU-bound tasks hold the GIL, so more threads in one process do not make them faster and they
slow everything else that process does. The answer, as in Celery's prefork pool, is processes:
one supervisor and N children, each an ordinary ``flask offload worker`` with its own pool.

**How a child starts: spawned, never forked.** A child is the command line that started the
supervisor, run again by the same interpreter with ``CHILD_ENV`` set: a fresh process that
imports the app and builds it through its factory like any other worker, opens its own storage
connections, binds its own doorbell socket (SQLite) or listens on its own connection
(PostgreSQL). Forking the supervisor instead would be faster but cannot promise a clean child:
by the time the command runs, the app's factory has run, and it (or any extension) may have
started threads or opened connections that a fork would copy half-held. A start costs one
import of the app (a fraction of a second), paid only at start, restart and recycle.

**The supervisor** runs no pool and holds no storage connection; it only starts, watches and
stops its children, sleeping in ``select`` until a signal or a child's exit wakes it (an idle
supervisor costs no CPU). It keeps N children alive:

- a child that dies (a crash, ``kill -9``, the OOM killer) is replaced; its jobs run again
  once their lease runs out, like any dead worker's. One that dies within ``STABLE`` seconds
  of its start is replaced after a backoff that doubles with each such exit in a row, from
  ``BACKOFF`` to ``MAX_BACKOFF`` seconds, so a child that cannot start is not restarted in a
  tight loop; every exit and restart is logged;
- a child that reached ``--max-jobs-per-child`` or ``--max-memory-per-child`` drains itself
  (stops claiming, finishes its running jobs, puts back the unstarted ones) and exits with
  ``RECYCLE``: it is replaced at once, unless ``QUICK_RECYCLES`` or more recycles in a row
  each came within ``STABLE`` seconds of a start (a ``--max-memory-per-child`` below the
  child's size at start recycles it after every job, each job then costing an import of the
  app): the replacement then waits as a crashed child's does, and the log says why.

**Signals.** Children run in their own session, so a Ctrl-C in a terminal reaches only the
supervisor, which passes each signal on exactly once. The first SIGTERM or SIGINT stops
restarts and sends SIGTERM to every child, which drains as a single worker does (within
``OFFLOAD_SHUTDOWN_TIMEOUT``); the supervisor exits 0 once all have exited (a child still
there ``grace`` seconds later is killed, and the exit status is then 1). A second SIGTERM or
SIGINT during that drain stops at once: the supervisor says so, kills its children (their
running jobs are left to their lease; the unstarted ones were put back by the first), and hands
the signal on (it ends by that signal, as a single worker does). It kills them rather than
signalling again because a child ignores a repeated SIGTERM or SIGINT while it drains: systemd
(``KillMode=control-group``) and Heroku send SIGTERM to every process of a service at once, so
a child gets the service manager's copy and its supervisor's, which are one request to drain.

**A child outlives no supervisor.** Each child holds the read end of a pipe whose only write
end is the supervisor's; when the supervisor dies, even by ``kill -9``, the child reads the
end of the pipe and drains as on SIGTERM (``watch_supervisor``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .interrupts import end_by, say

logger = logging.getLogger("flask_offload")

# "<number> <fd>" in a supervised child (not FLASK_OFFLOAD_*, which are settings)
CHILD_ENV = "FLASKOFFLOAD_CHILD"
RECYCLE = 75  # a child's exit status for "replace me" (EX_TEMPFAIL)
STABLE = 10.0  # a child that ran this long was not failing at start: no backoff
BACKOFF = 1.0  # the first restart delay of a child failing at start; doubles per exit in a row
MAX_BACKOFF = 60.0
QUICK_RECYCLES = 3  # quick recycles in a row from which a replacement waits as after crashes
STOP_NOW = "stopping now: worker processes leave their running jobs to their lease"


@dataclass
class Child:
    """One of the supervisor's N places, and the process now in it (if any)."""

    number: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    quick_exits: int = 0  # exits within STABLE seconds of a start, in a row
    quick_recycles: int = 0  # recycles within STABLE seconds of a start, in a row
    restart_at: float | None = None  # when a dead child's replacement starts


class Supervisor:
    """Keep ``processes`` children of ``command`` running until a signal stops them."""

    def __init__(self, command: Sequence[str], processes: int, grace: float) -> None:
        self.command = list(command)
        self.children = [Child(number) for number in range(1, processes + 1)]
        self.grace = grace  # how long a drain may take before children are killed
        self._signals: list[int] = []  # received, not yet acted on (appended by the handler)
        self._lifeline_read, self._lifeline = os.pipe()  # the write end stays here only
        self._wake_read, self._wake_write = os.pipe()
        for fd in (self._wake_read, self._wake_write):
            os.set_blocking(fd, False)

    def run(self) -> int:
        """Start the children, keep them running, and drain them on SIGTERM or SIGINT.
        Returns the exit status (0 after a complete drain); after a second signal it does
        not return but ends by that signal."""
        previous = self._install()
        try:
            logger.info(
                "supervisor (pid %d) starting %d worker processes", os.getpid(), len(self.children)
            )
            for child in self.children:
                self._start(child)
            while not self._signals:
                self._reap()
                self._restart_due()
                self._sleep(self._next_restart())
            return self._stop()
        finally:
            self._restore(previous)
            for child in self.children:  # only after a failure of the supervisor itself
                if child.proc is not None and child.proc.poll() is None:
                    child.proc.kill()
                    child.proc.wait()
            for fd in (self._lifeline_read, self._lifeline, self._wake_read, self._wake_write):
                with contextlib.suppress(OSError):
                    os.close(fd)

    # -- children --------------------------------------------------------------------------------

    def _start(self, child: Child) -> None:
        """Start the process of ``child``'s place, handing it the read end of the lifeline."""
        env = dict(os.environ)
        env[CHILD_ENV] = f"{child.number} {self._lifeline_read}"
        child.started, child.restart_at = time.monotonic(), None
        try:
            child.proc = subprocess.Popen(
                self.command, env=env, pass_fds=(self._lifeline_read,), start_new_session=True
            )
        except OSError as error:  # out of processes or memory: try again later
            child.quick_exits += 1
            delay = restart_delay(child.quick_exits)
            child.restart_at = child.started + delay
            logger.error(
                "could not start worker process %d (%s): trying again in %g s",
                child.number,
                error,
                delay,
            )
            return
        logger.info("worker process %d started (pid %d)", child.number, child.proc.pid)

    def _reap(self) -> None:
        """Note every child that has exited, and when its replacement starts."""
        now = time.monotonic()
        for child in self.children:
            if child.proc is None or child.proc.poll() is None:
                continue
            proc, child.proc = child.proc, None
            ran = now - child.started
            if proc.returncode == RECYCLE:
                self._recycled(child, proc.pid, ran, now)
                continue
            child.quick_exits = child.quick_exits + 1 if ran < STABLE else 0
            child.quick_recycles = 0
            delay = restart_delay(child.quick_exits)
            child.restart_at = now + delay
            in_a_row = (
                f" ({child.quick_exits} quick exit{'s' * (child.quick_exits > 1)} in a row)"
                if child.quick_exits
                else ""
            )
            logger.warning(
                "worker process %d (pid %d) %s after %.1f s: restarting it in %g s%s",
                child.number,
                proc.pid,
                how_it_ended(proc.returncode),
                ran,
                delay,
                in_a_row,
            )

    def _recycled(self, child: Child, pid: int, ran: float, now: float) -> None:
        """A child recycled itself: replace it at once, or after a backoff once quick
        recycles come in a row (see the module doc)."""
        child.quick_exits = 0
        child.quick_recycles = child.quick_recycles + 1 if ran < STABLE else 0
        delay = restart_delay(child.quick_recycles - QUICK_RECYCLES + 1)
        child.restart_at = now + delay
        if not delay:
            logger.info(
                "worker process %d (pid %d) recycled after %.1f s: starting another",
                child.number,
                pid,
                ran,
            )
            return
        logger.warning(
            "worker process %d (pid %d) recycled after %.1f s (%d quick recycles in a row: "
            "is --max-memory-per-child below its size at start, or --max-jobs-per-child too "
            "low?): starting another in %g s",
            child.number,
            pid,
            ran,
            child.quick_recycles,
            delay,
        )

    def _restart_due(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.proc is None and child.restart_at is not None and child.restart_at <= now:
                self._start(child)

    def _next_restart(self) -> float | None:
        """Seconds until the next replacement is due, or None when none is waiting."""
        times = [c.restart_at for c in self.children if c.proc is None and c.restart_at]
        return max(0.0, min(times) - time.monotonic()) if times else None

    def _alive(self) -> list[Child]:
        return [c for c in self.children if c.proc is not None and c.proc.poll() is None]

    def _send(self, signum: int) -> None:
        for child in self._alive():
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signum)  # type: ignore[union-attr]

    # -- stopping --------------------------------------------------------------------------------

    def _stop(self) -> int:
        """Drain every child; a second signal stops them at once (see the module doc)."""
        first = self._signals.pop(0)
        again = "Ctrl-C" if first == signal.SIGINT else signal.Signals(first).name
        alive = self._alive()
        logger.info(
            "stopping %d worker process%s: each finishes its running jobs (up to %g s); "
            "%s again to stop now",
            len(alive),
            "es" * (len(alive) != 1),
            self.grace,
            again,
        )
        self._send(signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        second: int | None = None
        while self._alive():
            if self._signals:  # a second signal: no child may wait for its jobs any more
                second = self._signals.pop(0)
                say(STOP_NOW)
                break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._sleep(min(left, 1.0))
        killed = self._alive()
        for child in killed:
            if second is None:
                logger.warning(
                    "worker process %d (pid %d) did not stop in time: killed",
                    child.number,
                    child.proc.pid,  # type: ignore[union-attr]
                )
            child.proc.kill()  # type: ignore[union-attr]
            child.proc.wait()  # type: ignore[union-attr]
        logger.info("supervisor (pid %d) stopped", os.getpid())
        if second is not None:
            end_by(second)
            time.sleep(1.0)  # the signal is delivered before this returns
            sys.exit(128 + second)
        return 1 if killed else 0

    # -- waiting and signals ---------------------------------------------------------------------

    def _sleep(self, timeout: float | None) -> None:
        """Wait for a signal (SIGCHLD included), or ``timeout`` seconds."""
        with contextlib.suppress(InterruptedError):
            select.select([self._wake_read], [], [], timeout)
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_read, 512):
                pass

    def _install(self) -> dict[int, object]:
        """Handlers that only note the signal; the loop acts on it (never in a handler)."""

        def note(signum: int, frame: object) -> None:
            self._signals.append(signum)

        previous: dict[int, object] = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, note)
        previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, lambda *_: None)
        previous[-1] = signal.set_wakeup_fd(self._wake_write, warn_on_full_buffer=False)
        return previous

    def _restore(self, previous: dict[int, object]) -> None:
        signal.set_wakeup_fd(previous.pop(-1))  # type: ignore[arg-type]
        for signum, handler in previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]


def restart_delay(quick_exits: int) -> float:
    """Seconds before a child is started again after ``quick_exits`` quick exits in a row:
    none after a child that ran a while (``quick_exits`` <= 0), then 1, 2, 4 … up to
    ``MAX_BACKOFF``."""
    return min(MAX_BACKOFF, BACKOFF * 2 ** (quick_exits - 1)) if quick_exits > 0 else 0.0


def how_it_ended(returncode: int) -> str:
    """``exited with status 3`` or ``was killed by SIGKILL``."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with status {returncode}"


# -- in a child ------------------------------------------------------------------------------------


def _child_env() -> tuple[int, int] | None:
    """``CHILD_ENV`` read: this process's place and the fd of its lifeline, or None when it
    is not a supervised child."""
    value = os.environ.get(CHILD_ENV, "").split()
    if len(value) != 2 or not all(part.isdigit() for part in value):
        return None
    return int(value[0]), int(value[1])


def child_number() -> int | None:
    """This process's place under a supervisor, or None when it is not a supervised child."""
    found = _child_env()
    return None if found is None else found[0]


def watch_supervisor(orphaned: Callable[[], None]) -> None:
    """Call ``orphaned`` (in a thread of its own) once the supervisor has died: the read end
    of its lifeline then reads as closed."""
    found = _child_env()
    if found is None:
        return
    fd = found[1]

    def watch() -> None:
        try:
            while os.read(fd, 512):
                pass
        except OSError:  # not our pipe after all (a stale variable): no watch
            return
        orphaned()

    threading.Thread(target=watch, name="offload-supervisor-watch", daemon=True).start()


def resident_bytes() -> int | None:
    """This process's resident memory: the current figure from ``/proc`` on Linux; elsewhere
    the peak (``ru_maxrss``), which only grows; None where neither can be read."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


class Recycling:
    """A child's limits: after ``max_jobs`` finished jobs, or once its resident memory passes
    ``max_bytes`` after a job, call ``recycle`` once (with the reason). Checked as each job
    finishes, as Celery's prefork does: a child is never stopped in the middle of a job."""

    def __init__(
        self, max_jobs: int | None, max_bytes: int | None, recycle: Callable[[str], None]
    ) -> None:
        self.max_jobs = max_jobs
        self.max_bytes = max_bytes
        self.recycle = recycle
        self.finished = 0
        self._lock = threading.Lock()  # outcomes are stored from more than one thread
        self._done = False

    def job_finished(self) -> None:
        with self._lock:
            self.finished += 1
            if self._done:
                return
            reason = None
            if self.max_jobs is not None and self.finished >= self.max_jobs:
                reason = f"--max-jobs-per-child ({self.finished} jobs)"
            elif self.max_bytes is not None:
                rss = resident_bytes()
                if rss is not None and rss > self.max_bytes:
                    reason = f"--max-memory-per-child ({rss / 2**20:.0f} MiB resident)"
            self._done = reason is not None
        if reason is not None:
            self.recycle(reason)
