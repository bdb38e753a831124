"""The job store's tables on SQLite and PostgreSQL: one version number, one list of migrations,
and the upgrade that brings a database of any released version to this one in place.

Each migration is written once. A dialect has a statement of its own only where the two
truly differ (the row key and flag types, the snapshot trigger, the finished-job indexes);
everything else is the same text with the dialect's type names put in. SQLite keeps the
number in the file's header (``PRAGMA user_version``, written in the upgrade's own
transaction); PostgreSQL in the ``offload_schema`` table, one row per version, under an
advisory lock. Either way processes that start together upgrade once: the others wait, then
find nothing left to do.

A number means the same tables on both backends (each with the indexes its planner needs:
see version 5) from version 6 on. Before, each backend numbered its own list: SQLite's 1-6
are this list's 1-6 and so are PostgreSQL's 1-4, but PostgreSQL's 5 added the trace column
(this list's 6) without this list's 5, which PostgreSQL does not take: a PostgreSQL database
at 5 holds this list's 6, and is recorded as 6 on its first upgrade.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ..errors import StorageError

if TYPE_CHECKING:
    import psycopg

Dialect = Literal["sqlite", "postgresql"]

SCHEMA_VERSION = 9


@dataclass(frozen=True)
class Dialects:
    """Statements where the dialects' DDL truly differs: each dialect's own (none if empty)."""

    sqlite: tuple[str, ...] = ()
    postgresql: tuple[str, ...] = ()


# What the shared statements' {placeholders} stand for. Times are epoch seconds as a double
# on both, so a Job holds the same floats whichever storage it came from.
TYPES: dict[Dialect, dict[str, str]] = {
    "sqlite": {
        "seq": "INTEGER PRIMARY KEY",  # the rowid itself: rows in insertion order, one key
        "time": "REAL",
        "flag": "INTEGER NOT NULL DEFAULT 0",
    },
    "postgresql": {
        "seq": "bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
        "time": "double precision",
        "flag": "boolean NOT NULL DEFAULT false",
    },
}

# Each entry upgrades the schema from the version before it; index 0 creates version 1.
MIGRATIONS: list[tuple[str | Dialects, ...]] = [
    (
        """
        CREATE TABLE offload_jobs (
            seq {seq},
            id text NOT NULL UNIQUE,
            task text NOT NULL,
            queue text NOT NULL,
            priority integer NOT NULL,
            state text NOT NULL,
            args_json text NOT NULL,
            kwargs_json text NOT NULL,
            key text,
            attempts integer NOT NULL DEFAULT 0,
            max_attempts integer NOT NULL,
            lost integer NOT NULL DEFAULT 0,
            created_at {time} NOT NULL,
            run_at {time} NOT NULL,
            started_at {time},
            finished_at {time},
            worker text,
            lease_until {time},
            cancel_requested {flag},
            progress_json text,
            result_json text,
            error text,
            traceback text,
            owner_json text,
            ephemeral {flag}
        )
        """,
        # A background view's request snapshot (cookies included) lives only until the job
        # ends. SQLite's triggers run statements; PostgreSQL's run a function.
        Dialects(
            sqlite=(
                """
                CREATE TRIGGER offload_jobs_forget_snapshot
                AFTER UPDATE OF state ON offload_jobs
                WHEN NEW.ephemeral AND NEW.state IN ('succeeded', 'failed', 'cancelled')
                BEGIN
                    UPDATE offload_jobs SET args_json = '[]', kwargs_json = '{}'
                    WHERE seq = NEW.seq;
                END
                """,
            ),
            postgresql=(
                """
                CREATE FUNCTION offload_forget_snapshot() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    NEW.args_json := '[]';
                    NEW.kwargs_json := '{}';
                    RETURN NEW;
                END
                $$
                """,
                """
                CREATE TRIGGER offload_jobs_forget_snapshot
                    BEFORE UPDATE OF state ON offload_jobs FOR EACH ROW
                    WHEN (NEW.ephemeral AND NEW.state IN ('succeeded', 'failed', 'cancelled'))
                    EXECUTE FUNCTION offload_forget_snapshot()
                """,
            ),
        ),
        # Claims read only queued rows, in claim order: finished rows never slow them down.
        """
        CREATE INDEX offload_jobs_claim ON offload_jobs (priority DESC, run_at, seq)
            WHERE state = 'queued'
        """,
        # Running rows are few: heartbeats and recovery scan this small index.
        "CREATE INDEX offload_jobs_lease ON offload_jobs (lease_until) WHERE state = 'running'",
        """
        CREATE INDEX offload_jobs_finished ON offload_jobs (finished_at)
            WHERE state IN ('succeeded', 'failed', 'cancelled')
        """,
        """
        CREATE UNIQUE INDEX offload_jobs_key ON offload_jobs (key)
            WHERE key IS NOT NULL AND state IN ('queued', 'running')
        """,
        # The last tick each periodic schedule enqueued: one run per tick across processes.
        "CREATE TABLE offload_schedules (name text PRIMARY KEY, last_tick {time} NOT NULL)",
        # One row per live pool (a worker process runs one or more), renewed by its heartbeat.
        """
        CREATE TABLE offload_workers (
            id text PRIMARY KEY,
            host text NOT NULL,
            pid integer NOT NULL,
            queues_json text,
            tasks_json text NOT NULL,
            started_at {time} NOT NULL,
            last_seen {time} NOT NULL
        )
        """,
    ),
    # Version 2: every claim gets a token of its own that fences the run's writes.
    ("ALTER TABLE offload_jobs ADD COLUMN claim text",),
    # Version 3: a task's result_ttl sets when its finished job is deleted.
    (
        "ALTER TABLE offload_jobs ADD COLUMN expires_at {time}",
        """
        CREATE INDEX offload_jobs_expires ON offload_jobs (expires_at)
            WHERE expires_at IS NOT NULL
        """,
    ),
    # Version 4: each job's attempt history, and the queues an operator paused.
    (
        "ALTER TABLE offload_jobs ADD COLUMN history_json text",
        "CREATE TABLE offload_queues (name text PRIMARY KEY, paused_at {time} NOT NULL)",
        # Counts of finished jobs per task and state read this small index, not a million
        # wide rows (bench/dashboard.py). Task first and finished rows only, so no hot query
        # (claim, heartbeat, recover, purge) is tempted by it and claims never write it; each
        # finish writes one entry (the cost of a fast overview: see docs/benchmarks.md).
        """
        CREATE INDEX offload_jobs_done ON offload_jobs (task, state)
            WHERE state IN ('succeeded', 'failed', 'cancelled')
        """,
    ),
    # Version 5, SQLite only: the finished index, widened, covers those counts too. One index
    # entry per finish instead of two: the second cost a fifth of the no-op throughput (bench:
    # noop), while a count of a million finished jobs takes about 0.4 s instead of 0.07 s.
    # PostgreSQL keeps the (task, state) index, as its planner reads it far faster for the
    # counts (500,000 finished rows: 62 ms against 155 through the widened index, medians of
    # 12 interleaved runs) and a finish was no slower with it (44 µs a job against 42, noise).
    (
        Dialects(
            sqlite=(
                "DROP INDEX offload_jobs_done",
                "DROP INDEX offload_jobs_finished",
                """
                CREATE INDEX offload_jobs_finished ON offload_jobs (finished_at, task, state)
                    WHERE state IN ('succeeded', 'failed', 'cancelled')
                """,
            ),
        ),
    ),
    # Version 6: the trace context a job was enqueued in (OpenTelemetry, where installed).
    ("ALTER TABLE offload_jobs ADD COLUMN trace_json text",),
    # Version 7: workflows, rate and concurrency limits, and a fleet on one database.
    (
        # A waiting job counts the parents it still waits for (pending); a parent knows it has
        # dependents, so a finish without any stays one statement; one row per (parent, child)
        # keeps the order of a child's parents and, once a parent succeeded, its result, which
        # the child takes as its first argument (feed). Groups by group_id.
        "ALTER TABLE offload_jobs ADD COLUMN pending integer NOT NULL DEFAULT 0",
        "ALTER TABLE offload_jobs ADD COLUMN dependents {flag}",
        "ALTER TABLE offload_jobs ADD COLUMN feed text",
        "ALTER TABLE offload_jobs ADD COLUMN group_id text",
        "CREATE INDEX offload_jobs_group ON offload_jobs (group_id) WHERE group_id IS NOT NULL",
        # Waiting rows are read by the counts and the jobs list, never by a claim.
        "CREATE INDEX offload_jobs_waiting ON offload_jobs (task) WHERE state = 'waiting'",
        """
        CREATE TABLE offload_deps (
            parent text NOT NULL,
            job text NOT NULL,
            position integer NOT NULL,
            done {flag},
            result_json text,
            PRIMARY KEY (parent, job)
        )
        """,
        "CREATE INDEX offload_deps_job ON offload_deps (job, position)",
        # Table-wide upkeep (purge, the unknown-task report, silent workers' rows) is done by
        # the one process holding the "maintenance" lease, renewed while it lives.
        "CREATE TABLE offload_leases (name text PRIMARY KEY, holder text NOT NULL, "
        "until {time} NOT NULL)",
        # PostgreSQL: a claim reads only rows it can take (bench/pg_table.py). The ready index
        # is walked lane by lane, a lane being a (queue, task, priority): a claim skips a
        # paused queue's or an unknown task's lane in one probe, and reads a lane's due rows
        # as a range of run_at, never its delayed ones. Running rows are found by state
        # alone (they are few), so a heartbeat, which writes only lease_until, changes no
        # indexed column and is a HOT update in the page room fillfactor leaves. Autovacuum
        # starts after 1% of the rows are dead or new, not 20%: a queue table turns over.
        Dialects(
            postgresql=(
                "DROP INDEX offload_jobs_claim",
                """
                CREATE INDEX offload_jobs_ready
                    ON offload_jobs (queue, task, priority, run_at, seq) WHERE state = 'queued'
                """,
                "DROP INDEX offload_jobs_lease",
                "CREATE INDEX offload_jobs_running ON offload_jobs (queue) WHERE state = 'running'",
                """
                ALTER TABLE offload_jobs SET (
                    fillfactor = 80,
                    autovacuum_vacuum_scale_factor = 0.01,
                    autovacuum_vacuum_threshold = 1000,
                    autovacuum_vacuum_insert_scale_factor = 0.01,
                    autovacuum_vacuum_insert_threshold = 1000,
                    autovacuum_analyze_scale_factor = 0.02,
                    autovacuum_vacuum_cost_delay = 1)
                """,
            ),
        ),
        # Rate and concurrency limits (backends/limits.py): a job's keys under its task's
        # limits; queued jobs that have one are claimed through their own small index, so
        # jobs of other tasks never enter it. Each limited start is logged for its rate window.
        "ALTER TABLE offload_jobs ADD COLUMN limit_key text",
        "ALTER TABLE offload_jobs ADD COLUMN rate_key text",
        """
        CREATE INDEX offload_jobs_limited ON offload_jobs (priority DESC, run_at, seq)
            WHERE state = 'queued' AND (limit_key IS NOT NULL OR rate_key IS NOT NULL)
        """,
        """
        CREATE TABLE offload_rate_starts (
            task text NOT NULL, key text NOT NULL, at {time} NOT NULL
        )
        """,
        "CREATE INDEX offload_rate_starts_window ON offload_rate_starts (task, at)",
    ),
    # Version 8: the same tables, a new rule for their rows. A finish that ends a job keeps
    # that last attempt in the row (its worker stays) instead of a history entry repeating
    # the row's columns: a job that succeeds at its first attempt stores no history, about
    # 190 of its 400 bytes (rows.settled). Rows written before read as they were, so nothing
    # is rewritten; the number is raised so that an older release, which would read such a
    # row without its last attempt, refuses the store. PostgreSQL keeps its primary key on
    # seq beside the unique id: the jobs list pages newest first by seq (300,000 rows: 5
    # buffers and 0.04 ms with that index, 7,765 buffers and 116 ms without).
    (),
    # Version 9: PostgreSQL's running index holds running rows as the scans of them all name
    # them (``rows.RUNNING_ROWS``), so that statements about given running jobs, which name only
    # their state, go by id whatever the statistics say (see there).
    (
        Dialects(
            postgresql=(
                "DROP INDEX offload_jobs_running",
                """
                CREATE INDEX offload_jobs_running ON offload_jobs (queue)
                    WHERE state = 'running' AND worker IS NOT NULL
                """,
            ),
        ),
    ),
]

# Versions a backend recorded under its own numbering, where the number means another
# version of this list (see the module's docstring).
RELEASED_AS: dict[Dialect, dict[int, int]] = {"sqlite": {}, "postgresql": {5: 6}}


def step(dialect: Dialect, version: int) -> list[str]:
    """The statements of the migration that makes ``version`` (1 creates the tables)."""
    statements: list[str] = []
    for statement in MIGRATIONS[version - 1]:
        if isinstance(statement, Dialects):
            statements.extend(getattr(statement, dialect))
        else:
            statements.append(statement.format_map(TYPES[dialect]))
    return statements


def refuse_newer(version: int, place: str) -> None:
    """Refuse a schema newer than this release knows: a newer release may rely on tables and
    rules this one would break."""
    if version > SCHEMA_VERSION:
        raise StorageError(
            f"{place} holds Flask-Offload schema version {version}, newer than this "
            f"release understands ({SCHEMA_VERSION}); upgrade Flask-Offload"
        )


# -- SQLite: the number is the file header's user_version -------------------------------------


def sqlite_upgrade(version: int, place: str) -> list[str]:
    """The statements that take a SQLite file at ``version`` to this release's schema, its
    number included, to run in one transaction; none if it is there already."""
    refuse_newer(version, place)
    if version == SCHEMA_VERSION:
        return []
    steps = range(RELEASED_AS["sqlite"].get(version, version) + 1, SCHEMA_VERSION + 1)
    statements = [statement for number in steps for statement in step("sqlite", number)]
    return [*statements, f"PRAGMA user_version = {SCHEMA_VERSION}"]


def upgrade_sqlite(db: sqlite3.Connection, place: str) -> None:
    """Create or upgrade the tables of the file ``db`` (autocommitting) is open on, in one
    ``BEGIN IMMEDIATE`` transaction: a process starting beside this one waits for it."""
    if not sqlite_upgrade(_user_version(db), place):
        return
    db.execute("BEGIN IMMEDIATE")
    try:  # read again under the write lock: another process may have upgraded meanwhile
        for statement in sqlite_upgrade(_user_version(db), place):
            db.execute(statement)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _user_version(db: sqlite3.Connection) -> int:
    """The schema version a SQLite file holds (0 for a new file)."""
    return int(db.execute("PRAGMA user_version").fetchone()[0])


# -- PostgreSQL: the number is the highest row of offload_schema ------------------------------

MIGRATION_LOCK = 0x0FF10AD  # pg_advisory_xact_lock key: one migrating process at a time
SCHEMA_TABLE_EXISTS = "SELECT to_regclass('offload_schema') IS NOT NULL"
SCHEMA_VERSION_NOW = "SELECT coalesce(max(version), 0) FROM offload_schema"
LOCK_MIGRATIONS = f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"
CREATE_SCHEMA_TABLE = """
    CREATE TABLE IF NOT EXISTS offload_schema (
        version integer PRIMARY KEY,
        applied_at timestamptz NOT NULL DEFAULT now()
    )
"""
RECORD_VERSION = "INSERT INTO offload_schema (version) VALUES (%s)"


def upgrade_postgres(conn: psycopg.Connection[Any], place: str) -> None:
    """Create or upgrade the tables through ``conn`` (autocommitting), in one transaction,
    one process at a time under an advisory lock."""
    version = 0
    if conn.execute(SCHEMA_TABLE_EXISTS).fetchall()[0][0]:
        version = conn.execute(SCHEMA_VERSION_NOW).fetchall()[0][0]
    if version < SCHEMA_VERSION:
        with conn.transaction():
            conn.execute(LOCK_MIGRATIONS)
            conn.execute(CREATE_SCHEMA_TABLE)
            recorded = conn.execute(SCHEMA_VERSION_NOW).fetchall()[0][0]
            version = RELEASED_AS["postgresql"].get(recorded, recorded)
            if version != recorded:
                conn.execute(RECORD_VERSION, (version,))
            for number in range(version + 1, SCHEMA_VERSION + 1):
                for statement in step("postgresql", number):
                    conn.execute(statement, prepare=False)
                conn.execute(RECORD_VERSION, (number,))
    refuse_newer(version, place)
