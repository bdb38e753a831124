"""The report's "PostgreSQL for a fleet" part (issue 21): the section with the figures of
``pg-fleet`` and ``pg-table`` (bench/fleet.py) and the targets they are held to, each computed
from this run's figures."""

from __future__ import annotations

from typing import Any

from bench import rounds
from bench.figures import Run, Target, X, num, outcome_of, ratio, value, why

CASES = {
    "paused_queue": "queued in a paused queue",
    "unknown_task": "of a task the worker does not run",
    "delayed_higher_priority": "delayed by an hour, at a higher priority",
}
NOTIFY_SHARE = 0.7  # concurrent enqueuers: the least share of the bare insert's rate
MORE_SCANS = 2.0  # idle workers: the most statements per job N of them add over one
IDLE_CPU = 0.5  # idle workers: the most % of a core each


def _data(run: Run, key: str, workload: str) -> dict[str, Any] | None:
    outcome = outcome_of(run, key, workload)
    if outcome is None or outcome.get("status") != "ok":
        return None
    data: dict[str, Any] = outcome["data"]
    return data


def brief(workload: str, data: dict[str, Any]) -> str | None:
    """One progress line for a fleet workload, or None for another workload."""
    if workload == "connections":
        return (
            f"worker --threads 1: {data['worker_threads_1']}, --threads 4: "
            f"{data['worker_threads_4']}, web (16 threads): {data['web_16_threads']} sessions"
        )
    if workload == "idle_fleet":
        one, many = data["one"], data["many"]
        return (
            f"idle claims/s 1: {num(one['idle_claims_per_s'])}, {data['workers']}: "
            f"{num(many['idle_claims_per_s'])}; scans/job 1: {num(one['scans_per_job'])}, "
            f"{data['workers']}: {num(many['scans_per_job'])}"
        )
    if workload == "enqueuers":
        return (
            f"{data['threads']} threads: {num(data['coalesced_jobs_per_s'])} jobs/s "
            f"({data['coalesced_ratio']:.2f}{X} bare), every insert notifying "
            f"{data['notify_every_ratio']:.2f}{X}"
        )
    if workload == "untakeable":
        return f"{data['untakeable_rows']:,} rows: " + ", ".join(
            f"{name} {data[name]['ratio']:.2f}{X}" for name in CASES
        )
    if workload == "finished_rows":
        return f"{data['bytes_per_job']} bytes a finished job, {data['indexes']} indexes"
    if workload == "purge":
        b, one = data["batched"], data["one_delete"]
        return (
            f"{data['rows']:,} rows: batched {b['seconds']} s (at most "
            f"{b['most_rows_per_statement']} a statement), one DELETE {one['seconds']} s"
        )
    if workload == "task_names":
        return f"{data['probes_ms']} ms (SELECT DISTINCT {data['distinct_ms']} ms)"
    return None


# --- targets -------------------------------------------------------------------------------


def targets(run: Run) -> list[Target]:
    """Issue 21's goals, in its order."""
    rows = [*_connections(run), *_idle(run)]
    claims = _data(run, "pg-table", "untakeable")
    untakeable = f"{claims['untakeable_rows']:,}" if claims else "100,000"
    for name, what in CASES.items():
        rows.append(
            ratio(
                f"PostgreSQL claim beside {untakeable} rows {what} within 2{X} of an empty "
                "table's (claim p50)",
                value(run, "pg-table", "untakeable", name, "p50_us"),
                value(run, "pg-table", "untakeable", "empty", "p50_us"),
                "µs",
                lambda r: r <= 2,
            )
        )
    enq = _data(run, "pg-fleet", "enqueuers")
    threads = enq["threads"] if enq else 16
    every = f"every insert notifying: {enq['notify_every_ratio']:.2f}{X}" if enq else ""
    share = value(run, "pg-fleet", "enqueuers", "coalesced_ratio")
    rows.append(
        (
            f"PostgreSQL concurrent enqueuers ({threads} threads) ≥ {NOTIFY_SHARE:g}{X} the bare "
            "insert's jobs/s (at most one NOTIFY per queue per short interval)",
            "not measured"
            if share is None or enq is None
            else f"{num(enq['coalesced_jobs_per_s'])} jobs/s / {num(enq['bare_jobs_per_s'])} "
            f"jobs/s = {share:.2f}{X} ({every})",
            None if share is None else share >= NOTIFY_SHARE,
        )
    )
    rows.append(_purge(run))
    for key, how in (("pgqueuer-defaults", "its default batch of 10"), ("pgqueuer", "batch 50")):
        rows.append(
            rounds.ahead(
                run,
                f"PostgreSQL no-op throughput ahead of PgQueuer ({how}; standalone worker, "
                "side by side)",
                ("offload-postgres", key, "noop"),
                lambda r: r >= 1,
            )
        )
    return rows


def _connections(run: Run) -> list[Target]:
    c = _data(run, "pg-fleet", "connections")
    workers = "≤ 2 server connections per `flask offload worker` process, `--threads` 1 and 4"
    web = (
        "A web process whose 16 threads enqueue at once (`OFFLOAD_WORKERS = 2`) holds ≤ "
        "`OFFLOAD_PG_POOL_SIZE` + 1 (the listener) server connections"
    )
    if c is None:
        return [(f"PostgreSQL: {workers}", "not measured", None), (web, "not measured", None)]
    most = max(c["worker_threads_1"], c["worker_threads_4"])
    return [
        (
            f"PostgreSQL: {workers}",
            f"{c['worker_threads_1']} and {c['worker_threads_4']}",
            most <= 2,
        ),
        (
            web,
            f"{c['web_16_threads']} (bound {c['web_bound']})",
            c["web_16_threads"] <= c["web_bound"],
        ),
    ]


def _idle(run: Run) -> list[Target]:
    d = _data(run, "pg-fleet", "idle_fleet")
    n = d["workers"] if d else 20
    per_job = (
        f"PostgreSQL: about one claim per job whatever the fleet: statements scanning the jobs "
        f"table per job with {n} idle workers ≤ one worker's + {MORE_SCANS:g}"
    )
    threads = f"PostgreSQL idle claims/s of a `--threads 4` worker ≤ 1.5{X} a `--threads 1` one's"
    cpu = f"PostgreSQL idle CPU < {IDLE_CPU:g} % of a core per worker process, 1 and {n} idle"
    if d is None:
        return [(what, "not measured", None) for what in (per_job, threads, cpu)]
    one, many, four = d["one"], d["many"], d["one_4_threads"]
    more = many["scans_per_job"] - one["scans_per_job"]
    each = many["idle_cpu_pct"] / n
    return [
        (
            per_job,
            f"{num(many['scans_per_job'])} with {n}, {num(one['scans_per_job'])} with 1 "
            f"({more:+.1f})",
            more <= MORE_SCANS,
        ),
        ratio(
            threads,
            four["idle_claims_per_s"],
            one["idle_claims_per_s"],
            "claims/s",
            lambda r: r <= 1.5,
        ),
        (
            cpu,
            f"{num(one['idle_cpu_pct'])} % (1), {num(each)} % each ({n}: "
            f"{num(many['idle_cpu_pct'])} % together)",
            max(one["idle_cpu_pct"], each) < IDLE_CPU,
        ),
    ]


def _purge(run: Run) -> Target:
    d = _data(run, "pg-table", "purge")
    rows = f"{d['rows']:,}" if d else "1,000,000"
    limit = f"{d['batched']['batch_limit']:,}" if d else "1,000"
    what = f"PostgreSQL purge of {rows} finished rows in bounded batches (≤ {limit} rows a DELETE)"
    if d is None:
        return what, "not measured", None
    b, one = d["batched"], d["one_delete"]
    return (
        what,
        f"at most {b['most_rows_per_statement']:,} in {b['statements']:,} statements, "
        f"{b['seconds']} s, {b['wal_mb']} MB WAL (one DELETE: {one['seconds']} s, "
        f"{one['wal_mb']} MB)",
        b["most_rows_per_statement"] <= b["batch_limit"],
    )


# --- the section ---------------------------------------------------------------------------


def section(run: Run) -> list[str]:
    """The "PostgreSQL for a fleet" section, or nothing if neither part ran."""
    keys = ("pg-fleet", "pg-table")
    if not any(run["results"].get(key) for key in keys):
        return []
    lines = [
        "## PostgreSQL for a fleet",
        "",
        "`python -m bench.fleet` runs the parts of `bench/pg_fleet.py` (system `pg-fleet`) and "
        "`bench/pg_table.py` (`pg-table`), each in a process of its own on throwaway databases; "
        "`python -m bench.pg_fleet` and `python -m bench.pg_table` run them standalone. The "
        "targets above marked PostgreSQL read these tables.",
        "",
    ]
    for part in (_connections_table, _idle_table, _claims_table, _enqueuers_table, _table_rows):
        lines += part(run)
    return lines


def _missing(run: Run, key: str, workload: str, title: str) -> list[str] | None:
    outcome = outcome_of(run, key, workload)
    if outcome is None:
        return []
    if outcome.get("status") != "ok":
        return [f"**{title}.** {why(outcome)}", ""]
    return None


def _connections_table(run: Run) -> list[str]:
    title = "Connections per process"
    missing = _missing(run, "pg-fleet", "connections", title)
    if missing is not None:
        return missing
    c = _data(run, "pg-fleet", "connections") or {}
    return [
        f"**{title}** (`connections`). Server sessions (`pg_stat_activity` by "
        "`application_name`) of two worker processes after they ran 400 jobs, and of a web "
        "process with an in-process pool right after 16 of its threads enqueued 50 jobs each.",
        "",
        "| Process | server connections | at most |",
        "| --- | --: | --: |",
        f"| `flask offload worker --threads 1` | {c['worker_threads_1']} | 2 |",
        f"| `flask offload worker --threads 4` | {c['worker_threads_4']} | 2 |",
        f"| web process (`OFFLOAD_WORKERS = 2`), 16 threads enqueuing | {c['web_16_threads']} "
        f"| {c['web_bound']} |",
        "",
    ]


def _idle_table(run: Run) -> list[str]:
    title = "Idle workers"
    missing = _missing(run, "pg-fleet", "idle_fleet", title)
    if missing is not None:
        return missing
    d = _data(run, "pg-fleet", "idle_fleet") or {}
    n = d["workers"]
    lines = [
        f"**{title}** (`idle_fleet`). Worker processes (`OFFLOAD_POLL_INTERVAL` 1 s) with "
        "nothing queued: statements scanning `offload_jobs` per second (`pg_stat_user_tables`: "
        "each claim scans it once) and the workers' CPU, all together. Then "
        f"{d['jobs']} jobs enqueued one at a time by another process: statements scanning "
        "the table per job, the idle rate taken out. With one worker a job's statements are "
        "its own (its claim, its finish, the look for more after it ran); what "
        f"{n} idle workers add is claims that found nothing.",
        "",
        "| Idle workers | claims/s | CPU % of a core | statements per job |",
        "| --- | --: | --: | --: |",
    ]
    for label, row in (
        ("1, `--threads 4`", d["one_4_threads"]),
        ("1, `--threads 1`", d["one"]),
        (f"{n}, `--threads 1`", d["many"]),
    ):
        lines.append(
            f"| {label} | {num(row['idle_claims_per_s'])} | {num(row['idle_cpu_pct'])} | "
            f"{num(row.get('scans_per_job'))} |"
        )
    return [*lines, ""]


def _claims_table(run: Run) -> list[str]:
    title = "A claim beside rows it cannot take"
    missing = _missing(run, "pg-table", "untakeable", title)
    if missing is not None:
        return missing
    d = _data(run, "pg-table", "untakeable") or {}
    lines = [
        f"**{title}** (`untakeable`). `Backend.claim` of one due job, on four databases side "
        f"by side: an empty table, and {d['untakeable_rows']:,} rows the claim cannot take "
        "beside that job; rounds alternate the databases' order. Buffers: what one claim "
        "reads (EXPLAIN ANALYZE BUFFERS), which a busy machine does not blur.",
        "",
        f"| Table | claim p50 µs | {X} empty | {X} empty, median of rounds | buffers |",
        "| --- | --: | --: | --: | --: |",
    ]
    for name, label in (("empty", "empty"), *CASES.items()):
        row = d[name]
        shown = label if name == "empty" else f"{d['untakeable_rows']:,} rows {label}"
        lines.append(
            f"| {shown} | {num(row['p50_us'])} | {row['ratio']:.2f} | "
            f"{row['ratio_of_rounds']:.2f} | {row['buffers']} |"
        )
    return [*lines, ""]


def _enqueuers_table(run: Run) -> list[str]:
    title = "Concurrent enqueuers"
    missing = _missing(run, "pg-fleet", "enqueuers", title)
    if missing is not None:
        return missing
    d = _data(run, "pg-fleet", "enqueuers") or {}
    return [
        f"**{title}** (`enqueuers`). {d['threads']} threads, one pooled connection each, "
        f"{d['per_thread']:,} jobs each; the best of 3 alternating rounds.",
        "",
        f"| Enqueue | jobs/s | {X} bare insert |",
        "| --- | --: | --: |",
        f"| `Backend.enqueue` (one NOTIFY per queue per 5 ms) | "
        f"{num(d['coalesced_jobs_per_s'])} | {d['coalesced_ratio']:.2f} |",
        f"| `Backend.enqueue`, every insert notifying | {num(d['notify_every_jobs_per_s'])} | "
        f"{d['notify_every_ratio']:.2f} |",
        f"| the bare insert of the same row, no NOTIFY | {num(d['bare_jobs_per_s'])} | 1.00 |",
        "",
    ]


def _table_rows(run: Run) -> list[str]:
    """The finished rows, the purge and the unknown-task report's read, a paragraph each."""
    lines: list[str] = []
    title = "Finished rows"
    missing = _missing(run, "pg-table", "finished_rows", title)
    t = _data(run, "pg-table", "finished_rows")
    if missing is not None:
        lines += missing
    elif t is not None:
        lines += [
            f"**{title}** (`finished_rows`). {t['jobs']:,} jobs enqueued, claimed 50 at a "
            f"time and finished, then a VACUUM: {t['bytes_per_job']} bytes a finished job "
            f"({t['heap_bytes_per_job']} in the heap, {t['index_bytes_per_job']} in "
            f"{t['indexes']} indexes); {_share(t['hot_update_share'])} of the updates were HOT; "
            f"{num(t['dead_tuples_per_job'])} dead tuples a job left for autovacuum.",
            "",
        ]
    title = "Purge"
    missing = _missing(run, "pg-table", "purge", title)
    p = _data(run, "pg-table", "purge")
    if missing is not None:
        lines += missing
    elif p is not None:
        b, one = p["batched"], p["one_delete"]
        lines += [
            f"**{title}** (`purge`). {p['rows']:,} finished rows purged by `Backend.purge` and, "
            "on an identical database, by schema 6's one DELETE.",
            "",
            "| Purge | seconds | WAL MB | statements | most rows a statement |",
            "| --- | --: | --: | --: | --: |",
            f"| `Backend.purge` | {b['seconds']} | {b['wal_mb']} | {b['statements']:,} | "
            f"{b['most_rows_per_statement']:,} |",
            f"| one DELETE | {one['seconds']} | {one['wal_mb']} | 1 | {one['rows']:,} |",
            "",
        ]
    title = "Queued task names"
    missing = _missing(run, "pg-table", "task_names", title)
    q = _data(run, "pg-table", "task_names")
    if missing is not None:
        lines += missing
    elif q is not None:
        lines += [
            f"**{title}** (`task_names`). The unknown-task report's read with "
            f"{q['queued_rows']:,} queued rows of 20 tasks: {q['probes_ms']} ms (one probe per "
            f"queue and task), against {q['distinct_ms']} ms for `SELECT DISTINCT task`.",
            "",
        ]
    return lines


def _share(x: float | None) -> str:
    return "—" if x is None else f"{x:.0%}"
