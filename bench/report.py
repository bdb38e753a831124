"""Turn one run's results into ``benchmarks.md`` (tables, targets, versions, the command) and
``benchmarks.png`` (matplotlib, Agg). Every ratio compares figures of the same run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bench import report_fleet, rounds
from bench.figures import (
    Run,
    Target,
    X,
    at_most,
    below,
    mark,
    num,
    outcome_of,
    ratio,
    value,
    why,
)

FAMILY_TITLES = {"floor": "Floors", "offload": "Flask-Offload", "peer": "Peers"}
COLORS = {"floor": "#9e9e9e", "offload": "#1f77b4", "peer": "#ff7f0e"}


def enqueue_of(run: Run, key: str) -> str:
    """The workload behind a system's enqueue figures: ``enqueue``, or ``enqueue_busy`` for
    the in-process pool, whose enqueue is measured with that pool busy."""
    found = run["results"].get(key, {})
    return "enqueue_busy" if "enqueue" not in found and "enqueue_busy" in found else "enqueue"


def brief(workload: str, outcome: dict[str, Any]) -> str:
    """One line for the progress log."""
    status = outcome.get("status")
    wall = f" ({outcome.get('wall_s', 0):.1f} s)"
    if status != "ok":
        where = f" [{outcome['log']}]" if outcome.get("log") and status == "error" else ""
        return f"{status}: {outcome.get('reason', '')}{where}{wall}"
    data = outcome["data"]
    fleet = report_fleet.brief(workload, data)
    if fleet is not None:
        text = fleet
    elif workload in ("enqueue", "enqueue_busy"):
        s = data["enqueue_us"]
        text = f"mean {num(s['mean'])} µs, p50 {num(s['p50'])} µs, p99 {num(s['p99'])} µs"
        if workload == "enqueue_busy":
            text += f", backlog ≥ {data['backlog_min']:,} jobs"
    elif workload in ("noop", "sleep"):
        text = f"{num(data.get('jobs_per_s'))} jobs/s (start-up {data['startup_s']:.2f} s)"
    elif workload == "latency":
        s = data["start_ms"]
        text = f"p50 {num(s['p50'])} ms, p99 {num(s['p99'])} ms ({s['n']} samples)"
    elif workload == "idle":
        text = f"{data['idle_cpu_pct']:.2f} % CPU over {data['idle_window_s']:.0f} s"
    elif workload == "rss":
        text = (
            f"RSS {num(data['rss_start_mb'])} → {num(data['rss_middle_mb'])} → "
            f"{num(data['rss_end_mb'])} MB over {data['jobs']:,} jobs"
        )
    elif workload == "due":
        s = data["lateness_ms"]
        text = (
            f"lateness p50 {num(s['p50'])} ms, p99 {num(s['p99'])} ms, max {num(s['max'])} ms "
            f"({s['n']}/{data['jobs']} jobs)"
        )
    elif workload == "async_sleep":
        text = (
            f"jobs waiting {num(data['wait_ms'])} ms: {num(data['async_jobs_per_s'])} jobs/s as "
            f"coroutines, {num(data['threads_jobs_per_s'])} as threads "
            f"({X}{data['async_over_threads']:.1f})"
        )
    elif workload == "claim":
        text = (
            f"claim mean {num(data['empty']['claim_us']['mean'])} µs empty, "
            f"{num(data['deep']['claim_us']['mean'])} µs with {data['deep_rows']:,} finished "
            f"rows ({X}{data['deep_over_empty']:.2f})"
        )
    elif workload == "cpu_requests":
        text = ", ".join(
            f"{setup} p50 {num(data[setup]['ms']['p50'])} ms"
            + (f" ({data[setup]['p50_ratio']:.2f}{X})" if "p50_ratio" in data[setup] else "")
            for setup in ("none", "in_process", "processes")
        )
    else:
        text = str(data)
    if data.get("note"):
        text += f" — {data['note']}"
    return text + wall


# --- targets -------------------------------------------------------------------------------


def _lateness(run: Run, key: str, name: str, limit: float) -> Target:
    """A due-workload target: the p99 lateness of delayed jobs, every job counted."""
    outcome = outcome_of(run, key, "due")
    poll = value(run, key, "due", "poll_interval_s")
    what = (
        f"{name}: a delayed job enqueued by another process starts ≤ {limit:g} ms late "
        f"(p99 of stored started_at - run_at, worker polling every {poll or 30:g} s)"
    )
    late = value(run, key, "due", "lateness_ms", "p99")
    if late is None or outcome is None:
        return what, "not measured", None
    data = outcome["data"]
    s = data["lateness_ms"]
    measured = (
        f"p99 {num(s['p99'])} ms (p50 {num(s['p50'])}, max {num(s['max'])}; "
        f"{s['n']}/{data['jobs']} jobs)"
    )
    return what, measured, late <= limit and s["n"] == data["jobs"]


def targets(run: Run) -> list[Target]:
    """The issue's targets, each computed from figures of this run."""
    v = value
    rows = [
        ratio(
            f"SQLite enqueue p50 ≤ 1.5{X} raw SQLite insert+commit (no worker running)",
            v(run, "offload-sqlite-worker", "enqueue", "enqueue_us", "p50"),
            v(run, "floor-sqlite", "enqueue", "enqueue_us", "p50"),
            "µs",
            lambda r: r <= 1.5,
        ),
        ratio(
            f"SQLite enqueue p50 ≤ 3{X} raw SQLite insert+commit p50, while the process's own "
            "pool (2 threads) runs the no-op jobs it enqueued",
            v(run, "offload-sqlite", "enqueue_busy", "enqueue_us", "p50"),
            v(run, "floor-sqlite", "enqueue", "enqueue_us", "p50"),
            "µs",
            lambda r: r <= 3,
        ),
        ratio(
            f"SQLite enqueue p99 ≤ 25{X} raw SQLite insert+commit p50, own pool busy (as above)",
            v(run, "offload-sqlite", "enqueue_busy", "enqueue_us", "p99"),
            v(run, "floor-sqlite", "enqueue", "enqueue_us", "p50"),
            "µs",
            lambda r: r <= 25,
        ),
        rounds.ahead(
            run,
            f"SQLite no-op throughput ≥ 4{X} Huey SqliteHuey (in-process workers)",
            ("offload-sqlite", "huey-sqlite", "noop"),
            lambda r: r >= 4,
        ),
        ratio(
            f"A trivial view's p50 with CPU-bound jobs on `worker --processes 2` ≤ 1.5{X} its "
            "p50 with no job running, interleaved (gunicorn, SQLite; `cpu_requests`)",
            v(run, "offload-sqlite", "cpu_requests", "processes", "ms", "p50"),
            v(run, "offload-sqlite", "cpu_requests", "processes", "idle_ms", "p50"),
            "ms",
            lambda r: r <= 1.5,
        ),
        ratio(
            "SQLite no-op throughput ≥ the raw per-claim loop (in-process workers)",
            v(run, "offload-sqlite", "noop", "jobs_per_s"),
            v(run, "floor-sqlite", "noop", "jobs_per_s"),
            "jobs/s",
            lambda r: r >= 1,
        ),
        ratio(
            "Standalone SQLite worker no-op throughput ≥ the in-process pool's",
            v(run, "offload-sqlite-worker", "noop", "jobs_per_s"),
            v(run, "offload-sqlite", "noop", "jobs_per_s"),
            "jobs/s",
            lambda r: r >= 1,
        ),
        below(
            "In-process enqueue-to-start p50 < 1 ms",
            v(run, "offload-sqlite", "latency", "start_ms", "p50"),
            "ms",
            1.0,
        ),
        at_most(
            "SQLite enqueue-to-start p50 ≤ 5 ms, enqueued with OFFLOAD_WORKERS = 0 and run by "
            "`flask offload worker` on the same file",
            v(run, "offload-sqlite-worker", "latency", "start_ms", "p50"),
            "ms",
            5.0,
            _beside("SqliteHuey", v(run, "huey-sqlite", "latency", "start_ms", "p50"), "ms"),
        ),
        below(
            "Idle worker CPU < 0.5 % (in-process pool)",
            v(run, "offload-sqlite", "idle", "idle_cpu_pct"),
            "%",
            0.5,
        ),
        below(
            "Idle worker CPU < 0.5 % (standalone SQLite worker)",
            v(run, "offload-sqlite-worker", "idle", "idle_cpu_pct"),
            "%",
            0.5,
        ),
        below(
            "Idle worker CPU < 0.5 % (standalone PostgreSQL worker)",
            v(run, "offload-postgres", "idle", "idle_cpu_pct"),
            "%",
            0.5,
        ),
        _lateness(run, "offload-sqlite-worker", "SQLite", 50.0),
        _lateness(run, "offload-postgres", "PostgreSQL", 10.0),
    ]
    jobs = v(run, "offload-sqlite", "rss", "jobs")
    rows.append(
        below(
            f"RSS growth < 20 MB over {f'{jobs:,.0f}' if jobs else '1,000,000'} jobs",
            v(run, "offload-sqlite", "rss", "growth_mb"),
            "MB",
            20.0,
        )
    )
    for key, name in (("offload-sqlite", "SQLite"), ("offload-postgres", "PostgreSQL")):
        deep = v(run, key, "claim", "deep_rows")
        rows.append(
            ratio(
                f"{name} claim with {f'{deep:,.0f}' if deep else '1,000,000'} finished rows "
                "within 20 % of an empty table (mean claim time)",
                v(run, key, "claim", "deep", "claim_us", "mean"),
                v(run, key, "claim", "empty", "claim_us", "mean"),
                "µs",
                lambda r: r <= 1.2,
            )
        )
    rows += [
        ratio(
            f"PostgreSQL enqueue p50 ≤ 1.3{X} raw insert+commit",
            v(run, "offload-postgres", "enqueue", "enqueue_us", "p50"),
            v(run, "floor-postgres", "enqueue", "enqueue_us", "p50"),
            "µs",
            lambda r: r <= 1.3,
        ),
        ratio(
            f"PostgreSQL no-op throughput ≥ 3{X} procrastinate",
            v(run, "offload-postgres", "noop", "jobs_per_s"),
            v(run, "procrastinate", "noop", "jobs_per_s"),
            "jobs/s",
            lambda r: r >= 3,
        ),
        ratio(
            "PostgreSQL no-op throughput ≥ the raw SKIP LOCKED loop",
            v(run, "offload-postgres", "noop", "jobs_per_s"),
            v(run, "floor-postgres", "noop", "jobs_per_s"),
            "jobs/s",
            lambda r: r >= 1,
        ),
        below(
            "PostgreSQL NOTIFY wake-up (enqueue-to-start, standalone worker) p50 < 5 ms",
            v(run, "offload-postgres", "latency", "start_ms", "p50"),
            "ms",
            5.0,
        ),
    ]
    rows += report_fleet.targets(run)
    return rows


def _beside(name: str, x: float | None, unit: str) -> str:
    return "" if x is None else f"{name}: {num(x)} {unit}"


def target_lines(run: Run) -> list[str]:
    return [f"{mark(holds)} {what}: {measured}" for what, measured, holds in targets(run)]


# --- markdown ------------------------------------------------------------------------------


def _cell(run: Run, key: str, workload: str, *path: str, unit: str = "") -> str:
    outcome = outcome_of(run, key, workload)
    if outcome is None:
        return ""
    if outcome.get("status") == "skipped":
        return "skipped" if not str(outcome.get("reason", "")).startswith("workload") else ""
    if outcome.get("status") != "ok":
        return "error"
    text = num(value(run, key, workload, *path), unit)
    if outcome.get("data", {}).get("note"):
        text += "*"
    return text


def markdown(run: Run, chart: tuple[Path | None, str]) -> str:
    quick = run["mode"] == "quick"
    counts = run["counts"]
    systems = run["systems"]
    lines = ["# Benchmarks", ""]
    if quick:
        lines += [
            "> **Quick mode**: tiny counts to check that the harness works. These figures say "
            "nothing about speed; see the full run for that.",
            "",
        ]
    lines += [
        f"Measured by `{run['command']}` on {run['started'][:16].replace('T', ' ')} UTC, "
        f"{run['versions']['CPU']}, in {run['seconds'] / 60:.1f} minutes. Every system ran "
        "on the same machine, one at a time, each (system, workload) in a fresh process with "
        "fresh state; every ratio below compares figures of this one run. Load average "
        f"(1, 5, 15 min) at the start: {_load(run, 'start')}; at the end: {_load(run, 'end')}.",
        "",
    ]
    for update in run.get("updates", []):
        lines += [
            f"Re-run later by `{update['command']}` on "
            f"{update['started'][:16].replace('T', ' ')} UTC (Flask-Offload {update['version']}), "
            f"in place of this run's own: {', '.join(update['rows'])}.",
            "",
        ]
    lines += [
        "## Targets",
        "",
        "| Target | Measured | Holds |",
        "| --- | --- | :-: |",
    ]
    for what, measured, holds in targets(run):
        lines.append(f"| {what} | {measured} | {mark(holds)} |")
    lines += [
        "",
        "✓ holds, ✗ does not, — not measured in this run (system skipped or failed).",
        "",
        "## All systems",
        "",
        f"Enqueue: {counts['enqueue']:,} jobs one by one from one thread, no worker running, "
        "except the in-process row (`enqueue_busy`): its own pool of 2 threads is kept busy "
        "meanwhile with a backlog of no-op jobs the same thread enqueued. Throughput: "
        f"{counts['jobs']:,} jobs queued first, then 2 workers started, jobs/s from the first "
        "job's start to the last job's end. Enqueue→start: one job at a time to idle workers. "
        f"Idle CPU: a waiting worker over {counts['idle']:g} s, % of one core.",
        "",
        "| System | Enqueue mean µs | p50 µs | p99 µs | No-op jobs/s | 1 ms jobs/s "
        "| Enqueue→start p50 ms | p99 ms | Idle CPU % |",
        "| --- | --: | --: | --: | --: | --: | --: | --: | --: |",
    ]
    family = None
    for system in systems:
        if system["family"] not in FAMILY_TITLES:  # the fleet's parts: a section of their own
            continue
        if system["family"] != family:
            family = system["family"]
            lines.append(f"| **{FAMILY_TITLES[family]}** | | | | | | | | |")
        key = system["key"]
        enqueue = enqueue_of(run, key)
        cells = [
            _cell(run, key, enqueue, "enqueue_us", "mean"),
            _cell(run, key, enqueue, "enqueue_us", "p50"),
            _cell(run, key, enqueue, "enqueue_us", "p99"),
            _cell(run, key, "noop", "jobs_per_s"),
            _cell(run, key, "sleep", "jobs_per_s"),
            _cell(run, key, "latency", "start_ms", "p50"),
            _cell(run, key, "latency", "start_ms", "p99"),
            _cell(run, key, "idle", "idle_cpu_pct"),
        ]
        lines.append(f"| {system['label']} | " + " | ".join(cells) + " |")
    lines += ["", "A blank cell: the workload does not apply to that system.", ""]

    notes = []
    for system in systems:
        for workload, outcome in run["results"].get(system["key"], {}).items():
            data = outcome.get("data") or {}
            if outcome.get("status") == "ok" and data.get("note"):
                notes.append(f"- \\* {system['label']}, {workload}: {data['note']}")
    if notes:
        lines += [*notes, ""]

    lines += _offload_only(run)
    lines += report_fleet.section(run)
    lines += [
        "The dashboard's pages and `/metrics` with 1,000,000 finished jobs are timed by "
        "`python -m bench.dashboard`: [dashboard-benchmarks.md](dashboard-benchmarks.md).",
        "",
    ]
    lines += _skipped(run)
    path, note = chart
    lines += ["## Chart", ""]
    lines += [f"![Benchmarks]({path.name})", ""] if path else [note, ""]
    lines += _method(run)
    lines += ["## Versions", "", "| Component | Version |", "| --- | --- |"]
    lines += [f"| {name} | {version} |" for name, version in run["versions"].items()]
    lines += [
        "",
        "## Reproduce",
        "",
        "```sh",
        "python3 -m pip install -e . -r bench/requirements.txt"
        "   # the peers, psycopg and matplotlib",
        f"{run['command']}",
        "```",
        "",
        "Needs PostgreSQL (127.0.0.1:5432, user postgres, trust), Redis (127.0.0.1:6379; db "
        "15 is flushed) and RabbitMQ (127.0.0.1:5672, guest) on the same machine; a system "
        "whose package or service is missing is reported as skipped. `python -m bench --quick` "
        "runs the harness with tiny counts in about a minute (the test suite does, in "
        "`tests/test_bench_quick.py`); `--only KEY,...` and `--workloads ...` pick parts "
        "(`--list` shows the keys).",
        "",
    ]
    return "\n".join(lines)


def _load(run: Run, when: str) -> str:
    load = run.get("load", {}).get(when)
    return ", ".join(f"{x:.2f}" for x in load) if load else "unknown"


def _offload_only(run: Run) -> list[str]:
    lines = ["## Flask-Offload only", ""]
    rss = outcome_of(run, "offload-sqlite", "rss")
    if rss and rss.get("status") == "ok":
        d = rss["data"]
        lines += [
            f"**Memory.** One process with the in-process pool (SQLite, 2 threads) enqueues "
            f"and runs {d['jobs']:,} no-op jobs in chunks, the finished rows kept (default "
            f"`OFFLOAD_RESULT_TTL`). RSS after the first {d['start_after_jobs']:,} jobs: "
            f"{num(d['rss_start_mb'])} MB; half-way: {num(d['rss_middle_mb'])} MB; at the end: "
            f"{num(d['rss_end_mb'])} MB (growth {d['growth_mb']:+.1f} MB, peak "
            f"{num(d['rss_max_mb'])} MB); {num(d['jobs_per_s'])} jobs/s enqueued and run.",
            "",
        ]
    else:
        lines += [f"**Memory.** {why(rss)}", ""]
    lines += _busy(run)
    lines += _async(run)
    lines += _due(run)
    lines += _cpu_requests(run)
    for key, name in (("offload-sqlite", "SQLite"), ("offload-postgres", "PostgreSQL")):
        claim = outcome_of(run, key, "claim")
        if claim and claim.get("status") == "ok":
            d = claim["data"]
            e, k = d["empty"]["claim_us"], d["deep"]["claim_us"]
            ef, kf = d["empty"]["finish_us"], d["deep"]["finish_us"]
            lines += [
                f"**Claim, {name}.** `Backend.claim` of one job at a time ({e['n']:,} claims, "
                f"each followed by `finish`), in {d['rounds']} alternating rounds on a "
                f"table with no finished rows and on one with {d['deep_rows']:,} finished rows "
                f"(filled in {d['fill_s']:.0f} s):",
                "",
                "| Table | claim mean µs | p50 µs | p99 µs | finish mean µs |",
                "| --- | --: | --: | --: | --: |",
                f"| empty | {num(e['mean'])} | {num(e['p50'])} | {num(e['p99'])} | "
                f"{num(ef['mean'])} |",
                f"| {d['deep_rows']:,} finished rows | {num(k['mean'])} | {num(k['p50'])} | "
                f"{num(k['p99'])} | {num(kf['mean'])} |",
                "",
            ]
        elif claim is not None:
            lines += [f"**Claim, {name}.** {why(claim)}", ""]
    return lines


def _busy(run: Run) -> list[str]:
    """The enqueue_busy workload beside the idle enqueue and the raw insert it is held to."""
    busy = outcome_of(run, "offload-sqlite", "enqueue_busy")
    if busy is None:
        return []
    if busy.get("status") != "ok":
        return [f"**Enqueue under load, SQLite.** {why(busy)}", ""]
    d = busy["data"]
    raw = value(run, "floor-sqlite", "enqueue", "enqueue_us", "p50")
    lines = [
        "**Enqueue under load, SQLite** (`enqueue_busy`). `.delay()` timed "
        f"{d['enqueue_us']['n']:,} times back to back in a process whose own pool (2 threads) "
        f"runs no-op jobs this process enqueued: {d['queued_before']:,} queued first (two "
        "threads run no-op jobs faster than one thread enqueues them), then the pool started "
        f"and timing begun once it had run a job (after {d['first_job_s']:.2f} s). The "
        f"backlog (enqueued - run), read every {d['every']} calls, was at least "
        f"{d['backlog_min']:,} jobs (median {num(d['backlog']['p50'])}); the pool ran "
        f"{d['run_during']:,} jobs in all. Beside it, the same `.delay()` with no worker "
        "running and the raw insert+commit; the ratios divide by the raw insert's p50.",
        "",
        f"| Enqueue | mean µs | p50 µs | p99 µs | p50 {X} raw p50 | p99 {X} raw p50 |",
        "| --- | --: | --: | --: | --: | --: |",
    ]
    for label, key, workload in (
        ("in-process pool busy", "offload-sqlite", "enqueue_busy"),
        ("no worker running", "offload-sqlite-worker", "enqueue"),
        ("raw insert+commit", "floor-sqlite", "enqueue"),
    ):
        row = [value(run, key, workload, "enqueue_us", q) for q in ("mean", "p50", "p99")]
        ratios = [f"{x / raw:.2f}" if x is not None and raw else "—" for x in row[1:]]
        lines.append(f"| {label} | " + " | ".join([*(num(x) for x in row), *ratios]) + " |")
    return [*lines, ""]


def _async(run: Run) -> list[str]:
    """The async_sleep workload: jobs that wait, as coroutines and as threads, side by side."""
    waits = outcome_of(run, "offload-sqlite", "async_sleep")
    if waits is None:
        return []
    if waits.get("status") != "ok":
        return [f"**Async tasks, SQLite.** {why(waits)}", ""]
    d = waits["data"]
    runs = d["runs_per_s"]
    return [
        f"**Async tasks, SQLite** (`async_sleep`). {d['jobs']:,} jobs that each wait "
        f"{num(d['wait_ms'])} ms, run by the in-process pool of {d['threads']} threads: an "
        "`async def` task awaiting `asyncio.sleep` (coroutines on the pool's event loop, "
        "`OFFLOAD_ASYNC_CONCURRENCY` at its default of 100) and a plain task calling "
        f"`time.sleep` (one job per thread), in {d['rounds']} rounds that alternate which goes "
        "first; the best round of each, from the pool's start to the last job run.",
        "",
        f"| Jobs waiting {num(d['wait_ms'])} ms | jobs/s | each round | {X} threads |",
        "| --- | --: | --: | --: |",
        f"| `async def`, `await asyncio.sleep` | {num(d['async_jobs_per_s'])} | "
        f"{', '.join(num(x) for x in runs['async'])} | {d['async_over_threads']:.1f} |",
        f"| plain task, `time.sleep` | {num(d['threads_jobs_per_s'])} | "
        f"{', '.join(num(x) for x in runs['threads'])} | 1.0 |",
        "",
    ]


def _due(run: Run) -> list[str]:
    """The due workload: lateness of delayed jobs stored by another process."""
    rows = [
        ("offload-sqlite-worker", "Flask-Offload SQLite, standalone worker"),
        ("offload-postgres", "Flask-Offload PostgreSQL, standalone worker"),
        ("huey-sqlite", "Huey SqliteHuey"),
    ]
    found = [(key, label, outcome_of(run, key, "due")) for key, label in rows]
    if all(outcome is None for _, _, outcome in found):
        return []
    window, poll = (0.2, 1.5), 30.0
    for _, _, outcome in found:
        if outcome and outcome.get("status") == "ok":
            window = tuple(outcome["data"]["window_s"])
            poll = outcome["data"].get("poll_interval_s", poll)
            break
    lines = [
        "**Delayed jobs stored by another process** (`due`). A worker process is started "
        f"and left idle (Flask-Offload's with `FLASK_OFFLOAD_POLL_INTERVAL={poll:g}`, so only a "
        "wake-up can start a job on time); the measuring process (`OFFLOAD_WORKERS = 0`) then "
        f"enqueues {run['counts'].get('due', 0):,} no-op jobs at once, each due "
        f"{window[0]:g} to {window[1]:g} s ahead at random. Lateness: Flask-Offload's stored "
        "`started_at - run_at` (the claim); SqliteHuey's (`task.schedule(delay=…)`, its "
        "scheduler ticking once a second) is the job body's start minus its due time.",
        "",
        "| System | jobs started | lateness p50 ms | p99 ms | max ms | 5 latest, ms "
        "| started early |",
        "| --- | --: | --: | --: | --: | --: | --: |",
    ]
    for _key, label, outcome in found:
        if outcome is None:
            continue
        if outcome.get("status") != "ok":
            lines.append(f"| {label} | {outcome.get('status')} | | | | | |")
            continue
        d = outcome["data"]
        s = d["lateness_ms"]
        lines.append(
            f"| {label} | {s['n']}/{d['jobs']} | {num(s['p50'])} | {num(s['p99'])} | "
            f"{num(s['max'])} | {', '.join(num(x) for x in d.get('worst_ms', []))} | "
            f"{d['early']} |"
        )
    return [*lines, ""]


def _cpu_requests(run: Run) -> list[str]:
    """The cpu_requests workload: a trivial view's latency beside CPU-bound jobs."""
    outcome = outcome_of(run, "offload-sqlite", "cpu_requests")
    if outcome is None:
        return []
    if outcome.get("status") != "ok":
        return [f"**Requests beside CPU-bound jobs.** {why(outcome)}", ""]
    d = outcome["data"]
    load = ", ".join(f"{x:.2f}" for x in d.get("load", []))
    lines = [
        "**Requests beside CPU-bound jobs** (`cpu_requests`, `python -m bench.cpu_requests`). "
        "A real gunicorn (one gthread worker, 4 threads, its own pool of 2 threads) serves a "
        f"trivial view, asked {d['requests']:,} times one request after the other, in three "
        "setups side by side, each on a fresh SQLite file: no jobs; CPU-bound jobs (a "
        f"pure-Python loop of {d['burn']:,} iterations, about 50 ms; a backlog of "
        f"{d['backlog']:,}) in the web process's own pool; the same jobs on queue `cpu`, run "
        "by `flask offload worker --queues cpu --processes 2 --threads 1` while the web "
        f"process's pool serves `default` only. With jobs, the requests go in {d['blocks']} "
        "rounds of two blocks, one with queue `cpu` paused and no job running, one with two "
        "jobs running, so that the machine's other load weighs on both alike; the ratios "
        f"divide the loaded figure by the interleaved no-job one. Load average at the end: "
        f"{load} ({os.cpu_count()} cores).",
        "",
        "| Setup | p50 ms | p95 ms | no job running: p50 ms | p95 ms | p50 ratio | p95 ratio "
        "| CPU jobs/s meanwhile | still queued |",
        "| --- | --: | --: | --: | --: | --: | --: | --: | --: |",
    ]
    for setup, label in (
        ("none", "no jobs"),
        ("in_process", "in-process pool (2 threads)"),
        ("processes", "`worker --processes 2`"),
    ):
        row = d[setup]
        idle = row.get("idle_ms", row["ms"])
        ratios = [f"{row[k]:.2f}{X}" if k in row else "—" for k in ("p50_ratio", "p95_ratio")]
        jobs = f"{row['cpu_jobs_per_s']:.1f}" if "idle_ms" in row else "—"
        lines.append(
            f"| {label} | {num(row['ms']['p50'])} | {num(row['ms']['p95'])} | "
            f"{num(idle['p50'])} | {num(idle['p95'])} | {' | '.join(ratios)} | {jobs} | "
            f"{row['cpu_jobs_left']:,} |"
        )
    return [*lines, ""]


def _skipped(run: Run) -> list[str]:
    lines = []
    for system in run["systems"]:
        outcomes = run["results"].get(system["key"], {})
        reasons = {
            str(o.get("reason"))
            for o in outcomes.values()
            if o.get("status") == "skipped" and not str(o.get("reason")).startswith("workload")
        }
        for reason in sorted(reasons):
            lines.append(f"- {system['label']}: skipped — {reason}")
        for workload, o in outcomes.items():
            if o.get("status") == "error":
                lines.append(f"- {system['label']}, {workload}: failed — {o.get('reason')}")
    return ["## Skipped and failed", "", *lines, ""] if lines else []


def _method(run: Run) -> list[str]:
    return [
        "## How it is measured",
        "",
        "- `python -m bench` runs each (system, workload) as `python -m bench.<module> "
        f"<system> <workload> --{run['mode']} --json` in a process group of its own, killed "
        "whole when it ends; systems run one after another on the machine's 2 cores.",
        "- Every job reports through a side channel that costs the same everywhere: a no-op "
        "job adds one to its thread's slot in a counter file its process maps (no system call); "
        "a process forked by a worker (RQ's work horse, Celery's and Dramatiq's children) "
        "appends one byte to a file instead; a latency job appends its enqueue and start times. "
        "The measuring process reads the files every 2 ms.",
        "- Workers: Flask-Offload in-process = 2 pool threads in the enqueuing process; "
        "standalone = `flask offload worker --threads 2`; Huey = `huey_consumer -w 2 -k "
        "thread`; RQ = two `rq worker` processes; Celery = `celery worker --pool=prefork -c "
        "2`; Dramatiq = `dramatiq --processes 1 --threads 2`; procrastinate = `procrastinate "
        "worker --concurrency 2`; PgQueuer = one process running its `QueueManager` as `pgq run` "
        "does (uvloop), batches of 50 and, as a second row, its default 10 (see "
        "`bench/peer_pgqueuer.py`); floors = 2 threads. "
        "Peers keep their defaults otherwise; "
        "workers are started and stopped by PID.",
        "- Clean state for each run: a fresh temporary directory (SQLite files), Redis db 15 "
        "flushed, RabbitMQ queues purged and deleted, a PostgreSQL database created and "
        "dropped.",
        "- Throughput is counted from the first job's start, so worker start-up (reported in "
        "`benchmarks.json` as `startup_s`) does not dilute it; a run still going after "
        f"{run['counts']['run_timeout']:.0f} s reports the rate of the jobs done (marked \\*). "
        "A run shorter than a few polls (the `queue.Queue` floor's no-op run) is only roughly "
        "timed.",
        "- Enqueue-to-start samples are taken one at a time, 5-15 ms apart, with a budget of "
        f"{run['counts']['latency']} samples or {run['counts']['latency_budget']:.0f} s; "
        "workers that poll (SQLite across processes, SqliteHuey) show their poll interval.",
        "- `enqueue_busy` (in-process row): `.delay()` timed while the process's own pool runs "
        "a backlog of no-op jobs the process queued first (10 per timed call), timing begun once "
        "the pool has run a job; the backlog is checked to stay non-empty.",
        "- `due`: delayed jobs (due 0.2 to 1.5 s ahead) stored by the measuring process and run "
        "by an idle worker process polling every 30 s (5 s in quick mode, to bound its "
        "time); lateness = stored `started_at - "
        "run_at`.",
        "- Idle CPU sums user and system time of the worker processes and their children "
        "(`/proc`, 10 ms ticks); for the in-process pool, of the whole process.",
        "",
    ]


# --- chart ---------------------------------------------------------------------------------


def chart(run: Run, path: Path) -> tuple[Path | None, str]:
    """Four panels of horizontal bars; returns the path, or None and why there is none."""
    try:
        import matplotlib
    except ImportError:
        return (
            None,
            "No chart: matplotlib is not installed (`pip install -r bench/requirements.txt`).",
        )
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("Enqueue p50 (µs, less is better)", "", ("enqueue_us", "p50"), True),
        ("No-op throughput (jobs/s, more is better)", "noop", ("jobs_per_s",), True),
        ("1 ms jobs throughput (jobs/s, more is better)", "sleep", ("jobs_per_s",), False),
        ("Enqueue→start p50 (ms, less is better)", "latency", ("start_ms", "p50"), True),
    ]
    systems = run["systems"]
    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    for ax, (title, workload, keys, log) in zip(axes.flat, panels, strict=True):
        labels, values, colors = [], [], []
        for system in reversed(systems):
            each = workload or enqueue_of(run, system["key"])
            x = value(run, system["key"], each, *keys)
            if x is not None and x > 0:
                busy = " (own pool busy)" if each == "enqueue_busy" else ""
                labels.append(system["label"] + busy)
                values.append(x)
                colors.append(COLORS[system["family"]])
        ax.set_title(title, fontsize=11)
        if not values:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        bars = ax.barh(labels, values, color=colors)
        if log:
            ax.set_xscale("log")
        for bar, x in zip(bars, values, strict=True):
            ax.text(x, bar.get_y() + bar.get_height() / 2, " " + num(x), va="center", fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
        ax.margins(x=0.15)
        ax.grid(axis="x", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    fig.legend(handles, list(FAMILY_TITLES.values()), loc="lower center", ncol=3)
    mode = " (quick mode: not meaningful)" if run["mode"] == "quick" else ""
    fig.suptitle(
        f"Flask-Offload benchmarks{mode}, {run['started'][:10]}, {run['versions']['CPU']}",
        fontsize=12,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, ""
