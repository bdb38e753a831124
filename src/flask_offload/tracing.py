"""OpenTelemetry, where the ``opentelemetry-api`` package is installed (``Flask-Offload[otel]``).

An enqueue stores the caller's trace context with the job (the W3C ``traceparent`` headers,
as JSON), and each run of the job is a span that is a child of it, so the request that
enqueued a job and every attempt at it show in one trace. The span carries the task, job id,
attempt, queue and outcome. Without the package, or without a span in progress, nothing is
stored; without a tracer provider set, no span is made: one check per enqueue and per run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .job import FAILED, Job, Outcome

try:
    import opentelemetry.propagate as propagate
    import opentelemetry.trace as trace
except ImportError:  # the extra is not installed
    ENABLED = False
else:
    ENABLED = True
_provider_set = False
_look_again_at = 0.0


def active() -> bool:
    """True once the app has set a tracer provider (an SDK's): before that every span is a
    no-op that would still cost about 20 µs of each job's run. A provider is set once per
    process, so asking OpenTelemetry (3 µs) is done at most once a second until it is."""
    global _provider_set, _look_again_at
    if not ENABLED or _provider_set:
        return _provider_set
    now = time.monotonic()
    if now >= _look_again_at:
        _look_again_at = now + 1.0
        provider = trace.get_tracer_provider()
        _provider_set = not isinstance(
            provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
        )
    return _provider_set


def carrier() -> str | None:
    """The current trace context as JSON headers for a job to carry; None when no span is in
    progress (or OpenTelemetry is not installed)."""
    if not ENABLED or not trace.get_current_span().get_span_context().is_valid:
        return None
    headers: dict[str, str] = {}
    propagate.inject(headers)
    return json.dumps(headers) if headers else None


@contextmanager
def run_span(job: Job) -> Iterator[list[Outcome]]:
    """Run one attempt of ``job`` inside a span whose parent is the context it was enqueued
    in; the caller appends the attempt's outcome to the list it is given."""
    outcomes: list[Outcome] = []
    parent = propagate.extract(_headers(job.trace_json))
    tracer = trace.get_tracer("flask_offload")
    attributes: dict[str, str | int] = {
        "offload.task": job.task,
        "offload.job_id": job.id,
        "offload.attempt": job.attempts,
        "offload.queue": job.queue,
        "messaging.system": "flask_offload",
        "messaging.operation.type": "process",
        "messaging.destination.name": job.queue,
        "messaging.message.id": job.id,
    }
    with tracer.start_as_current_span(
        f"run {job.task}",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        yield outcomes
        if outcomes:
            outcome = outcomes[-1]
            span.set_attribute("offload.outcome", _outcome_name(outcome))
            if outcome.state == FAILED:
                span.set_status(trace.Status(trace.StatusCode.ERROR, outcome.error or ""))


def _outcome_name(outcome: Outcome) -> str:
    """What the span says the attempt did: the job's new state, or ``retrying``."""
    return "retrying" if outcome.state == "queued" else outcome.state


def _headers(trace_json: str | None) -> dict[str, Any]:
    """The stored headers, or none for a job enqueued outside a trace (or a damaged value)."""
    if trace_json is None:
        return {}
    try:
        headers = json.loads(trace_json)
    except ValueError:
        return {}
    return headers if isinstance(headers, dict) else {}
