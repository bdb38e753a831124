"""What the report's parts share: a figure read from one run's results, its formatting, and
a target built from figures (what, measured, holds). Every ratio compares figures of the
same run."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

Run = dict[str, Any]
Target = tuple[str, str, bool | None]  # what, measured, holds (None: not measured)

X = "\N{MULTIPLICATION SIGN}"  # written so, since ruff flags the bare sign as ambiguous


def outcome_of(run: Run, key: str, workload: str) -> dict[str, Any] | None:
    """A (system, workload)'s outcome as the driver recorded it, or None if it did not run."""
    found: dict[str, Any] | None = run["results"].get(key, {}).get(workload)
    return found


def value(run: Run, key: str, workload: str, *path: str) -> float | None:
    """A number from a successful result, or None."""
    outcome = outcome_of(run, key, workload)
    if not outcome or outcome.get("status") != "ok":
        return None
    data: Any = outcome.get("data")
    for part in path:
        data = data.get(part) if isinstance(data, dict) else None
    if not isinstance(data, (int, float)) or isinstance(data, bool) or math.isnan(data):
        return None
    return float(data)


def num(x: float | None, unit: str = "") -> str:
    """A figure with sensible precision."""
    if x is None:
        return "—"
    if x >= 1000:
        text = f"{x:,.0f}"
    elif x >= 100:
        text = f"{x:.0f}"
    elif x >= 10:
        text = f"{x:.1f}"
    elif x >= 1:
        text = f"{x:.2f}"
    else:
        text = f"{x:.3f}"
    return text + unit


def why(outcome: dict[str, Any] | None) -> str:
    """Why a part has no figures: not run, skipped or failed."""
    if outcome is None:
        return "Not run."
    return f"Not measured: {outcome.get('status')}, {outcome.get('reason', '')}."


def mark(holds: bool | None) -> str:
    return {True: "✓", False: "✗", None: "—"}[holds]


def ratio(
    what: str, a: float | None, b: float | None, unit: str, test: Callable[[float], bool]
) -> Target:
    if a is None or b is None or b == 0:
        return what, "not measured", None
    r = a / b
    return what, f"{num(a)} {unit} / {num(b)} {unit} = {r:.2f}{X}", test(r)


def below(what: str, a: float | None, unit: str, limit: float) -> Target:
    if a is None:
        return what, "not measured", None
    return what, f"{num(a)} {unit}", a < limit


def at_most(what: str, a: float | None, unit: str, limit: float, beside: str = "") -> Target:
    if a is None:
        return what, "not measured", None
    return what, f"{num(a)} {unit}{f' ({beside})' if beside else ''}", a <= limit
