"""The metrics list every queue the app knows, as the dashboard's Queues page does: the
queues of registered tasks, paused queues and queues with jobs, with 0 where one has none."""

from __future__ import annotations

from conftest import AppFactory
from flask_offload import Offload


def test_every_known_queue_is_listed_with_zero_when_empty(make_app: AppFactory) -> None:
    offload = Offload()

    @offload.task(queue="mail")
    def send(to: str) -> str:
        return to

    @offload.task(queue="reports")
    def build() -> None:
        return None

    app, _ = make_app(offload, DEBUG=True, OFFLOAD_DASHBOARD=True, OFFLOAD_WORKERS=0)
    with app.app_context():
        send.delay("a@example.com")
        offload.pause_queue("idle")
    text = app.test_client().get("/offload/metrics").get_data(as_text=True)
    assert 'offload_queue_depth{queue="mail"} 1.0' in text
    for queue in ("reports", "idle"):
        for metric in ("depth", "due", "latency_seconds"):
            assert f'offload_queue_{metric}{{queue="{queue}"}} 0.0' in text, (queue, metric)
        assert f'offload_running_jobs{{queue="{queue}"}} 0.0' in text
    assert 'offload_queue_paused{queue="idle"} 1.0' in text
    assert 'offload_queue_paused{queue="reports"} 0.0' in text
