"""Background views replay their request faithfully, or refuse clearly: Flask's test client on
real storage (the transport-level cases are in test_web_transport.py)."""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Blueprint, Flask, Response, g, redirect, request, send_file
from flask.testing import FlaskClient
from flask.views import MethodView

import pgtest
from conftest import AppFactory
from flask_offload import Offload

Site = tuple[Flask, Offload, FlaskClient]


@pytest.fixture
def site(make_app: AppFactory) -> Site:
    app, offload = make_app(OFFLOAD_WORKERS=0, OFFLOAD_MAX_RESULT_BYTES=4000)
    return app, offload, app.test_client()


def run(site: Site, method: str, path: str, **kwargs: Any) -> Any:
    """Send the request to a background view, run its job, and return the poll's answer."""
    _app, offload, client = site
    accepted = client.open(path, method=method, **kwargs)
    assert accepted.status_code == 202, accepted.get_data(as_text=True)
    assert offload.runtime().run_due() == 1
    return client.open(accepted.headers["Location"], method="HEAD" if method == "HEAD" else "GET")


def test_form_data_survives_a_hook_that_read_the_form_first(site: Site) -> None:
    """A method-override or CSRF hook reads ``request.form`` before the view: the snapshot
    still holds the raw body, multipart uploads included."""
    app, offload, _client = site

    @app.before_request
    def method_override() -> None:
        g.override = request.form.get("_method")

    @app.post("/order")
    @offload.background
    def order() -> dict[str, Any]:
        upload = request.files.get("invoice")
        return {
            "form": request.form.to_dict(flat=False),
            "override": g.override,
            "file": None if upload is None else [upload.filename, upload.read().decode()],
        }

    form = {"item": "book", "qty": "2", "_method": "PUT"}
    assert run(site, "POST", "/order", data=form).json == {
        "form": {"item": ["book"], "qty": ["2"], "_method": ["PUT"]},
        "override": "PUT",
        "file": None,
    }
    upload = {"item": "pen", "invoice": (io.BytesIO(b"total: 3"), "invoice.txt")}
    assert run(site, "POST", "/order", data=upload, content_type="multipart/form-data").json == {
        "form": {"item": ["pen"]},
        "override": None,
        "file": ["invoice.txt", "total: 3"],
    }


def test_send_file_and_streamed_responses_are_stored_within_the_result_limit(
    site: Site, tmp_path: Path
) -> None:
    app, offload, client = site
    (tmp_path / "report.csv").write_bytes(b"a,b\n1,2\n")
    pulled: list[int] = []

    @app.get("/download")
    @offload.background
    def download() -> Response:
        return send_file(tmp_path / "report.csv", mimetype="text/csv")

    @app.get("/stream/<int:parts>")
    @offload.background
    def stream(parts: int) -> Response:
        def body() -> Iterator[bytes]:
            for n in range(parts):
                pulled.append(n)
                yield b"x" * 1000

        return Response(body(), mimetype="text/plain")

    file = run(site, "GET", "/download")
    assert file.status_code == 200 and file.get_data() == b"a,b\n1,2\n"
    assert file.headers["Content-Type"] == "text/csv; charset=utf-8"
    assert run(site, "GET", "/stream/2").get_data() == b"x" * 2000

    pulled.clear()
    endless = client.get("/stream/1000").headers["Location"]
    offload.runtime().run_due()
    failed = offload.get_job(endless.rsplit("/", 1)[1])
    assert failed is not None and failed.state == "failed"
    assert failed.error is not None and "OFFLOAD_MAX_RESULT_BYTES" in failed.error
    assert len(pulled) < 10, "the stream is not read past the limit"


def test_the_replayed_response_is_closed(site: Site) -> None:
    app, offload, _client = site
    closed: list[str] = []

    @app.get("/closing")
    @offload.background
    def closing() -> Response:
        response = Response("done")
        response.call_on_close(lambda: closed.append("closed"))
        return response

    assert run(site, "GET", "/closing").get_data() == b"done"
    assert closed == ["closed"]


@pytest.mark.parametrize("storage", ["memory", "sqlite", "postgres"])
def test_eager_mode_forgets_the_snapshot_once_the_job_is_final(
    make_app: AppFactory, storage: str
) -> None:
    """EAGER stores the job already finished: its request snapshot (cookies and
    Authorization included) must not be stored with it."""
    config: dict[str, Any] = {"OFFLOAD_EAGER": True}
    if storage == "postgres":
        url = pgtest.session_database()
        pgtest.clean(url)
        config["OFFLOAD_URL"] = url
    app, offload = make_app(storage="memory" if storage == "memory" else "sqlite", **config)

    @app.post("/secret")
    @offload.background
    def secret() -> str:
        return "kept"

    client = app.test_client()
    client.set_cookie("session", "s3cret")
    accepted = client.post("/secret", headers={"Authorization": "Bearer t0ken"})
    job = offload.get_job(accepted.json["id"])
    assert job is not None and job.state == "succeeded"
    assert (job.args_json, job.kwargs_json) == ("[]", "{}")
    assert client.get(accepted.headers["Location"]).get_data() == b"kept"


def factory(offload: Offload, make_app: AppFactory) -> Flask:
    """An app factory that defines its background view inside, as examples/reports.py does."""
    app, _ = make_app(offload, OFFLOAD_WORKERS=0)

    @app.post("/build")
    @offload.background(queue="reports")
    def build() -> str:
        return f"built by {app.name} {id(app)}"

    return app


def test_an_app_factory_with_a_background_view_can_be_called_twice(
    make_app: AppFactory,
) -> None:
    offload = Offload()
    first, second = factory(offload, make_app), factory(offload, make_app)
    for app in (first, second):
        client = app.test_client()
        location = client.post("/build").headers["Location"]
        assert offload.runtime(app).run_due() == 1
        assert client.get(location).get_data(as_text=True) == f"built by {app.name} {id(app)}"


def test_a_second_view_of_the_same_name_with_other_options_is_refused(
    make_app: AppFactory,
) -> None:
    offload = Offload()
    factory(offload, make_app)

    def build() -> str:
        return "other"

    build.__qualname__ = "factory.<locals>.build"
    with pytest.raises(ValueError, match="two tasks are named"):
        offload.background(queue="other")(build)


def test_background_above_the_route_decorator_raises_with_the_right_order(
    make_app: AppFactory,
) -> None:
    app, offload = make_app(OFFLOAD_WORKERS=0)
    with pytest.raises(TypeError) as raised:

        @offload.background
        @app.post("/upside-down")
        def upside_down() -> str:
            return "ran inline"

    right_order = '    @app.post("/path")\n    @offload.background\n    def upside_down(): ...'
    assert right_order in str(raised.value)


def test_background_above_the_route_decorator_before_init_app_raises_at_init_app(
    tmp_path: Path,
) -> None:
    app = Flask(__name__, instance_path=str(tmp_path))
    app.config.update(OFFLOAD_URL=f"sqlite:///{tmp_path / 'jobs.db'}", OFFLOAD_WORKERS=0)
    offload = Offload()

    @offload.background
    @app.post("/upside-down")
    def upside_down() -> str:
        return "ran inline"

    with pytest.raises(TypeError, match="upside_down"):
        offload.init_app(app)


def in_main(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn.__module__ = "__main__"
    return fn


def test_a_background_view_in_main_may_be_named(site: Site) -> None:
    """Named for its endpoint by default (see test_web_names.py), or by hand."""
    app, offload, client = site

    def report() -> str:
        return "named"

    app.add_url_rule("/named", view_func=offload.background(name="report")(in_main(report)))
    assert run(site, "GET", "/named").get_data() == b"named"
    assert client.get("/offload/jobs/" + "0" * 32).status_code == 404


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/moved"), ("GET", "/empty"), ("HEAD", "/page"), ("GET", "/page")]
)
def test_redirects_empty_answers_and_head_poll_like_the_foreground(
    site: Site, method: str, path: str
) -> None:
    app, offload, client = site

    def views() -> list[Callable[..., Any]]:
        def moved() -> Any:
            return redirect("/elsewhere?from=moved")

        def empty() -> Any:
            return "", 204, {"X-Empty": "yes"}

        def page() -> Any:
            return "<p>hello</p>", 200, {"X-Page": "1"}

        return [moved, empty, page]

    for view in views():
        app.add_url_rule(f"/{view.__name__}", view_func=view)
    for view in views():
        name = view.__name__
        app.add_url_rule(f"/bg/{name}", f"bg_{name}", offload.background(view))

    foreground = client.open(path, method=method)
    accepted = client.open("/bg" + path, method=method)
    assert accepted.status_code == 202
    assert accepted.headers["Cache-Control"] == "no-store"
    location = accepted.headers["Location"]
    pending = client.get(location)
    assert pending.status_code == 202 and pending.headers["Cache-Control"] == "no-store"
    offload.runtime().run_due()
    background = client.open(location, method=method)
    assert background.headers.pop("Cache-Control") == "no-store"
    assert (background.status, background.get_data()) == (foreground.status, foreground.get_data())
    assert sorted(background.headers.items()) == sorted(foreground.headers.items())
    if method == "HEAD":
        by_get = client.get(location)
        assert by_get.status == foreground.status and by_get.get_data() == b""
        assert by_get.headers["Content-Length"] == "0"
        assert by_get.headers["X-Page"] == "1"


def test_a_blueprint_registered_later_with_the_wrong_order_fails_at_the_first_request(
    make_app: AppFactory,
) -> None:
    app, offload = make_app(OFFLOAD_WORKERS=0)
    app.testing = True
    reports = Blueprint("reports", __name__)

    @offload.background
    @reports.post("/upside-down")
    def upside_down() -> str:
        return "ran inline"

    app.register_blueprint(reports)
    with pytest.raises(
        TypeError, match=r"'upside_down' is registered .*endpoint 'reports\.upside_down'"
    ):
        app.test_client().post("/upside-down")


def test_a_method_view_method_can_be_a_background_view(site: Site) -> None:
    app, offload, _client = site

    class Orders(MethodView):
        @offload.background
        def post(self, n: int) -> str:
            return f"{type(self).__name__} {n} {request.get_data(as_text=True)}"

    app.add_url_rule("/orders/<int:n>", view_func=Orders.as_view("orders"))
    assert run(site, "POST", "/orders/3", data="x").get_data() == b"Orders 3 x"


def test_one_function_can_be_served_both_inline_and_in_the_background(site: Site) -> None:
    """Wrapped first and then registered plain too, on purpose: not a decorator-order mistake."""
    app, offload, client = site

    def total() -> str:
        return "42"

    app.add_url_rule("/total/later", "later", offload.background(total))
    app.add_url_rule("/total", "now", total)
    assert client.get("/total").get_data() == b"42"
    assert run(site, "GET", "/total/later").get_data() == b"42"


def test_a_relative_redirect_still_points_where_the_foregrounds_does(site: Site) -> None:
    app, offload, client = site

    @app.get("/a/b")
    @offload.background
    def relative() -> Any:
        return redirect("next?x=1")

    assert client.get("/offload/jobs/" + "0" * 32).status_code == 404
    assert run(site, "GET", "/a/b").headers["Location"] == "http://localhost/a/next?x=1"


def test_a_background_view_wrapped_again_outside_has_its_body_read_first(site: Site) -> None:
    """A decorator above @offload.background (a login check) hides it from a plain
    isinstance test: the body is still read before the hook parses the form."""
    app, offload, _client = site

    @app.before_request
    def read_form() -> None:
        g.form = request.form.to_dict()

    def logged_in(view: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(view)
        def check(*args: Any, **kwargs: Any) -> Any:
            return view(*args, **kwargs)

        return check

    @app.post("/outer")
    @logged_in
    @offload.background
    def outer() -> Any:
        return {"view": request.form.to_dict(), "hook": g.form}

    assert run(site, "POST", "/outer", data={"a": "1"}).json == {
        "view": {"a": "1"},
        "hook": {"a": "1"},
    }
