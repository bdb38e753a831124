"""What a developer reads in names and URLs: a background view's task is named for its
endpoint (jobs stored under the old ``view:module.qualname`` name still run), a view that
changes the session says the change is lost, the dashboard's job page is not one letter away
from the status URL, and each example keeps its own job store."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import pytest
from flask import Blueprint, Flask, session
from flask.views import MethodView
from werkzeug.test import EnvironBuilder

from conftest import AppFactory, wait_until
from flask_offload import Offload, snapshot

ROOT = Path(__file__).parent.parent


def factory(offload: Offload, make_app: AppFactory, **config: object) -> Flask:
    """An app factory that defines its background views inside, after ``init_app``."""
    app, _ = make_app(offload, **{"OFFLOAD_WORKERS": 0, **config})

    @app.post("/build")
    @offload.background(queue="reports")
    def build() -> str:
        return "built"

    reports = Blueprint("reports", __name__)

    @reports.post("/export")
    @offload.background
    def export() -> str:
        return "exported"

    app.register_blueprint(reports, url_prefix="/reports")
    app.add_url_rule("/later", "later", offload.background(lambda: "later"), methods=["POST"])
    app.add_url_rule("/named", view_func=offload.background(name="by-hand")(lambda: "named"))

    class Orders(MethodView):
        @offload.background
        def post(self) -> str:
            return "ordered"

    app.add_url_rule("/orders", view_func=Orders.as_view("orders"))
    return app


def test_a_background_view_is_named_for_its_endpoint(make_app: AppFactory) -> None:
    offload = Offload()
    app = factory(offload, make_app)
    client = app.test_client()
    for method, path, name, body in [
        ("POST", "/build", "view:build", b"built"),
        ("POST", "/reports/export", "view:reports.export", b"exported"),
        ("POST", "/later", "view:later", b"later"),
        ("GET", "/named", "by-hand", b"named"),
        ("POST", "/orders", "view:orders", b"ordered"),
    ]:
        accepted = client.open(path, method=method)
        job = offload.get_job(accepted.json["id"])
        assert job is not None and job.task == name
        assert offload.runtime(app).run_due() == 1
        assert client.get(accepted.headers["Location"]).get_data() == body


def test_a_job_stored_under_the_old_name_still_runs(make_app: AppFactory) -> None:
    offload = Offload()
    app = factory(offload, make_app)
    view = app.view_functions["build"]
    old_name = f"view:{view.__module__}.{view.__qualname__}"
    assert old_name.endswith("factory.<locals>.build")
    environ = EnvironBuilder(path="/build", method="POST").get_environ()
    shot = snapshot.take(environ, 1 << 20)
    runtime = offload.runtime(app)
    job = runtime.enqueue(old_name, [shot], queue="reports", ephemeral=True)
    assert runtime.run_due() == 1
    assert job.refresh().state == "succeeded"
    assert app.test_client().get(f"/offload/jobs/{job.id}").get_data() == b"built"


def test_a_view_defined_after_init_app_is_known_to_a_pool_before_any_request(
    make_app: AppFactory,
) -> None:
    """A worker process (here an app of its own on the same file) claims the endpoint's name
    as soon as its pool starts, though it never served a request."""
    web = factory(Offload(), make_app)
    accepted = [web.test_client().post(path) for path in ("/build", "/orders")]
    worker_offload = Offload()
    worker = factory(worker_offload, make_app, OFFLOAD_WORKERS=1)
    worker_offload.runtime(worker).start()
    for answer, name in zip(accepted, ("view:build", "view:orders"), strict=True):
        job = worker_offload.get_job(answer.json["id"])
        assert job is not None and job.task == name
        wait_until(lambda job=job: job.refresh().state == "succeeded", timeout=30)


def test_a_view_in_main_needs_no_name_now(make_app: AppFactory) -> None:
    app, offload = make_app(OFFLOAD_WORKERS=0)

    def report() -> str:
        return "from main"

    report.__module__ = "__main__"
    app.add_url_rule("/report", view_func=offload.background(report))
    accepted = app.test_client().get("/report")
    assert offload.get_job(accepted.json["id"]).task == "view:report"  # type: ignore[union-attr]
    assert offload.runtime(app).run_due() == 1


def test_a_view_that_changes_the_session_warns_once_that_it_is_lost(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "flask_offload")
    app, offload = make_app(OFFLOAD_WORKERS=0, SECRET_KEY="test")

    @app.post("/login")
    @offload.background
    def login() -> str:
        session["user"] = "ann"
        return "logged in"

    @app.post("/quiet")
    @offload.background
    def quiet() -> str:
        return "quiet"

    client = app.test_client()
    for path in ("/login", "/login", "/quiet"):
        client.post(path)
    assert offload.runtime(app).run_due() == 3
    warnings = [r.getMessage() for r in caplog.records if "session" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "view:login" in warnings[0] and "lost" in warnings[0]


def test_the_dashboards_job_page_is_not_one_letter_from_the_status_url(
    make_app: AppFactory,
) -> None:
    offload = Offload()

    @offload.task
    def send() -> None:
        return None

    app, _ = make_app(offload, DEBUG=True, OFFLOAD_DASHBOARD=True, OFFLOAD_WORKERS=0)
    with app.app_context():
        job_id = send.delay().id
    client = app.test_client()
    page = f"/offload/dashboard/jobs/{job_id}"
    listing = client.get("/offload/list").get_data(as_text=True)
    assert f'href="{page}"' in listing and "/offload/job/" not in listing
    html = client.get(page).get_data(as_text=True)
    assert job_id in html and f'action="{page}/cancel"' in html
    assert client.get(f"/offload/job/{job_id}").status_code == 200, "the old page still works"
    assert client.get(f"/offload/jobs/{job_id}").json["state"] == "queued"  # type: ignore[index]


def test_each_example_keeps_its_own_job_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASK_OFFLOAD_WORKERS", "0")
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    stores = set()
    for name in ("visits", "reports"):
        module = importlib.import_module(name)
        app = module.create_app()
        stores.add(module.offload.runtime(app).backend.location)
    assert len(stores) == 2, stores


def test_two_views_whose_endpoint_names_clash_are_told_and_the_pool_still_starts(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    offload = Offload()

    def one() -> str:
        return "one"

    def two() -> str:
        return "two"

    first, _ = make_app(offload, OFFLOAD_WORKERS=0)
    first.add_url_rule("/x", "x", offload.background(queue="a")(one))
    first.test_client().get("/x")  # the first request registers view:x
    second, _ = make_app(offload, storage="memory", OFFLOAD_WORKERS=1)
    second.add_url_rule("/x", "x", offload.background(queue="b")(two))
    runtime = offload.runtime(second)
    runtime.start()
    assert runtime.started
    assert "two tasks are named 'view:x'" in caplog.text
