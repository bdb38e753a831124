"""``flask offload …``: a standalone worker, and commands to look at and steer jobs."""

from __future__ import annotations

import difflib
import json
import os
import sys
import time
from collections.abc import Iterable
from contextlib import suppress
from datetime import datetime
from typing import Any

import click
from flask import Flask, current_app
from flask.cli import AppGroup

from . import logs, standalone, supervisor
from .backends import describe, mask_password
from .job import STATES, Job, state_words
from .liveness import live_processes
from .runtime import Runtime
from .standalone import MemorySize

WORKER_CONNECTIONS = 1  # pooled connections of a worker process, its listener's aside


class OffloadGroup(AppGroup):
    """``flask offload``: storage that cannot be reached or used is one line, not a traceback;
    a reader that stops early (``flask offload jobs | head``) ends the command quietly."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            # What the reader wanted is out; the rest has nowhere to go. Point stdout at
            # /dev/null so the interpreter's last flush cannot fail again, and exit 0.
            with suppress(OSError, ValueError):  # no file descriptor (a test runner's stdout)
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(0)
        except click.exceptions.Exit:  # an exit status (a worker's), a RuntimeError too
            raise
        except (OSError, RuntimeError) as error:  # unreachable, unusable or damaged storage
            raise click.ClickException(str(error)) from error


offload_cli = OffloadGroup("offload", help="Run workers and inspect Flask-Offload jobs.")


def _extension() -> tuple[Any, Flask]:
    """The current app's Offload, and the app itself."""
    extension = current_app.extensions.get("offload")
    if extension is None:
        raise click.ClickException("Flask-Offload is not initialised on this app")
    return extension, current_app._get_current_object()  # type: ignore[attr-defined]


def _runtime() -> Runtime:
    extension, app = _extension()
    runtime: Runtime = extension.runtime(app)
    return runtime


def _job(job_id: str) -> Job:
    job = _runtime().get(job_id)
    if job is None:
        raise click.ClickException(f"no job {job_id!r} (unknown, malformed or expired)")
    return job


def local_time(epoch: float | None, timespec: str = "auto") -> str | None:
    """``epoch`` as ISO 8601 in this machine's time zone, with its offset."""
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch).astimezone().isoformat(timespec=timespec)


def zone_name() -> str:
    """The name of this machine's time zone now (``CET``, ``UTC``): what ``local_time`` is in."""
    return datetime.now().astimezone().tzname() or "local time"


def known_queues(runtime: Runtime) -> set[str]:
    """The queues this app's tasks use, and those holding a queued or running job."""
    stored = {info.name for info in runtime.backend.queue_stats() if info.queued or info.running}
    return stored | {task.queue for task in runtime.tasks.values()}


def warn_unknown_queues(runtime: Runtime, names: Iterable[str], doing: str) -> None:
    """Say so of a queue no task of this app uses and no job is in (a typo, most likely);
    the caller goes on, since tasks may be registered by another app on the same storage."""
    known = known_queues(runtime)
    for name in names:
        if name not in known:
            listed = ", ".join(sorted(known)) or "none"
            click.echo(
                f"warning: no task of this app uses queue {name!r} and no job is in it "
                f"(known queues: {listed}); {doing} it anyway",
                err=True,
            )


def parse_pools(
    threads: int, queues: str | None, per_queue: str | None
) -> list[tuple[int, tuple[str, ...] | None]]:
    """The pools a worker runs: ``--concurrency-per-queue emails=2,default=4`` gives one pool
    per queue; otherwise one pool of ``threads`` over ``--queues`` (or every queue)."""
    if per_queue:
        if queues:
            raise click.UsageError("give --queues or --concurrency-per-queue, not both")
        pools: list[tuple[int, tuple[str, ...] | None]] = []
        for part in per_queue.split(","):
            name, _, count = part.strip().partition("=")
            if not name or not count.isdigit() or int(count) < 1:
                raise click.BadParameter(
                    f"{part!r} is not queue=threads (e.g. emails=2,default=4)",
                    param_hint="--concurrency-per-queue",
                )
            pools.append((int(count), (name,)))
        return pools
    names = tuple(q.strip() for q in queues.split(",") if q.strip()) if queues else None
    return [(threads, names)]


@offload_cli.command("worker")
@click.option("--threads", type=click.IntRange(min=1), default=4, show_default=True)
@click.option(
    "--queues", help="Comma-separated queues to consume (default: OFFLOAD_QUEUES, or all)."
)
@click.option("--concurrency-per-queue", "per_queue", help="Threads per queue: emails=2,default=4")
@click.option(
    "-q",
    "--quiet",
    is_flag=True,
    help="No line per job; starts, stops, warnings and failures still show.",
)
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    help="Run this many worker processes under a supervisor, each with its own pool "
    "(for CPU-bound tasks).",
)
@click.option(
    "--max-jobs-per-child",
    type=click.IntRange(min=1),
    help="Replace a worker process once it has finished this many jobs (with --processes).",
)
@click.option(
    "--max-memory-per-child",
    type=MemorySize(),
    help="Replace a worker process once its resident memory passes this after a job: "
    "512M, 2G (MiB when no unit; with --processes).",
)
def worker_command(
    threads: int,
    queues: str | None,
    per_queue: str | None,
    quiet: bool,
    processes: int | None,
    max_jobs_per_child: int | None,
    max_memory_per_child: int | None,
) -> None:
    """Run a standalone worker until SIGTERM or Ctrl-C: the first drains it gracefully, a
    second stops it at once, leaving running jobs to their lease. With --processes, a
    supervisor runs that many worker processes, restarts any that dies and drains them all."""
    pools = parse_pools(threads, queues, per_queue)
    logs.show_worker(each_job=not quiet)
    runtime = _runtime()
    if not queues and not per_queue:  # OFFLOAD_QUEUES, where the app sets it
        pools = [(threads, runtime.settings.queues)]
    child = supervisor.child_number()
    recycling = max_jobs_per_child is not None or max_memory_per_child is not None
    if child is None and recycling and processes is None:
        raise click.UsageError(
            "--max-jobs-per-child and --max-memory-per-child replace worker processes: "
            "give --processes too"
        )
    runtime.backend.prepare()  # storage that cannot be used is one error now, not a retry loop
    # The pools' claims, finishes and heartbeats take turns on one connection (each statement
    # is short, and one thread claims at a time anyway), so a fleet's size, not its threads,
    # sets what the database must accept.
    runtime.backend.limit_connections(WORKER_CONNECTIONS)
    if child is None:  # a supervised child's lines were said by its supervisor
        click.echo(f"storage: {describe(runtime.backend)}")
        say_pools(runtime, pools)
    if processes is not None and child is None:
        standalone.supervise(runtime, processes)
    limits = (max_jobs_per_child, max_memory_per_child) if child is not None else None
    standalone.work(_extension()[1], runtime, pools, limits)


def say_pools(runtime: Runtime, pools: list[tuple[int, tuple[str, ...] | None]]) -> None:
    """The worker's start lines: each pool's threads and the queues it serves."""
    for number, (threads, names) in enumerate(pools, 1):
        which = f"queue{'s' * (len(names) > 1)} {', '.join(names)}" if names else "every queue"
        label = f"pool {number}" if len(pools) > 1 else "pool"
        click.echo(f"{label}: {threads} thread{'s' * (threads != 1)} for {which}")
    warn_unknown_queues(runtime, [name for _, names in pools for name in names or ()], "consuming")


@offload_cli.command("jobs")
@click.option("--state", type=click.Choice(STATES))
@click.option("--task", help="Only jobs of this task name.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
def jobs_command(state: str | None, task: str | None, limit: int) -> None:
    """List the newest jobs."""
    runtime = _runtime()
    jobs = runtime.backend.list_jobs(state=state, task=task, limit=limit)
    if not jobs:
        if task is not None:
            _suggest_task(runtime, task)
        wanted = " ".join(f"{k} {v!r}" for k, v in (("state", state), ("task", task)) if v)
        click.echo(f"no jobs{' with ' + wanted if wanted else ''}")
        return
    created = f"created ({zone_name()})"
    click.echo(f"{'id':<32}  {'state':<9}  {created:<25}  {'attempts':>8}  task")
    for job in jobs:
        when = local_time(job.created_at, "seconds")
        click.echo(f"{job.id}  {job.state:<9}  {when:<25}  {job.attempts:>8}  {job.task}")


def _suggest_task(runtime: Runtime, name: str) -> None:
    """Fail with the name meant when ``name`` is no task registered here or stored, but one
    is close: the last part of a dotted name (``send_email``), or a typo."""
    known = sorted(set(runtime.tasks) | {task for task, _ in runtime.backend.counts()})
    if name in known:
        return
    tails = [task for task in known if task.endswith("." + name)]
    near = tails or difflib.get_close_matches(name, known, n=1)
    if near:
        raise click.ClickException(f"no task {name!r}; did you mean {near[0]!r}?")


LIMIT_KEYS = ("limit_key", "rate_key")  # shown for a job under limits


@offload_cli.command("show")
@click.argument("job_id")
def show_command(job_id: str) -> None:
    """Print one job as JSON, its times in ISO 8601 in this machine's time zone."""
    job = _job(job_id)
    times = ("created_at", "run_at", "started_at", "finished_at")
    fields: dict[str, Any] = {
        name: getattr(job, name)
        for name in (
            "id",
            "task",
            "queue",
            "priority",
            "state",
            "attempts",
            "max_attempts",
            "key",
            "created_at",
            "run_at",
            "started_at",
            "finished_at",
            "worker",
            "error",
            "traceback",
            "group_id",
        )
    }
    fields["parents"], fields["dependents"] = _runtime().backend.links(job.id)
    fields.update(args=job.args, kwargs=job.kwargs, result=job.result, progress=job.progress)
    fields.update(
        {name: getattr(job, name) for name in LIMIT_KEYS if getattr(job, name) is not None}
    )
    fields.update(history=job.history, time_zone=zone_name())
    for entry in [fields, *fields["history"]]:
        for name in times:
            if name in entry:
                entry[name] = local_time(entry[name])
    click.echo(json.dumps(fields, indent=2))


@offload_cli.command("retry")
@click.argument("job_id")
def retry_command(job_id: str) -> None:
    """Queue a failed or cancelled job again."""
    try:
        job = _runtime().retry(job_id)
    except (LookupError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"{job.id} queued again")


@offload_cli.command("cancel")
@click.argument("job_id")
def cancel_command(job_id: str) -> None:
    """Cancel a queued job, or ask a running one to stop."""
    job = _job(job_id)
    done = _runtime().cancel(job.id)
    job.refresh()
    if not done:
        raise click.ClickException(f"job {job.id} {state_words(job.state, 'already')}")
    click.echo(f"{job.id} {'cancelled' if job.state == 'cancelled' else 'asked to stop'}")


@offload_cli.command("purge")
@click.option(
    "--older-than",
    type=click.FloatRange(min=0),
    default=0,
    show_default=True,
    help="Only jobs that finished at least this many seconds ago.",
)
def purge_command(older_than: float) -> None:
    """Delete finished jobs now (they also expire after OFFLOAD_RESULT_TTL)."""
    count = _runtime().purge(time.time() - older_than)
    click.echo(f"deleted {count} finished job(s)")


@offload_cli.command("stats")
def stats_command() -> None:
    """Jobs per task and state, live worker processes with their pools, and jobs no live
    worker can run."""
    runtime = _runtime()
    click.echo(f"storage: {describe(runtime.backend)}\n")
    counts = runtime.backend.counts()
    states = STATES
    tasks = sorted({task for task, _ in counts})
    width = max([len("task"), *map(len, tasks)])
    click.echo(f"{'task':<{width}} " + " ".join(f"{s:>9}" for s in states))
    for task in tasks:
        click.echo(f"{task:<{width}} " + " ".join(f"{counts.get((task, s), 0):>9}" for s in states))
    if not tasks:
        click.echo("(no jobs)")
    limited = {name: task.limits for name, task in runtime.tasks.items() if task.limits}
    for name, limits in sorted(limited.items()):
        click.echo(f"limits of {name}: {limits.describe()}")
    paused = runtime.backend.paused_queues()
    if paused:
        click.echo(f"\npaused queues: {', '.join(sorted(paused))}")
    live = live_processes(runtime.backend, runtime.settings.lease)
    click.echo(f"\n{len(live)} live worker(s)")
    for process in live:
        click.echo(f"  pid {process.pid} on {process.host}  {len(process.pools)} pool(s)")
        for info in process.pools:
            queues = ",".join(info.queues) if info.queues else "all queues"
            click.echo(f"    pool {info.id}  {queues}  {len(info.tasks)} tasks")
    known = {name for process in live for name in process.tasks}
    for name in sorted(runtime.backend.queued_task_names() - known):
        click.echo(f"warning: jobs of task {name!r} are queued but no live worker knows it")


@offload_cli.command("init-db")
def init_db_command() -> None:
    """Create or upgrade the storage schema (done on first use too)."""
    _runtime().backend.prepare()
    click.echo("storage schema is ready")


@offload_cli.command("pause")
@click.argument("queue")
def pause_command(queue: str) -> None:
    """Stop every process claiming jobs from QUEUE, across restarts, until resumed."""
    runtime = _runtime()
    warn_unknown_queues(runtime, [queue], "pausing")
    paused = runtime.pause_queue(queue)
    click.echo(f"queue {queue!r} {'paused' if paused else 'was paused already'}")


@offload_cli.command("resume")
@click.argument("queue")
def resume_command(queue: str) -> None:
    """Let every process claim jobs from QUEUE again."""
    resumed = _runtime().resume_queue(queue)
    click.echo(f"queue {queue!r} {'resumed' if resumed else 'was not paused'}")


@offload_cli.command("config")
@click.option("--json", "as_json", is_flag=True, help="Print it as JSON.")
def config_command(as_json: bool) -> None:
    """Show every OFFLOAD_* setting in force, and where it came from: a default, the app's
    config, or the environment (FLASK_OFFLOAD_*). Passwords and tokens are masked."""
    extension, app = _extension()
    shown: dict[str, dict[str, Any]] = {
        key: {**entry, "value": _masked(key, entry["value"])}
        for key, entry in extension.configuration(app).items()
    }
    if as_json:
        click.echo(json.dumps(shown, indent=2, default=repr))
        return
    width = max(len("setting"), *map(len, shown))
    values = {
        key: repr(entry["value"]) if isinstance(entry["value"], str) else str(entry["value"])
        for key, entry in shown.items()
    }
    value_width = max(len("value"), *map(len, values.values()))
    click.echo(f"{'setting':<{width}}  {'value':<{value_width}}  source")
    for key, entry in shown.items():
        source = entry["source"]
        if "variable" in entry:
            source += f" ({entry['variable']})"
        if "overrides" in entry:
            source += f" (overrides {entry['overrides']})"
        click.echo(f"{key:<{width}}  {values[key]:<{value_width}}  {source}")


def _masked(key: str, value: Any) -> Any:
    """A setting's value as it may be printed: no password of a URL, no token."""
    if key == "OFFLOAD_URL" and isinstance(value, str):
        return mask_password(value)
    if key.endswith("_TOKEN") and value:
        return "***"
    return value
