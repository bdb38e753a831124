"""The SQL that SQLite and PostgreSQL run alike, written once, with the job-life rules in it:
what a finish writes, what recovery does, what a retry resets, the attempt's history entry.

Each statement is written with ``?`` and ``:name`` placeholders and the few expressions a
``Dialect`` spells for its database (the statement's clock, JSON, arrays); each backend builds
its ``Statements`` once at import, so no statement text is made on the hot paths. What only
one database does (claiming, inserting a new job, batching outcomes, notifications) stays in
that backend's module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .rows import COLUMNS, RUNNING_ROWS

SELECT = ", ".join(COLUMNS)


@dataclass(frozen=True)
class Dialect:
    """What SQLite and PostgreSQL spell differently in the statements written here."""

    # The statement's clock in epoch seconds: a bound :now from this host, or the server's.
    now: str
    # The result_ttl of the row's task from the JSON object bound as :ttls, NULL without one.
    task_ttl: str
    # "column is one of the strings bound as this array parameter", from (column, parameter).
    any_of: Callable[[str, str], str]
    # history_json with one entry appended, from the entry's json object arguments (SQL),
    # keeping at most :keep entries.
    append_history: Callable[[str], str]
    # finished_at's whole minutes since the epoch.
    minute: str
    # "column is one of the values the subquery returns", from (column, subquery): PostgreSQL
    # plans IN (subquery) of a DELETE as a hash join over the whole table.
    among: Callable[[str, str], str] = "{} IN ({})".format
    # Statement text with ``?`` and ``:name`` placeholders as the driver wants them.
    translate: Callable[[str], str] = str
    # A Python list as the driver binds it to an array parameter.
    array: Callable[[Sequence[Any]], Any] = list
    # What follows offload_jobs where finished rows are read through their index.
    finished_index: str = ""
    # For the dashboard's search: a named placeholder's form, the case-insensitive LIKE and
    # what follows offload_jobs per state (an index hint).
    param: str = ":{}"
    like: str = "LIKE"
    search_hints: Mapping[str, str] = field(default_factory=dict)
    # What makes a read of rows lock them until the transaction ends (PostgreSQL's FOR
    # UPDATE; SQLite's BEGIN IMMEDIATE already holds the only write lock).
    for_update: str = ""


# A finished row keeps its last attempt (rows.settled says why): since schema 8 a finish that
# ends the job leaves the worker that ran it, where one before cleared it.
KEEPS_LAST_ATTEMPT = "worker IS NOT NULL AND claim IS NOT NULL"


def attempt(now: str, outcome: str, error: str, traceback: str) -> str:
    """The history entry of the attempt the row holds (its json object arguments, as SQL):
    built from the row as the claim left it, since SET reads the old values."""
    return f"""
        'attempt', attempts, 'worker', worker, 'claim', claim,
        'started_at', started_at, 'finished_at', {now},
        'outcome', {outcome}, 'error', {error}, 'traceback', {traceback}"""


def finish_set(d: Dialect, value: str, run_at: str) -> str:
    """The SET of a finish: how a claimed run's outcome is stored. ``value`` is the form of
    the outcome's values (``:{}`` bound, or a batch's columns), ``run_at`` a retry's due time.

    A retry of a run whose cancellation was asked for meanwhile ends it cancelled instead, as
    recovery does for a lost run: running it again would ignore the cancel. A job that ends
    cancelled so expires after its task's result_ttl, as a run that ends cancelled is kept.
    An attempt that goes on (a retry) joins the history in the same statement: no second
    write. One that ends the job is kept by the row itself (``rows.settled``): its worker
    stays, and its outcome, error and times are the row's own.
    """
    state, error = value.format("state"), value.format("error")
    traceback = value.format("traceback")
    retried = f"{state} = 'queued' AND NOT cancel_requested"
    cancelled = f"{state} = 'queued' AND cancel_requested"
    outcome = "CASE WHEN cancel_requested THEN 'cancelled' ELSE 'retrying' END"
    entry = d.append_history(attempt(d.now, outcome, error, traceback))
    return f"""
        state = CASE WHEN {cancelled} THEN 'cancelled' ELSE {state} END,
        result_json = {value.format("result_json")},
        error = CASE WHEN {cancelled} THEN 'Cancelled' ELSE {error} END,
        traceback = CASE WHEN {cancelled} THEN NULL ELSE {traceback} END,
        progress_json = coalesce({value.format("progress_json")}, progress_json),
        finished_at = CASE WHEN {retried} THEN NULL ELSE {d.now} END,
        run_at = CASE WHEN {retried} THEN {run_at} ELSE run_at END,
        worker = CASE WHEN {state} = 'queued' THEN NULL ELSE worker END, lease_until = NULL,
        expires_at = CASE WHEN {cancelled} THEN {d.now} + {d.task_ttl}
                          ELSE {d.now} + {value.format("ttl")} END,
        history_json = CASE WHEN {state} = 'queued' THEN {entry} ELSE history_json END"""


def _oldest(rows: str, by: str) -> str:
    """A purge's batch: the seq of the :batch rows matching ``rows`` first in ``by``."""
    return f"SELECT seq FROM offload_jobs WHERE {rows} ORDER BY {by} LIMIT :batch"


class Statements:
    """Every statement both SQL backends run alike, in one dialect's spelling."""

    def __init__(self, d: Dialect) -> None:
        now, sql = d.now, d.translate
        self.GET = sql(f"SELECT {SELECT} FROM offload_jobs WHERE id = ?")
        self.HEARTBEAT = sql(f"""
            UPDATE offload_jobs SET lease_until = {now} + :lease
            WHERE {d.any_of("id", ":ids")} AND {d.any_of("claim", ":claims")}
              AND state = 'running'
            RETURNING id, cancel_requested""")
        self.RELEASE = sql("""
            UPDATE offload_jobs
            SET state = 'queued', worker = NULL, lease_until = NULL, claim = NULL,
                attempts = attempts - 1
            WHERE id = ? AND claim = ? AND state = 'running'""")
        # A job whose worker died goes back in the queue; it is cancelled if someone asked for
        # that meanwhile, and failed once it has been lost max_lost times (it may be what kills
        # workers). The lost attempt joins the history. The claim becomes this recovery's
        # token (which fences nothing: a run's writes need its state running), so a recovery
        # repeated after a lost reply can find the jobs its first try took back.
        lost = attempt(
            now,
            outcome="CASE WHEN cancel_requested THEN 'cancelled' ELSE 'lost' END",
            error="'WorkerLost: the worker stopped renewing its lease'",
            traceback="NULL",
        )
        self.RECOVER = sql(f"""
            UPDATE offload_jobs
            SET lost = lost + 1, worker = NULL, lease_until = NULL, claim = :token,
                expires_at = CASE WHEN cancel_requested THEN {now} + {d.task_ttl} END,
                history_json = {d.append_history(lost)},
                state = CASE WHEN cancel_requested THEN 'cancelled'
                             WHEN lost + 1 >= :max_lost THEN 'failed' ELSE 'queued' END,
                finished_at = CASE WHEN cancel_requested OR lost + 1 >= :max_lost
                                   THEN {now} END,
                error = CASE WHEN cancel_requested THEN 'Cancelled'
                             WHEN lost + 1 >= :max_lost
                             THEN 'WorkerLost: worker lost ' || (lost + 1) || ' times' END
            WHERE {RUNNING_ROWS} AND lease_until < {now}
            RETURNING id, task, state, dependents""")
        # A queued or waiting job cancelled expires after its task's result_ttl, as a run
        # that ends so; its dependents are cancelled with it (see DOOM).
        self.CANCEL_QUEUED = sql(f"""
            UPDATE offload_jobs
            SET state = 'cancelled', finished_at = {now}, expires_at = {now} + {d.task_ttl}
            WHERE id = :id AND state IN ('queued', 'waiting')
            RETURNING task, dependents""")
        self.CANCEL_RUNNING = sql(
            "UPDATE offload_jobs SET cancel_requested = true WHERE id = ? AND state = 'running'"
        )
        # A retry starts afresh: due now, no attempts, no outcome, no cancel asked. The last
        # attempt, which the row kept (see finish_set), joins the history. Not while another
        # queued or running job holds its key.
        last = attempt("finished_at", outcome="state", error="error", traceback="traceback")
        self.RETRY = sql(f"""
            UPDATE offload_jobs
            SET state = 'queued', run_at = {now}, attempts = 0, lost = 0, finished_at = NULL,
                result_json = NULL, error = NULL, traceback = NULL, cancel_requested = false,
                expires_at = NULL, worker = NULL,
                history_json = CASE WHEN {KEEPS_LAST_ATTEMPT}
                                    THEN {d.append_history(last)} ELSE history_json END
            WHERE id = :id AND state IN ('failed', 'cancelled')
              AND (key IS NULL OR NOT EXISTS (
                  SELECT 1 FROM offload_jobs AS holder
                  WHERE holder.key = offload_jobs.key
                    AND holder.state IN ('queued', 'running')))""")
        self.SET_PROGRESS = sql("""
            UPDATE offload_jobs SET progress_json = ?
            WHERE id = ? AND claim = ? AND state = 'running'""")
        self.ADVANCE_TICK = sql("""
            INSERT INTO offload_schedules AS s (name, last_tick) VALUES (?, ?)
            ON CONFLICT (name) DO UPDATE SET last_tick = excluded.last_tick
            WHERE s.last_tick < excluded.last_tick""")
        self.RECORD_TICK = sql(
            "INSERT INTO offload_schedules (name, last_tick) VALUES (?, ?) ON CONFLICT DO NOTHING"
        )
        self.TICKS = "SELECT name, last_tick FROM offload_schedules"
        self.LIST_JOBS = sql(f"""
            SELECT {SELECT} FROM offload_jobs
            WHERE (CAST(:state AS text) IS NULL OR state = :state)
              AND (CAST(:task AS text) IS NULL OR task = :task)
            ORDER BY seq DESC LIMIT :limit""")
        # Finished rows through the finished index, queued and running ones through their own.
        self.COUNTS = f"""
            SELECT task, state, count(*) FROM offload_jobs WHERE state = 'waiting'
            GROUP BY task, state
            UNION ALL
            SELECT task, state, count(*) FROM offload_jobs {d.finished_index}
            WHERE state IN ('succeeded', 'failed', 'cancelled') GROUP BY task, state
            UNION ALL
            SELECT task, state, count(*) FROM offload_jobs WHERE state = 'queued'
            GROUP BY task, state
            UNION ALL
            SELECT task, state, count(*) FROM offload_jobs WHERE {RUNNING_ROWS}
            GROUP BY task, state"""
        self.BEAT = sql("""
            INSERT INTO offload_workers
                (id, host, pid, queues_json, tasks_json, started_at, last_seen)
            VALUES (?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT (id) DO UPDATE SET tasks_json = excluded.tasks_json,
                last_seen = excluded.last_seen""")
        self.WORKERS = sql("""
            SELECT id, host, pid, queues_json, tasks_json, started_at, last_seen
            FROM offload_workers WHERE last_seen >= ? ORDER BY started_at""")
        self.FORGET_WORKER = sql("DELETE FROM offload_workers WHERE id = ?")
        # A purge deletes at most :batch rows a statement, so it never holds a million row
        # locks and writes its WAL in one transaction; each batch reads the oldest rows of
        # the finished or the expiry index, so its cost follows the rows it deletes, not the
        # table's. The cut-off is an age before the statement's clock, which may not be this
        # host's. The condition is said again outside the subquery: a row retried meanwhile
        # is kept.
        old = f"""state IN ('succeeded', 'failed', 'cancelled') AND finished_at < {now} - :age
              AND expires_at IS NULL"""
        expired = f"expires_at < {now}"
        self.PURGE, self.PURGE_EXPIRED = (
            sql(f"DELETE FROM offload_jobs WHERE {rows} AND {d.among('seq', _oldest(rows, by))}")
            for rows, by in ((old, "finished_at"), (expired, "expires_at"))
        )
        # The maintenance lease: taken if free or lapsed, renewed by its holder; one row.
        self.LEAD = sql(f"""
            INSERT INTO offload_leases AS lease (name, holder, until)
            VALUES ('maintenance', :holder, {now} + :ttl)
            ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until = excluded.until
            WHERE lease.holder = excluded.holder OR lease.until < {now}
            RETURNING holder""")
        self.STEP_DOWN = sql(
            "DELETE FROM offload_leases WHERE name = 'maintenance' AND holder = :holder"
        )
        self.FORGET_SILENT = sql("DELETE FROM offload_workers WHERE last_seen < ?")
        # A purged job's own parents go with it (its parents' rows are its inputs).
        self.PURGE_DEPS = """
            DELETE FROM offload_deps
            WHERE NOT EXISTS (SELECT 1 FROM offload_jobs WHERE id = offload_deps.job)"""
        self.links(d)
        self.QUEUED_TASK_NAMES = "SELECT DISTINCT task FROM offload_jobs WHERE state = 'queued'"
        self.DELETE = sql("""
            DELETE FROM offload_jobs WHERE id = ? AND state <> 'running'
            RETURNING task, dependents""")
        self.PAUSE = sql(
            "INSERT INTO offload_queues (name, paused_at) VALUES (?, ?) ON CONFLICT DO NOTHING"
        )
        self.RESUME = sql("DELETE FROM offload_queues WHERE name = ?")
        self.PAUSED = "SELECT name FROM offload_queues"
        # Queued rows through the claim index, running ones through the lease index.
        self.QUEUE_STATS = sql(f"""
            SELECT queue, count(*), count(*) FILTER (WHERE run_at <= {now}),
                min(run_at) FILTER (WHERE run_at <= {now}), 0
            FROM offload_jobs WHERE state = 'queued' GROUP BY queue
            UNION ALL
            SELECT queue, 0, 0, NULL, count(*) FROM offload_jobs WHERE {RUNNING_ROWS}
            GROUP BY queue""")
        self.RECENT = sql(f"""
            SELECT task, state, finished_at, finished_at - started_at
            FROM offload_jobs {d.finished_index}
            WHERE state IN ('succeeded', 'failed', 'cancelled') AND finished_at >= ?""")
        self.PER_MINUTE = sql(f"""
            SELECT {d.minute} AS minute, state, count(*) FROM offload_jobs {d.finished_index}
            WHERE state IN ('succeeded', 'failed', 'cancelled') AND finished_at >= ?
            GROUP BY minute, state""")

    def links(self, d: Dialect) -> None:
        """Workflows: the statements of a job's parents and dependents (``offload_deps``).

        A waiting job counts the parents it still waits for (``pending``): the parent's
        success takes one off, and the last one queues it, in the transaction that stores that
        success. A counter, not a recount of the parents, so two parents finishing at once in
        two transactions cannot each see the other unfinished (PostgreSQL's read committed
        re-reads a row it waited for, and so decrements the value the other one wrote). A
        parent that ends failed or cancelled cancels its waiting dependents (DOOM, repeated a
        generation at a time); a retry of that parent re-arms those it cancelled (REARM).
        """
        now, sql = d.now, d.translate
        # Read and locked before a child of theirs is stored: a parent's finish then waits
        # for the child's transaction, and sees that it has a dependent (or the child sees
        # that it has finished).
        self.PARENTS = sql(f"""
            SELECT id, task, state, result_json, error FROM offload_jobs
            WHERE {d.any_of("id", ":ids")}{d.for_update}""")
        self.ADD_DEP = sql("""
            INSERT INTO offload_deps (parent, job, position, done, result_json)
            VALUES (?, ?, ?, ?, ?)""")
        self.HAS_DEPENDENTS = sql(f"""
            UPDATE offload_jobs SET dependents = true
            WHERE {d.any_of("id", ":ids")} AND NOT dependents""")
        self.PARENT_DONE = sql("""
            UPDATE offload_deps SET done = true, result_json = :result
            WHERE parent = :id AND NOT done
            RETURNING job""")
        self.UNBLOCK = sql(f"""
            UPDATE offload_jobs
            SET pending = pending - 1,
                state = CASE WHEN pending <= 1 THEN 'queued' ELSE state END,
                run_at = CASE WHEN pending <= 1 AND run_at < {now} THEN {now} ELSE run_at END
            WHERE {d.any_of("id", ":ids")} AND state = 'waiting'
            RETURNING {SELECT}""")
        self.INPUTS = sql("SELECT result_json FROM offload_deps WHERE job = ? ORDER BY position")
        self.SET_ARGS = sql("UPDATE offload_jobs SET args_json = ? WHERE id = ?")
        # Kept as long as the failed parent is (OFFLOAD_RESULT_TTL), not its own task's
        # result_ttl: a retry of that parent re-arms it, so it must still be there. Only
        # through links not done: a parent deleted after its success has fed them already.
        self.DOOM = sql(f"""
            UPDATE offload_jobs
            SET state = 'cancelled', finished_at = {now}, error = :error, expires_at = NULL
            WHERE state = 'waiting' AND id IN (
                SELECT job FROM offload_deps WHERE {d.any_of("parent", ":ids")} AND NOT done)
            RETURNING {SELECT}""")
        # Only the dependents a parent's failure cancelled, and only while no other parent of
        # theirs is failed or cancelled (that one's retry re-arms them).
        self.REARM = sql(f"""
            UPDATE offload_jobs
            SET state = 'waiting', finished_at = NULL, error = NULL, expires_at = NULL,
                pending = (SELECT count(*) FROM offload_deps AS d
                           WHERE d.job = offload_jobs.id AND NOT d.done)
            WHERE state = 'cancelled' AND substr(error, 1, 17) = 'DependencyFailed:'
              AND id IN (SELECT job FROM offload_deps WHERE {d.any_of("parent", ":ids")})
              AND NOT EXISTS (
                  SELECT 1 FROM offload_deps AS d JOIN offload_jobs AS p ON p.id = d.parent
                  WHERE d.job = offload_jobs.id AND p.state IN ('failed', 'cancelled'))
            RETURNING id, dependents""")
        self.GROUP = sql(f"SELECT {SELECT} FROM offload_jobs WHERE group_id = ? ORDER BY seq")
        self.LINKS = sql("""
            SELECT 'parent', parent, position FROM offload_deps WHERE job = :id
            UNION ALL
            SELECT 'dependent', job, position FROM offload_deps WHERE parent = :id""")
