"""A script whose jobs run in its own pool while an OpenTelemetry SDK records every span;
it prints the spans as JSON lines. ``python tracedapp.py URL``."""

from __future__ import annotations

import json
import sys

from flask import Flask
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from flask_offload import Offload

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
offload = Offload()


@offload.task(name="greet")
def greet(name: str) -> str:
    with trace.get_tracer("app").start_as_current_span("inside greet"):
        return f"hello {name}"


@offload.task(name="flaky", retries=1, retry_backoff=0.01, retry_on=ValueError)
def flaky() -> None:
    raise ValueError("nope")


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.update(OFFLOAD_URL=sys.argv[1], OFFLOAD_WORKERS=1)
    offload.init_app(app)
    return app


def main() -> None:
    app = create_app()
    with app.app_context():
        with trace.get_tracer("app").start_as_current_span("POST /greet"):
            traced = greet.delay("ann")
        untraced = greet.delay("bob")
        with trace.get_tracer("app").start_as_current_span("POST /flaky"):
            failing = flaky.delay()
        for job in (traced, untraced, failing):
            job.wait(timeout=60)
    for span in exporter.get_finished_spans():
        print(
            json.dumps(
                {
                    "name": span.name,
                    "trace": span.context.trace_id,
                    "id": span.context.span_id,
                    "parent": span.parent.span_id if span.parent else None,
                    "kind": span.kind.name,
                    "status": span.status.status_code.name,
                    "attributes": dict(span.attributes or {}),
                    "job": {"traced": traced.id, "untraced": untraced.id, "failing": failing.id},
                }
            )
        )


if __name__ == "__main__":
    main()
