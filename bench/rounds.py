"""Side by side in rounds: a target that compares Flask-Offload's throughput with a peer's is
decided by the median of per-round ratios, each round running the two one after the other
(each going first in turn), not by one run of each. On a shared machine one 10,000-job run
swings by a third from one minute to the next, and a single pair of runs decided whether
Flask-Offload was ahead of PgQueuer or behind it.

The driver's own run of the two is the first round; ``ROUNDS`` counts them all.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Collection
from typing import Any

from bench.figures import Run, Target, X, num

# (Flask-Offload's system, the peer's, the workload), as the targets compare them.
PAIRS = [
    ("offload-postgres", "pgqueuer", "noop"),
    ("offload-postgres", "pgqueuer-defaults", "noop"),
    ("offload-sqlite", "huey-sqlite", "noop"),
]
ROUNDS = {"full": 5, "quick": 1}
Runner = Callable[[str, str], dict[str, Any]]  # (system key, workload) -> its outcome


def _rate(outcome: dict[str, Any] | None) -> float | None:
    if not outcome or outcome.get("status") != "ok":
        return None
    rate = outcome.get("data", {}).get("jobs_per_s")
    return float(rate) if isinstance(rate, (int, float)) else None


def run_rounds(
    results: dict[str, dict[str, Any]],
    chosen: Collection[str],
    wanted: Collection[str] | None,
    mode: str,
    run: Runner,
) -> dict[str, list[list[float | None]]]:
    """The rounds of each pair the run chose, its first round being the driver's own run
    (in ``results``); by ``key(pair)``."""
    rounds: dict[str, list[list[float | None]]] = {}
    for ours, peer, workload in PAIRS:
        if ours not in chosen or peer not in chosen or (wanted and workload not in wanted):
            continue
        first = [_rate(results.get(key, {}).get(workload)) for key in (ours, peer)]
        if None in first:
            continue
        done = rounds[key((ours, peer, workload))] = [first]
        for n in range(1, ROUNDS[mode]):
            order = (peer, ours) if n % 2 else (ours, peer)
            rates = {system: _rate(run(system, workload)) for system in order}
            done.append([rates[ours], rates[peer]])
            print(
                f"  round {n + 1}/{ROUNDS[mode]} {ours} {num(rates[ours])} jobs/s, {peer} "
                f"{num(rates[peer])} jobs/s ({workload})",
                flush=True,
            )
    return rounds


def key(pair: tuple[str, str, str]) -> str:
    return " ".join(pair)


def ahead(run: Run, what: str, pair: tuple[str, str, str], test: Callable[[float], bool]) -> Target:
    """The target comparing ``pair``'s throughputs: the median of its per-round ratios where
    the run has rounds of it, else the ratio of the one run of each."""
    ours, peer, workload = pair
    rounds = [r for r in run.get("rounds", {}).get(key(pair), []) if None not in r]
    if len(rounds) < 2:
        results = run["results"]
        a, b = (_rate(results.get(k, {}).get(workload)) for k in (ours, peer))
        if a is None or not b:
            return what, "not measured", None
        return what, f"{num(a)} jobs/s / {num(b)} jobs/s = {a / b:.2f}{X}", test(a / b)
    ratios = [a / b for a, b in rounds]
    middle = statistics.median(ratios)
    each = ", ".join(f"{r:.2f}{X}" for r in ratios)
    a = statistics.median(r[0] for r in rounds)
    b = statistics.median(r[1] for r in rounds)
    measured = (
        f"median of {len(rounds)} alternating rounds {middle:.2f}{X} (rounds {each}; medians "
        f"{num(a)} jobs/s / {num(b)} jobs/s)"
    )
    return what, measured, test(middle)
