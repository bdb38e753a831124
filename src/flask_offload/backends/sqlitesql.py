"""SQLite's statements: its spelling of those both SQL backends share (``statements.py``) and
the ones only SQLite has (claiming by pick-then-take, inserting by position, one outcome a
statement), kept together so they read as SQL on their own, as PostgreSQL's do in
``pgsql.py``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from operator import attrgetter

from .limits import LimitStatements
from .rows import COLUMNS
from .statements import SELECT, Dialect, Statements, finish_set

# SQLite's spelling of what the statements write once (statements.py). The clock is this
# host's, bound as :now: every process on one machine shares it.
# A history that is not JSON (a hand edit, a bad restore) starts afresh: read, it would fail
# the statement ("malformed JSON"), and with it every other job's finish or recovery.
_NO_HISTORY = "history_json IS NULL OR NOT json_valid(history_json)"


def _append_history(entry: str) -> str:
    """history_json with the entry (json_object arguments) appended, keeping :keep entries.
    The first entry is written as text around the object, the cheapest way for the common
    first attempt."""
    return f"""CASE WHEN {_NO_HISTORY} THEN '[' || json_object({entry}) || ']'
        ELSE json_insert(
            CASE WHEN json_array_length(history_json) >= :keep
                 THEN json_remove(history_json, '$[0]') ELSE history_json END,
            '$[#]', json_object({entry})) END"""


DIALECT = Dialect(
    now=":now",
    task_ttl="(SELECT value FROM json_each(:ttls) WHERE key = task)",
    any_of=lambda column, values: f"{column} IN (SELECT value FROM json_each({values}))",
    append_history=_append_history,
    minute="CAST(finished_at / 60 AS INTEGER)",
    array=json.dumps,
    # INDEXED BY: without statistics SQLite might not pick the finished index for a time
    # range, and would count finished rows from the wide table.
    finished_index="INDEXED BY offload_jobs_finished",
    # The few queued or running rows are listed through their own index: left to itself,
    # SQLite walks a million finished rows newest first to find them.
    search_hints={
        "queued": "INDEXED BY offload_jobs_claim",
        "running": "INDEXED BY offload_jobs_lease",
        "waiting": "INDEXED BY offload_jobs_waiting",
    },
)
SQL = Statements(DIALECT)
LIMITS = LimitStatements(DIALECT)


def _insert(columns: Sequence[str]) -> str:
    """An INSERT of ``columns``, positional (cheaper to bind than named parameters)."""
    return (
        f"INSERT INTO offload_jobs ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
    )


# What a new job sets; the other columns start at their defaults. Fewer bound values make a
# measurably cheaper insert (bench: enqueue). A job stored whole (EAGER mode stores finished
# ones) binds every column.
NEW_COLUMNS = (
    "id", "task", "queue", "priority", "state", "args_json", "kwargs_json", "key",
    "max_attempts", "created_at", "run_at", "owner_json", "ephemeral", "trace_json",
)  # fmt: skip
INSERT_NEW, INSERT_WHOLE = _insert(NEW_COLUMNS), _insert(COLUMNS)
new_values, whole_values = attrgetter(*NEW_COLUMNS), attrgetter(*COLUMNS)
IF_KEY_FREE = (
    " ON CONFLICT (key) WHERE key IS NOT NULL AND state IN ('queued', 'running') DO NOTHING"
)
# Through a caller's connection (SQLAlchemy's text() takes named parameters).
NAMED_COLUMNS = (*NEW_COLUMNS, "limit_key", "rate_key")
INSERT_NAMED = (
    f"INSERT INTO offload_jobs ({', '.join(NAMED_COLUMNS)}) "
    f"VALUES ({', '.join(':' + name for name in NAMED_COLUMNS)})"
)
GET_BY_KEY_NAMED = (
    f"SELECT {SELECT} FROM offload_jobs WHERE key = :key AND state IN ('queued', 'running')"
)
GET_BY_KEY = f"SELECT {SELECT} FROM offload_jobs WHERE key = ? AND state IN ('queued', 'running')"
# A claim picks, then takes, in one BEGIN IMMEDIATE transaction: as one UPDATE with a
# subquery, SQLite is several times slower.
CLAIM_PICK = """
    SELECT seq FROM offload_jobs
    WHERE state = 'queued' AND run_at <= :now
      AND task IN (SELECT value FROM json_each(:tasks))
      AND (:queues IS NULL OR queue IN (SELECT value FROM json_each(:queues)))
      AND queue NOT IN (SELECT name FROM offload_queues)
    ORDER BY priority DESC, run_at, seq
    LIMIT :limit
"""
CLAIM_TAKE = f"""
    UPDATE offload_jobs
    SET state = 'running', worker = :worker, lease_until = :now + :lease, started_at = :now,
        attempts = attempts + 1, claim = :token || '.' || seq
    WHERE seq IN (SELECT value FROM json_each(:seqs))
    RETURNING {SELECT}, seq
"""
# One outcome a statement, the batch by executemany (see _finish_batch); finish_rows gives
# the values, a retry's due time as this host's clock tells it.
FINISH = f"""
    UPDATE offload_jobs SET {finish_set(DIALECT, ":{}", "coalesce(:run_at, :now)")}
    WHERE id = :id AND claim = :claim AND state = 'running'
"""
# A task with result_ttl=0 keeps nothing of a job that ended: it is deleted instead.
FORGET = "DELETE FROM offload_jobs WHERE id = :id AND claim = :claim AND state = 'running'"
# One outcome on its own, autocommitted: only for a job no other job waits for, whose finish
# is this one statement; one with dependents is stored in a transaction with what its end
# does to them (_finish_batch).
FINISH_ALONE, FORGET_ALONE = (f"{sql} AND NOT dependents" for sql in (FINISH, FORGET))
# The claims that hold their jobs, read in a batch's transaction before its outcomes are
# stored, with what the workflows' rules need of those with dependents.
HELD = """
    SELECT id, claim, dependents, cancel_requested, task FROM offload_jobs
    WHERE id IN (SELECT value FROM json_each(:ids)) AND state = 'running'
"""
