"""Rate and concurrency limits, as storage enforces them when it claims jobs.

A task with ``concurrency=N`` has at most N jobs ``running`` at once per key (a job counts
from its claim until its outcome is stored, or until recovery takes it back from a dead
worker); one with ``rate_limit="N/s"`` has at most N claims in any window of that length per
key, counted in the log ``offload_rate_starts``. A job's keys are computed when it is
enqueued (``limit_key``, ``rate_key``: ``""`` for the task as a whole) and stored on it.

Jobs of limited tasks are claimed by ``Backend.claim_limited``, never by the plain ``claim``,
so jobs of other tasks keep the fast path. A limited claim reads which keys are full, skips
their jobs (so one full key never holds back another's) and takes what fits, all under one
lock per storage (SQLite's write lock, PostgreSQL's advisory lock), so two workers never
both take the last slot.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigurationError
from ..job import Job
from .rows import RUNNING_ROWS
from .statements import SELECT, Dialect

PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}
LONGEST = max(PERIODS.values())  # starts older than this count for no window
_RATE = re.compile(r"\s*(\d+)\s*/\s*([smh])\s*")
SEP = "\x1f"  # between a task's name and a key, where a pair is one string
SCAN = 8  # candidates read per job wanted: full keys are skipped in the query itself


@dataclass(frozen=True)
class Limits:
    """A task's limits: ``concurrency`` jobs running at once and ``rate`` starts per
    ``period`` seconds, each per key (None: no such limit)."""

    concurrency: int | None = None
    rate: int | None = None
    period: float = 1.0

    def describe(self) -> str:
        """The limits as the task declared them, for the CLI and the dashboard."""
        parts = []
        if self.concurrency is not None:
            parts.append(f"concurrency={self.concurrency}")
        if self.rate is not None:
            unit = next(u for u, seconds in PERIODS.items() if seconds == self.period)
            parts.append(f"rate_limit={self.rate}/{unit}")
        return " ".join(parts)


def parse_rate(value: object) -> tuple[int, float]:
    """``"10/s"`` (also ``/m``, ``/h``) as (10, 1.0); a clear error for anything else."""
    match = _RATE.fullmatch(value) if isinstance(value, str) else None
    if match is None or int(match[1]) < 1:
        raise ConfigurationError(
            f"rate_limit must be a string like '10/s', '100/m' or '1000/h' (at least one "
            f"start per second, minute or hour), not {value!r}"
        )
    return int(match[1]), PERIODS[match[2]]


@dataclass
class Room:
    """What a limited claim found free: slots per (task, key) pair and the starts left in each
    rate window, and how long until a full window lets a job start again."""

    limits: Mapping[str, Limits]
    running: Counter[tuple[str, str]] = field(default_factory=Counter)
    starts: Counter[tuple[str, str]] = field(default_factory=Counter)
    wait: float | None = None

    def count_starts(self, rows: Iterable[Sequence[Any]], now: float) -> None:
        """Take in ``(task, key, starts, oldest start)`` of the current windows; a full window
        frees a start once its oldest start leaves it."""
        for task, key, count, oldest in rows:
            count, oldest = int(count), float(oldest)
            self.starts[task, key] = count
            limits = self.limits[task]
            if limits.rate is not None and count >= limits.rate:
                free_in = max(0.001, oldest + limits.period - now)
                self.wait = free_in if self.wait is None else min(self.wait, free_in)

    def full(self) -> tuple[list[str], list[str]]:
        """The ``task<SEP>key`` pairs whose concurrency is used up, and those whose rate is."""
        busy = [
            pair(*k) for k, n in self.running.items() if n >= (self.limits[k[0]].concurrency or 0)
        ]
        spent = [pair(*k) for k, n in self.starts.items() if n >= (self.limits[k[0]].rate or 0)]
        return busy, spent

    def take(self, candidates: Iterable[Sequence[Any]], want: int) -> list[Any]:
        """The first item of each candidate ``(id, task, limit_key, rate_key)``, in their
        order, that fits, up to ``want``; counts them as taken."""
        taken: list[Any] = []
        for seq, task, limit_key, rate_key in candidates:
            if len(taken) >= want:
                break
            limits = self.limits[task]
            slots = (task, limit_key)
            window = (task, rate_key)
            if limits.concurrency is not None and self.running[slots] >= limits.concurrency:
                continue
            if limits.rate is not None and self.starts[window] >= limits.rate:
                continue
            if limits.concurrency is not None:
                self.running[slots] += 1
            if limits.rate is not None:
                self.starts[window] += 1
            taken.append(seq)
        return taken


def pair(task: str, key: str) -> str:
    """One string for a (task, key) pair, as the statements build it from a row."""
    return f"{task}{SEP}{key}"


def limited(job: Job) -> bool:
    """Whether a stored job was enqueued under limits (``claim_limited`` takes it)."""
    return job.limit_key is not None or job.rate_key is not None


class LimitStatements:
    """The statements of a limited claim both SQL backends run alike, in one dialect."""

    def __init__(self, d: Dialect) -> None:
        sql = d.translate
        marked = "state = 'queued' AND (limit_key IS NOT NULL OR rate_key IS NOT NULL)"
        # Through the partial index of queued limited jobs only: jobs of other tasks never
        # enter it, so this costs them nothing.
        self.ANY_DUE = sql(f"""
            SELECT 1 FROM offload_jobs
            WHERE {marked} AND run_at <= {d.now} AND {d.any_of("task", ":tasks")}
            LIMIT 1""")
        self.RUNNING = sql(f"""
            SELECT task, coalesce(limit_key, ''), count(*) FROM offload_jobs
            WHERE {RUNNING_ROWS} AND {d.any_of("task", ":tasks")}
            GROUP BY task, coalesce(limit_key, '')""")
        self.PRUNE = sql("DELETE FROM offload_rate_starts WHERE task = ? AND at < ?")
        self.STARTS = sql("""
            SELECT task, key, count(*), min(at) FROM offload_rate_starts
            WHERE task = ? AND at >= ? GROUP BY task, key""")
        self.PICK = sql(f"""
            SELECT id, task, coalesce(limit_key, ''), coalesce(rate_key, '')
            FROM offload_jobs
            WHERE {marked} AND run_at <= :now AND {d.any_of("task", ":tasks")}
              AND (CAST(:queues AS text) IS NULL OR {d.any_of("queue", ":queues")})
              AND queue NOT IN (SELECT name FROM offload_queues)
              AND NOT {d.any_of("task || :sep || coalesce(limit_key, '')", ":busy")}
              AND NOT {d.any_of("task || :sep || coalesce(rate_key, '')", ":spent")}
            ORDER BY priority DESC, run_at, seq
            LIMIT :scan""")
        # Only jobs still queued: a cancel may have come between the pick and the take.
        self.TAKE = sql(f"""
            UPDATE offload_jobs
            SET state = 'running', worker = :worker, lease_until = :now + :lease,
                started_at = :now, attempts = attempts + 1, claim = :token || '.' || seq
            WHERE {d.any_of("id", ":ids")} AND state = 'queued'
            RETURNING {SELECT}""")
        # Queued jobs of limited tasks stored without keys: enqueued by name in a process that
        # does not register the task, or before its limits were added (see Upkeep). In claim
        # order, so read through the claim index, never the finished rows.
        self.UNMARKED = sql(f"""
            SELECT {SELECT} FROM offload_jobs
            WHERE state = 'queued' AND limit_key IS NULL AND rate_key IS NULL
              AND {d.any_of("task", ":tasks")}
            ORDER BY priority DESC, run_at, seq LIMIT :limit""")
        self.MARK = sql("""
            UPDATE offload_jobs SET limit_key = ?, rate_key = ?
            WHERE id = ? AND state = 'queued' AND limit_key IS NULL AND rate_key IS NULL""")
        self.LOG_START = sql("INSERT INTO offload_rate_starts (task, key, at) VALUES (?, ?, ?)")
