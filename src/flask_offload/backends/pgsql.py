"""PostgreSQL's statements: its spelling of those both SQL backends share (``statements.py``)
and the ones only PostgreSQL has (inserting with NOTIFY, claiming with SKIP LOCKED and
adopting, the batched finish, and what the lost-reply confirmations read), kept together so
they read as SQL on their own, as the SQLite ones do in ``sqlite.py``'s first half."""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import fields
from operator import attrgetter
from typing import Any

from ..job import Job
from .limits import LimitStatements
from .pglisten import CHANNEL
from .rows import COLUMNS
from .statements import SELECT, Dialect, Statements, finish_set

# Time is the server's, in epoch seconds: every statement that sets or compares a lease, a due
# time or a cut-off reads the server's clock, never a worker host's, whose clock may be off.
# now() is the statement's start (our statements run autocommitted or in short transactions);
# an enqueue, which may run in a caller's long transaction, reads the clock itself.
_NOW = "date_part('epoch', now())"
_CLOCK = "date_part('epoch', clock_timestamp())"


def _append_history(entry: str) -> str:
    """history_json with the entry (jsonb_build_object arguments) appended, keeping :keep."""
    return f"""((CASE WHEN jsonb_array_length(coalesce(history_json, '[]')::jsonb) >= :keep
                  THEN history_json::jsonb - 0
                  ELSE coalesce(history_json, '[]')::jsonb END)
            || jsonb_build_array(jsonb_build_object({entry})))::text"""


def _translate(sql: str) -> str:
    """psycopg's placeholders for the statements' ``?`` and ``:name`` (not ``::type``)."""
    return re.sub(r"(?<![:\w]):(\w+)", r"%(\1)s", sql).replace("?", "%s")


DIALECT = Dialect(
    now=_NOW,
    task_ttl="CAST(CAST(:ttls AS jsonb) ->> task AS float8)",
    any_of=lambda column, values: f"{column} = ANY(CAST({values} AS text[]))",
    append_history=_append_history,
    minute="floor(finished_at / 60)::bigint",
    among="{} = ANY(ARRAY({}))".format,
    translate=_translate,
    param="%({})s",
    like="ILIKE",
    for_update=" FOR UPDATE",
)
SQL = Statements(DIALECT)
LIMITS = LimitStatements(DIALECT)
# Limited claims take turns, across every process on the server: SKIP LOCKED lets two
# claims each see a free slot and both take it. Held to the end of the claim's transaction;
# the clock is read once it is held (the subquery runs first), so the windows' starts are
# logged in order.
LIMITS_LOCK = 0x0FF1717
LOCK_LIMITS = f"SELECT {_CLOCK} FROM (SELECT pg_advisory_xact_lock({LIMITS_LOCK})) AS locked"
# A new job's run_at: the server's clock plus what is left of its delay (none, or delay=), or
# a fixed moment (at=, a periodic tick) as given. CAST, not ::, as SQLAlchemy's text() reads
# ":name::type" as no parameter.
_DUE = f"coalesce(CAST(%(wait)s AS float8) + {_CLOCK}, %(run_at)s)"
# The notification says when the job is due ("<run_at> <queue>", float8's text being exact
# since PostgreSQL 12), so a listener that is told of a delayed job sleeps until then instead
# of a poll interval. pg_notify runs for a stored row only, and listeners hear of it once
# the transaction commits.
_NOTIFY = f"pg_notify('{CHANNEL}', run_at::text || ' ' || queue)"
# A new job as enqueue builds it sets only these columns (the others start at their
# defaults): fewer parameters to adapt and send on the hot path.
NEW = (
    "id", "task", "queue", "priority", "args_json", "kwargs_json", "max_attempts",
    "created_at", "run_at", "owner_json", "ephemeral", "trace_json",
)  # fmt: skip
_REST = [f for f in fields(Job) if f.name in COLUMNS and f.name not in NEW]
new_values, rest_values = attrgetter(*NEW), attrgetter(*(f.name for f in _REST))
DEFAULTS = tuple(f.default for f in _REST)  # state "queued", key None, attempts 0, ...


def _values(columns: Sequence[str]) -> str:
    """The VALUES of an insert of ``columns`` (named parameters, run_at set by _DUE)."""
    return ", ".join(_DUE if name == "run_at" else f"%({name})s" for name in columns)


# A new job without a key, on our own autocommitted connection: a plain insert, which costs
# the server less than ON CONFLICT's speculative insertion. Its only possible conflict is on
# the id (an earlier try of this insert whose reply was lost, or an id used already), which
# raises UniqueViolation and is told apart by HOLDER.
INSERT_NEW = f"""
    INSERT INTO offload_jobs (state, {", ".join(NEW)})
    VALUES ('queued', {_values(NEW)})
    RETURNING {_NOTIFY}
"""
# The same insert sending no notification: one for its queue went out a moment ago and
# another is owed (pgnotify.py says when that is allowed).
INSERT_QUIET = INSERT_NEW.replace(f"RETURNING {_NOTIFY}", "")
# The trailing notification of quiet inserts, one per queue, the job due now.
NOTIFY_QUEUES = f"""
    SELECT pg_notify('{CHANNEL}', {_NOW}::text || ' ' || queue)
    FROM unnest(%(queues)s::text[]) AS queue
"""
# Any other job, or inside a transaction that an error must not abort (the caller's, a
# tick's). No conflict target: a conflict on the id means this very insert was stored by an
# earlier try whose reply was lost, and one on the key index means another job holds the
# key. Either way nothing is stored and no notification is sent.
ENQUEUE = f"""
    INSERT INTO offload_jobs ({SELECT}) VALUES ({_values(COLUMNS)})
    ON CONFLICT DO NOTHING
    RETURNING {_NOTIFY}
"""
HOLDER = f"""
    SELECT {SELECT} FROM offload_jobs
    WHERE id = %(id)s OR (key = %(key)s AND state IN ('queued', 'running'))
    ORDER BY id = %(id)s DESC
    LIMIT 1
"""
# A claim walks the ready index lane by lane, a lane being a (queue, task, priority) with
# queued rows: one index probe finds the next lane, and the lane of a task this worker does
# not run or of a paused queue is stepped over whole (on to the next (queue, task)) without
# reading its rows. Each lane it can take gives up to limit due rows (run_at up to now is a
# range of the index, so delayed rows are never read), locked with SKIP LOCKED; the best
# limit of those are claimed, in claim order. Lanes with queued rows are few (bench:
# pg_table), so a claim's cost does not grow with rows it cannot take. MATERIALIZED: the
# locking subquery runs exactly once, so a claim never takes more than limit.
_TAKEABLE = """{lane}.task = ANY(%(tasks)s::text[])
          AND (%(queues)s::text[] IS NULL OR {lane}.queue = ANY(%(queues)s::text[]))
          AND NOT coalesce({lane}.queue = ANY(held.paused), false)"""
_CLAIM = f"""
    WITH RECURSIVE held AS MATERIALIZED (
        SELECT array_agg(name) AS paused FROM offload_queues),
    lanes (queue, task, priority) AS (
        (SELECT queue, task, priority FROM offload_jobs WHERE state = 'queued'
         ORDER BY queue, task, priority LIMIT 1)
      UNION ALL
        SELECT next.* FROM lanes AS lane, held, LATERAL (
            SELECT queue, task, priority FROM offload_jobs
            WHERE state = 'queued' AND (queue, task, priority) > (lane.queue, lane.task,
                CASE WHEN {_TAKEABLE.format(lane="lane")}
                     THEN lane.priority ELSE 2147483647 END)
            ORDER BY queue, task, priority LIMIT 1) AS next),
    due AS MATERIALIZED (
        SELECT job.seq, job.ctid FROM lanes AS lane, held, LATERAL (
            SELECT seq, priority, run_at, ctid FROM offload_jobs
            WHERE state = 'queued' AND run_at <= {_NOW}
              AND queue = lane.queue AND task = lane.task AND priority = lane.priority
            ORDER BY run_at, seq
            LIMIT %(limit)s
            FOR UPDATE SKIP LOCKED) AS job
        WHERE {_TAKEABLE.format(lane="lane")}
        ORDER BY job.priority DESC, job.run_at, job.seq
        LIMIT %(limit)s)
    UPDATE offload_jobs
    SET state = 'running', worker = %(worker)s, lease_until = {_NOW} + %(lease)s,
        started_at = {_NOW}, attempts = attempts + 1, claim = %(token)s || '.' || seq
    WHERE {{found}}
    RETURNING {SELECT}, seq
"""


BATCH = 64  # claims of this many jobs or more find their rows by ctid (see claim_statement)


@functools.lru_cache(maxsize=64)
def claim_statement(limit: int) -> str:
    """CLAIM of up to ``limit`` jobs, the number written into the text. Bound as a parameter,
    it made PostgreSQL plan every claim anew (a plan made once cannot see the limit and
    assumes a tenth of the table): ~0.5 ms a claim, half of a claim of one job. The text of
    each limit is planned on its first few uses only; a pool asks for a few sizes.

    The rows a claim of a batch (``BATCH`` or more) takes are found again by the ctid their
    locking read returned (a TID scan): by seq, a claim of 256 from a table of 20,000 rows was
    planned as a hash join reading the whole table, 1.7 of its 5.5 ms. Smaller claims, an
    idle worker's, find their rows by seq: planned once on a small table (a fleet's first
    minutes), a TID scan loses to reading the table, and the plan is kept as it grows."""
    found = (
        "ctid = ANY(ARRAY(SELECT ctid FROM due))"
        if limit >= BATCH
        else "seq IN (SELECT seq FROM due)"
    )
    return _CLAIM.replace("%(limit)s", str(int(limit))).replace("{found}", found)


CLAIM = claim_statement(1)
# The task names of queued jobs, one index probe per (queue, task) of the ready index
# instead of a read of every queued row (1M queued rows: bench/pg_table.py).
QUEUED_TASK_NAMES = """
    WITH RECURSIVE lanes (queue, task) AS (
        (SELECT queue, task FROM offload_jobs WHERE state = 'queued'
         ORDER BY queue, task LIMIT 1)
      UNION ALL
        SELECT next.* FROM lanes AS lane, LATERAL (
            SELECT queue, task FROM offload_jobs
            WHERE state = 'queued' AND (queue, task) > (lane.queue, lane.task)
            ORDER BY queue, task LIMIT 1) AS next)
    SELECT DISTINCT task FROM lanes
"""
# Jobs a claim took although its reply never arrived: found by that claim's token. A new
# token lets only one of the worker's threads adopt each job.
ADOPT = f"""
    UPDATE offload_jobs
    SET started_at = {_NOW}, lease_until = {_NOW} + %(lease)s,
        claim = %(token)s || '.' || seq
    WHERE worker = %(worker)s AND state = 'running'
      AND split_part(claim, '.', 1) = ANY(%(tokens)s::text[])
    RETURNING {SELECT}, seq
"""
# A batch of outcomes is stored by one statement, the outcomes bound as one JSON array of
# objects (``outcomes``): psycopg dumps a list bound as an array element by element in Python,
# and nine such arrays took a quarter of a busy worker's CPU while it held its connection.
# The batch's columns are named b_... so that the row's own columns read unqualified. Its
# LIMIT is the number of outcomes, which the planner cannot see in the JSON: it assumed 100
# and read a table of 10,000 rows whole instead of looking the outcomes' rows up by id.
# A task with result_ttl=0 (ttl 0) keeps nothing of a job that ended: it is deleted instead.
# What a stored outcome writes is the rule all SQL storage shares (statements.finish_set); a
# retry's wait counts from the server's now. Each stored outcome returns its claim.
FORGET = "coalesce(b_ttl <= 0, false)"
OUTCOME_KEYS = (
    "id",
    "claim",
    "state",
    "result_json",
    "error",
    "traceback",
    "progress_json",
    "wait",
    "ttl",
)


def _finish_many(only: str) -> str:
    """The batched finish of the rows that also meet ``only``."""
    return _translate(f"""
    WITH batch (b_id, b_claim, b_state, b_result_json, b_error, b_traceback, b_progress_json,
                b_wait, b_ttl) AS (
        SELECT * FROM json_to_recordset(%(outcomes)s::json)
        AS b(id text, claim text, state text, result_json text, error text, traceback text,
             progress_json text, wait float8, ttl float8)
        LIMIT %(count)s),
    forgotten AS (
        DELETE FROM offload_jobs USING batch
        WHERE id = b_id AND claim = b_claim AND state = 'running' AND {FORGET} {only}
        RETURNING b_claim),
    stored AS (
        UPDATE offload_jobs
        SET {finish_set(DIALECT, "b_{}", f"{_NOW} + coalesce(b_wait, 0)")}
        FROM batch
        WHERE id = b_id AND claim = b_claim AND state = 'running' AND NOT {FORGET} {only}
        RETURNING b_claim)
    SELECT b_claim FROM forgotten UNION ALL SELECT b_claim FROM stored
""")


def outcomes(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The ``outcomes`` and ``count`` parameters of FINISH_MANY and FINISH_LINKED: ``rows``
    (of ``rows.finish_rows``) as the JSON array the statements read (a key left out reads as
    NULL), and how many."""
    batch = json.dumps(
        [{key: row[key] for key in OUTCOME_KEYS if row[key] is not None} for row in rows]
    )
    return {"outcomes": batch, "count": len(rows)}


# Autocommitted, the outcomes of jobs no other job waits for: the common finish, one
# statement. The others (and lost claims, told apart there) are stored by FINISH_LINKED in a
# transaction with what their ends do to their dependents, after HELD has locked them.
FINISH_MANY = _finish_many("AND NOT dependents")
FINISH_LINKED = _finish_many("")
HELD = """
    SELECT id, claim, dependents, cancel_requested, task FROM offload_jobs
    WHERE id = ANY(%(ids)s::text[]) AND state = 'running'
    FOR UPDATE
"""
# A batch of new jobs (enqueue_many), told to the listeners once per queue by WAKE.
INSERT_BATCH = f"INSERT INTO offload_jobs ({SELECT}) VALUES ({_values(COLUMNS)})"
WAKE = f"SELECT pg_notify('{CHANNEL}', %s)"
# What a write's first try did, read after its reply was lost (the confirm= of each verb).
EXISTING = "SELECT id FROM offload_jobs WHERE id = ANY(%(ids)s::text[])"
CREATED = "SELECT id, created_at FROM offload_jobs WHERE id = ANY(%(ids)s::text[])"
# A finish keeps the claim token, so a finish repeated after a lost reply recognises its work.
FINISHED_BY = """
    SELECT id FROM offload_jobs
    WHERE id = ANY(%(ids)s::text[]) AND claim = ANY(%(claims)s::text[]) AND state <> 'running'
"""
STATE = "SELECT state, cancel_requested FROM offload_jobs WHERE id = %s"
PAUSED_AT = "SELECT paused_at FROM offload_queues WHERE name = %s"
RECOVERED_BY = "SELECT id, task, state, dependents FROM offload_jobs WHERE claim = %(token)s"
# A job retried tells the listeners, as an enqueue does.
RETRY = f"{SQL.RETRY} RETURNING {_NOTIFY}"


def delay_left(job: Job) -> float | None:
    """What is left of a new job's delay, for a job whose run_at is relative (see Job)."""
    return job.run_at - time.time() if job.relative else None
