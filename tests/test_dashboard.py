"""The dashboard and the metrics through Flask's test client, on a real SQLite file: who gets
in, what a refusal shows, that actions need a POST from this origin with the CSRF token, that
the pages show and do what they say, and never show or search a request's secrets."""

from __future__ import annotations

import base64
import logging
import re
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from conftest import AppFactory
from flask_offload import Offload
from flask_offload.backends.sqlite import SQLiteBackend
from flask_offload.dashboard import queries
from flask_offload.job import Outcome

ORIGIN = {"Origin": "http://localhost"}
SECRET = "alice@example.com"
PAGES = ["/offload/", "/offload/list", "/offload/workers", "/offload/periodic", "/offload/queues"]


@pytest.fixture
def site(
    make_app: AppFactory, request: pytest.FixtureRequest
) -> Iterator[tuple[Flask, Offload, dict[str, str]]]:
    """An app in debug mode (the development case: no hook needed from a loopback client on
    ``localhost``) with the dashboard on and no pool (jobs are moved by hand): one failed, one
    succeeded, one queued job, in queue ``mail``. Settings of its own come as the indirect
    parameter."""
    offload = Offload()

    @offload.task(name="send", queue="mail")
    def send(to: str) -> str:
        return to

    @offload.periodic(every=3600, name="hourly")
    def hourly() -> None:
        return None

    settings = getattr(request, "param", {})
    app, _ = make_app(offload, DEBUG=True, OFFLOAD_DASHBOARD=True, OFFLOAD_WORKERS=0, **settings)
    backend = offload.runtime(app).backend
    ids = {}
    with app.app_context():
        for name in ("failed", "succeeded", "queued"):
            ids[name] = send.delay(SECRET).id
    for name in ("failed", "succeeded"):
        [claimed] = backend.claim("w", ["send"], None, 1, 30)
        assert claimed.id == ids[name]
        if name == "failed":
            outcome = Outcome("failed", error="SMTPError: refused", traceback="Traceback: tb")
        else:
            outcome = Outcome("succeeded", result_json='"ok"')
        backend.finish(claimed, outcome)
    yield app, offload, ids


def snapshot(app: Flask, offload: Offload) -> Any:
    """Everything an action could change: every job's state and attempts, paused queues."""
    backend = offload.runtime(app).backend
    jobs, _ = backend.search_jobs(backend_filter(), limit=1000)
    return sorted((j.id, j.state, j.attempts, j.run_at) for j in jobs), backend.paused_queues()


def backend_filter() -> Any:
    from flask_offload.backends.base import JobFilter

    return JobFilter()


def token(client: FlaskClient, page: str = "/offload/list") -> str:
    """The CSRF token a page's forms carry (the page sets its cookie)."""
    html = client.get(page).get_data(as_text=True)
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "the page offers actions"
    return found.group(1)


def action_posts(ids: dict[str, str]) -> list[tuple[str, dict[str, str]]]:
    return [
        (f"/offload/job/{ids['failed']}/retry", {}),
        (f"/offload/job/{ids['queued']}/cancel", {}),
        (f"/offload/job/{ids['succeeded']}/delete", {}),
        ("/offload/bulk", {"verb": "retry", "state": "failed", "confirmed": "yes"}),
        ("/offload/bulk", {"verb": "delete", "confirmed": "yes"}),
        ("/offload/queues/mail/pause", {}),
        ("/offload/periodic/hourly/run", {}),
    ]


def test_nothing_is_served_when_the_dashboard_is_off(make_app: AppFactory) -> None:
    app, offload = make_app(OFFLOAD_WORKERS=0)
    client = app.test_client()
    for path in [*PAGES, "/offload/metrics", f"/offload/job/{'a' * 32}"]:
        assert client.get(path).status_code == 404, path
    assert client.post("/offload/queues/mail/pause", headers=ORIGIN).status_code == 404
    assert offload.runtime(app).backend.paused_queues() == set()


PROXY_HEADERS = [
    ("X-Forwarded-For", "203.0.113.9"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "example.com"),
    ("X-Forwarded-Port", "443"),
    ("X-Forwarded-Prefix", "/app"),
    ("Forwarded", "for=203.0.113.9"),
    ("Via", "1.1 nginx"),
    ("X-Real-IP", "203.0.113.9"),
    ("CF-Connecting-IP", "203.0.113.9"),
    ("True-Client-IP", "203.0.113.9"),
    ("X-Client-IP", "203.0.113.9"),
]


def refused_as_outside_development(answer: Any) -> None:
    """A 403 whose body says how to let people in, and nothing about jobs."""
    assert answer.status_code == 403
    body = answer.get_data(as_text=True)
    assert "@offload.dashboard_access" in body and "debug" in body, body
    assert SECRET not in body


@pytest.mark.parametrize(
    "debug, environ, headers",
    [
        # nginx's bare proxy_pass: a loopback client asking for a loopback Host, no header
        (False, {}, {"Host": "127.0.0.1:8000"}),
        (False, {}, {}),
        (True, {"REMOTE_ADDR": "203.0.113.9"}, {}),
        (True, {"REMOTE_ADDR": "10.0.0.5"}, {}),
        (True, {}, {"Host": "myapp.example.com"}),
        (True, {}, {"Host": "127.0.0.1.nip.io:5000"}),
        *((True, {}, {name: value}) for name, value in PROXY_HEADERS),
    ],
)
def test_without_the_hook_only_development_gets_in(
    site: Any,
    caplog: pytest.LogCaptureFixture,
    debug: bool,
    environ: dict[str, str],
    headers: dict[str, str],
) -> None:
    """Development is the app in debug mode, a loopback client, a loopback Host and no proxy
    header: anything else (a reverse proxy, which may set no header at all) is refused with a
    body and a log line that say how to register the hook, and no action changes anything."""
    app, offload, ids = site
    app.debug = debug
    caplog.set_level(logging.WARNING, "flask_offload")
    client = app.test_client()
    before = snapshot(app, offload)
    for path in [*PAGES, "/offload/metrics", f"/offload/job/{ids['failed']}"]:
        refused_as_outside_development(client.get(path, headers=headers, environ_base=environ))
    for path, form in action_posts(ids):
        answer = client.post(path, data=form, headers={**ORIGIN, **headers}, environ_base=environ)
        assert answer.status_code == 403, path
    assert snapshot(app, offload) == before
    logged = [r.getMessage() for r in caplog.records if "dashboard_access" in r.getMessage()]
    assert len(logged) == 1, caplog.text
    assert "\n" not in logged[0]


@pytest.mark.parametrize("host", ["localhost", "localhost:5000", "127.0.0.1:8000", "[::1]:5000"])
@pytest.mark.parametrize("client_address", ["127.0.0.1", "::1"])
def test_development_gets_in_on_any_loopback_host_and_port(
    site: Any, host: str, client_address: str
) -> None:
    app, _, _ = site
    client = app.test_client()
    for path in [*PAGES, "/offload/metrics"]:
        answer = client.get(
            path, headers={"Host": host}, environ_base={"REMOTE_ADDR": client_address}
        )
        assert answer.status_code == 200, path


def test_dns_rebinding_gets_nothing_from_a_loopback_client(site: Any) -> None:
    """A page on the attacker's own name, which resolves to 127.0.0.1, in the developer's
    browser: a loopback client, but not a loopback Host, so it reads nothing and acts on
    nothing (its Origin matches its own Host, so the origin check alone would not stop it)."""
    app, offload, ids = site
    client = app.test_client()
    rebound = {"Host": "attacker.example:5000"}
    before = snapshot(app, offload)
    for path in [*PAGES, "/offload/metrics", f"/offload/job/{ids['failed']}"]:
        refused_as_outside_development(client.get(path, headers=rebound))
    origin = {**rebound, "Origin": "http://attacker.example:5000"}
    for path, form in action_posts(ids):
        assert client.post(path, data=form, headers=origin).status_code == 403, path
    assert snapshot(app, offload) == before


def test_a_refusal_by_the_hook_is_bare(site: Any) -> None:
    app, offload, ids = site
    offload.dashboard_access(lambda: False)
    client = app.test_client()
    for path in [*PAGES, f"/offload/job/{ids['failed']}", f"/offload/job/{'0' * 32}"]:
        answer = client.get(path)
        assert answer.status_code == 403, path
        assert answer.get_data(as_text=True) == "Forbidden\n", "no job, no argument, no reason"


def test_the_hook_decides_and_read_only_hides_and_refuses_every_action(site: Any) -> None:
    app, offload, ids = site
    client = app.test_client()
    verdict: dict[str, Any] = {"value": False}
    offload.dashboard_access(lambda: verdict["value"])
    assert client.get("/offload/").status_code == 403, "the hook overrules loopback"
    verdict["value"] = "full"
    csrf = token(client)
    verdict["value"] = "read"
    before = snapshot(app, offload)
    for path in [*PAGES, f"/offload/job/{ids['failed']}", "/offload/list?state=failed"]:
        answer = client.get(path)
        assert answer.status_code == 200, path
        html = answer.get_data(as_text=True)
        assert 'name="csrf"' not in html and 'method="post"' not in html, path
    assert "read-only" in client.get("/offload/").get_data(as_text=True)
    for path, form in action_posts(ids):
        answer = client.post(path, data={**form, "csrf": csrf}, headers=ORIGIN)
        assert answer.status_code == 403, path
    assert snapshot(app, offload) == before
    verdict["value"] = True
    answer = client.post(f"/offload/job/{ids['failed']}/retry", data={"csrf": csrf}, headers=ORIGIN)
    assert answer.status_code == 303 and snapshot(app, offload) != before


@pytest.mark.parametrize(
    "headers, send_token",
    [
        ({"Origin": "https://evil.example"}, True),
        ({"Referer": "https://evil.example/page"}, True),
        ({}, True),  # neither Origin nor Referer
        (ORIGIN, False),  # no token
        (ORIGIN, "wrong"),
    ],
)
def test_a_cross_site_or_tokenless_post_is_refused_and_changes_nothing(
    site: Any, headers: dict[str, str], send_token: Any
) -> None:
    app, offload, ids = site
    client = app.test_client()
    csrf = token(client)
    sent = {True: csrf, False: None, "wrong": "x" * 43}[send_token]
    before = snapshot(app, offload)
    for path, form in action_posts(ids):
        data = dict(form) if sent is None else {**form, "csrf": sent}
        assert client.post(path, data=data, headers=headers).status_code == 403, path
    assert snapshot(app, offload) == before
    answer = client.post("/offload/queues/mail/pause", data={"csrf": csrf}, headers=ORIGIN)
    assert answer.status_code == 303, "the same POST from this origin with the token works"
    assert offload.runtime(app).backend.paused_queues() == {"mail"}


def test_no_get_changes_anything(site: Any) -> None:
    app, offload, ids = site
    client = app.test_client()
    before = snapshot(app, offload)
    paths = [*PAGES, "/offload/metrics", *(f"/offload/job/{i}" for i in ids.values())]
    paths += [
        path + "?" + "&".join(f"{k}={v}" for k, v in form.items())
        for path, form in action_posts(ids)
    ]
    paths += ["/offload/list?state=failed&q=smtp", "/offload/list?q=" + ids["failed"]]
    for path in paths:
        assert client.get(path).status_code in (200, 302, 404, 405), path
        assert client.get(path, headers={"X-Offload-Live": "1"}).status_code in (
            200,
            302,
            404,
            405,
        ), path
    assert snapshot(app, offload) == before


def test_jobs_list_filters_search_lookup_and_pages(site: Any) -> None:
    app, offload, ids = site
    client = app.test_client()
    failed = client.get("/offload/list?state=failed").get_data(as_text=True)
    assert ids["failed"][:12] in failed and ids["succeeded"][:12] not in failed
    found = client.get("/offload/list?q=SMTP").get_data(as_text=True)
    assert ids["failed"][:12] in found and ids["queued"][:12] not in found
    lookup = client.get(f"/offload/list?q={ids['queued']}")
    assert lookup.status_code == 302 and lookup.headers["Location"].endswith(ids["queued"])
    with app.app_context():
        more = [offload.runtime().enqueue("send", [n]).id for n in range(60)]
    first = client.get("/offload/list").get_data(as_text=True)
    assert more[-1][:12] in first and more[0][:12] not in first
    older = re.search(r'class="next" href="([^"]+)"', first)
    assert older is not None
    second = client.get(older.group(1).replace("&amp;", "&")).get_data(as_text=True)
    assert more[0][:12] in second and more[-1][:12] not in second
    assert ids["failed"][:12] in second


def test_job_page_shows_history_with_traceback_and_live_json(site: Any) -> None:
    app, _, ids = site
    client = app.test_client()
    html = client.get(f"/offload/job/{ids['failed']}").get_data(as_text=True)
    assert "SMTPError: refused" in html and "Traceback: tb" in html and SECRET in html
    live = client.get(f"/offload/job/{ids['failed']}", headers={"X-Offload-Live": "1"})
    assert live.is_json and "Traceback: tb" in live.json["main"]  # type: ignore[index]
    assert "<html" not in live.json["main"]  # type: ignore[index]
    assert client.get(f"/offload/job/{'0' * 32}").status_code == 404
    page = client.get("/offload/")
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert "<script>" not in page.get_data(as_text=True), "no inline script"
    assert client.get("/offload/assets/offload.js").status_code == 200


def test_actions_retry_cancel_delete_pause_and_run_now(site: Any) -> None:
    app, offload, ids = site
    runtime = offload.runtime(app)
    client = app.test_client()
    csrf = token(client)

    def post(path: str, **form: str) -> Any:
        return client.post(path, data={"csrf": csrf, **form}, headers=ORIGIN)

    assert post(f"/offload/job/{ids['failed']}/retry").status_code == 303
    assert runtime.get(ids["failed"]).state == "queued"  # type: ignore[union-attr]
    assert post(f"/offload/job/{ids['queued']}/cancel").status_code == 303
    assert runtime.get(ids["queued"]).state == "cancelled"  # type: ignore[union-attr]
    assert post(f"/offload/job/{ids['succeeded']}/delete").status_code == 303
    assert runtime.get(ids["succeeded"]) is None
    assert post("/offload/queues/mail/pause").status_code == 303
    assert "paused" in client.get("/offload/queues").get_data(as_text=True)
    assert post("/offload/queues/mail/resume").status_code == 303
    assert runtime.backend.paused_queues() == set()
    ran = post("/offload/periodic/hourly/run")
    assert ran.status_code == 303
    job_id = ran.headers["Location"].split("/")[-1].split("?")[0]
    assert runtime.get(job_id).task == "hourly"  # type: ignore[union-attr]


@pytest.mark.parametrize("site", [{"OFFLOAD_DASHBOARD_BULK_LIMIT": 2}], indirect=True)
def test_bulk_actions_ask_first_and_are_capped(site: Any) -> None:
    app, offload, _ = site
    runtime = offload.runtime(app)
    with app.app_context():
        queued = [runtime.enqueue("send", [n], queue="mail").id for n in range(3)]
    client = app.test_client()
    csrf = token(client)
    form = {"csrf": csrf, "verb": "cancel", "state": "queued"}
    ask = client.post("/offload/bulk", data=form, headers=ORIGIN)
    assert ask.status_code == 200 and "Cancel 2 job(s)" in ask.get_data(as_text=True)
    assert all(runtime.get(i).state == "queued" for i in queued), "asking changes nothing"  # type: ignore[union-attr]
    done = client.post("/offload/bulk", data={**form, "confirmed": "yes"}, headers=ORIGIN)
    assert done.status_code == 303
    states = [runtime.get(i).state for i in queued]  # type: ignore[union-attr]
    assert states == ["queued", "cancelled", "cancelled"], "the newest two, no more"


def test_metrics_need_the_dashboard_or_the_bearer_token(make_app: AppFactory, site: Any) -> None:
    app, _, _ = site
    client = app.test_client()
    text = client.get("/offload/metrics").get_data(as_text=True)
    assert 'offload_jobs{state="failed",task="send"} 1.0' in text
    assert 'offload_queue_depth{queue="mail"} 1.0' in text
    assert 'offload_job_run_seconds_bucket{le="+Inf",task="send"} 2.0' in text
    scraper_app, _ = make_app(OFFLOAD_METRICS_TOKEN="s3cret", OFFLOAD_WORKERS=0)
    scraper = scraper_app.test_client()
    remote = {"REMOTE_ADDR": "203.0.113.9"}
    good = {"Authorization": "Bearer s3cret"}
    assert scraper.get("/offload/metrics", headers=good, environ_base=remote).status_code == 200
    bad = {"Authorization": "Bearer nope"}
    assert scraper.get("/offload/metrics", headers=bad, environ_base=remote).status_code == 403
    assert scraper.get("/offload/metrics").status_code == 403, "no dashboard, no token: refused"
    assert scraper.get("/offload/").status_code == 404, "the token serves metrics only"


def test_pause_lasts_across_restarts_and_stops_every_claim(
    make_app: AppFactory, tmp_path: Path
) -> None:
    offload = Offload()
    ran: list[str] = []

    @offload.task(name="mail.send", queue="mail")
    def send(n: int) -> None:
        ran.append(f"mail {n}")

    @offload.task(name="other")
    def other(n: int) -> None:
        ran.append(f"other {n}")

    app, _ = make_app(offload, OFFLOAD_WORKERS=0)
    result = app.test_cli_runner().invoke(args=["offload", "pause", "mail"])
    assert result.exit_code == 0 and "paused" in result.output, result.output
    offload.runtime(app).backend.close()
    reopened, _ = make_app(Offload(), OFFLOAD_WORKERS=0)  # the same file, a new process's view
    assert reopened.extensions["offload"].runtime(reopened).backend.paused_queues() == {"mail"}
    with app.app_context():
        send.delay(1)
        other.delay(2)
        assert offload.runtime().run_due() == 1
        assert ran == ["other 2"]
        assert offload.resume_queue("mail") and offload.runtime().run_due() == 1
    assert ran == ["other 2", "mail 1"]


def test_overview_shows_counts_chart_and_workers(site: Any) -> None:
    app, _, _ = site
    html = app.test_client().get("/offload/").get_data(as_text=True)
    assert "1 succeeded, 1 failed" in html
    assert html.count('<rect class="ok"') == 60
    assert time.strftime("%H:%M") in html


# -- what the dashboard never shows nor searches --------------------------------------------

SESSION, BEARER, PROXY_PASS, PASSWORD = "sess-8f3a", "bearer-51cc", "proxy-77d0", "hunter2-pw"
LOGIN_BODY = f"username=carol&password={PASSWORD}"


def shown(client: FlaskClient, job_id: str) -> str:
    """Everything a viewer of the dashboard can read of one job: its page and its live JSON."""
    page = client.get(f"/offload/job/{job_id}")
    live = client.get(f"/offload/job/{job_id}", headers={"X-Offload-Live": "1"})
    assert page.status_code == live.status_code == 200
    return page.get_data(as_text=True) + live.json["main"]  # type: ignore[index]


def found(client: FlaskClient, text: str, job_id: str) -> bool:
    """True if a text search for ``text`` lists the job (page and live JSON agree)."""
    query = {"q": text}
    html = client.get("/offload/list", query_string=query).get_data(as_text=True)
    live = client.get("/offload/list", query_string=query, headers={"X-Offload-Live": "1"})
    listed = job_id[:12] in html
    assert listed == (job_id[:12] in live.json["main"])  # type: ignore[index]
    return listed


@pytest.mark.parametrize("verdict", [True, "read"])
def test_a_background_views_request_secrets_are_never_shown_nor_searched(
    make_app: AppFactory, verdict: Any
) -> None:
    """A login form sent to a background view, with a session cookie and credentials: its job
    page, live JSON and search show the rest of the request, never those."""
    offload = Offload()
    app, _ = make_app(offload, OFFLOAD_DASHBOARD=True, OFFLOAD_WORKERS=0)
    offload.dashboard_access(lambda: verdict)

    @app.post("/login")
    @offload.background
    def login() -> str:
        return "welcome"

    client = app.test_client()
    client.set_cookie("session", SESSION)
    headers = {
        "Authorization": f"Bearer {BEARER}",
        "Proxy-Authorization": f"Basic {PROXY_PASS}",
        "X-Request-Note": "visible-note",
    }
    answer = client.post(
        "/login",
        data=LOGIN_BODY,
        content_type="application/x-www-form-urlencoded",
        headers=headers,
    )
    assert answer.status_code == 202
    job_id = answer.json["id"]  # type: ignore[index]
    stored = offload.runtime(app).get(job_id)
    assert stored is not None and SESSION in stored.args_json, "the worker still gets them"
    viewer = app.test_client()
    text = shown(viewer, job_id)
    assert "visible-note" in text and "/login" in text, "the rest of the request is shown"
    body_b64 = base64.b64encode(LOGIN_BODY.encode()).decode()
    for secret in (SESSION, BEARER, PROXY_PASS, PASSWORD, body_b64, body_b64[:12]):
        assert secret not in text, secret
        assert not found(viewer, secret, job_id), secret
    assert found(viewer, "visible-note", job_id), "what is shown is searched"
    if verdict is True:  # a bulk action finds what the search finds
        form = {"csrf": token(viewer), "verb": "delete", "q": SESSION}
        ask = viewer.post("/offload/bulk", data=form, headers=ORIGIN)
        assert "Delete 0 job(s)" in ask.get_data(as_text=True)


def test_the_app_masks_task_arguments_by_name(make_app: AppFactory) -> None:
    """``OFFLOAD_DASHBOARD_MASK`` hides, by name and at any depth, keyword arguments, keys of
    dicts and positional arguments (named by the task's signature), from the page and the
    search alike."""
    offload = Offload()

    @offload.task(name="signup")
    def signup(email: str, password: str, options: dict[str, Any], **extra: Any) -> None:
        return None

    app, _ = make_app(
        offload,
        DEBUG=True,
        OFFLOAD_DASHBOARD=True,
        OFFLOAD_WORKERS=0,
        OFFLOAD_DASHBOARD_MASK=["password", "token"],
    )
    secrets = ["pos-secret-1", "nested-secret-2", "api-secret-3", "kw-secret-4"]
    with app.app_context():
        job = signup.delay(
            "dana@example.com",
            secrets[0],
            {"theme": "dark", "accounts": [{"Password": secrets[1]}], "api_token": secrets[2]},
            reset_token=secrets[3],
        )
    client = app.test_client()
    text = shown(client, job.id)
    assert "dana@example.com" in text and "dark" in text and "reset_token" in text
    for secret in secrets:
        assert secret not in text, secret
        assert not found(client, secret, job.id), secret
    assert found(client, "dana@example", job.id)
    assert found(client, "theme", job.id)
    with app.app_context():
        shown_once = signup.delay("needle@example.com", "x", {}).id
        hidden = [signup.delay("y", "needle@example.com", {}).id for _ in range(120)]
    html = client.get("/offload/list?q=needle@example").get_data(as_text=True)
    assert shown_once[:12] in html, "found past more than two pages of masked matches"
    assert not any(job_id[:12] in html for job_id in hidden)


def test_the_mask_setting_is_checked_at_init_app(make_app: AppFactory) -> None:
    with pytest.raises(TypeError, match="OFFLOAD_DASHBOARD_MASK must be a list"):
        make_app(OFFLOAD_DASHBOARD=True, OFFLOAD_DASHBOARD_MASK=5)


# -- mounted under a prefix, malformed queries --------------------------------------------


def test_actions_work_when_the_app_is_mounted_under_a_prefix(site: Any) -> None:
    """Under ``SCRIPT_NAME=/app`` the CSRF cookie is scoped to ``/app/offload``, so the
    browser sends it back with the actions."""
    app, offload, _ = site
    client = app.test_client()
    base = "http://localhost/app"
    page = client.get("/offload/queues", base_url=base)
    cookie = page.headers["Set-Cookie"]
    assert "Path=/app/offload" in cookie, cookie
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.get_data(as_text=True))
    assert csrf is not None
    answer = client.post(
        "/offload/queues/mail/pause",
        data={"csrf": csrf.group(1)},
        headers=ORIGIN,
        base_url=base,
    )
    assert answer.status_code == 303
    assert answer.headers["Location"].startswith("/app/offload/queues")
    assert offload.runtime(app).backend.paused_queues() == {"mail"}


@pytest.mark.parametrize(
    "query",
    [
        "before=99999999999999999999",
        "before=-1",
        "before=0",
        "before=abc",
        "before=1.5",
        "before=1e3",
        "state=bogus",
        "task=" + "t" * 201,
        "q=a%00b",
        "task=a%00b",
        "queue=%01",
        "key=x%00",
    ],
)
def test_a_malformed_paging_or_filter_value_answers_400(site: Any, query: str) -> None:
    """On the list (page and live JSON) and, for the filters, on a bulk action, which then
    changes nothing."""
    app, offload, _ = site
    client = app.test_client()
    assert client.get(f"/offload/list?{query}").status_code == 400
    assert client.get(f"/offload/list?{query}", headers={"X-Offload-Live": "1"}).status_code == 400
    name, value = query.split("=", 1)
    if name == "before":  # a bulk action has no pages
        return
    before = snapshot(app, offload)
    form = {"csrf": token(client), "verb": "delete", "confirmed": "yes"}
    form[name] = urllib.parse.unquote(value)
    assert client.post("/offload/bulk", data=form, headers=ORIGIN).status_code == 400
    assert snapshot(app, offload) == before


def test_well_formed_filters_still_work(site: Any) -> None:
    app, _, ids = site
    client = app.test_client()
    for query in ["", "state=", "state=failed", "before=", "task=send&queue=mail", "q=%25"]:
        assert client.get(f"/offload/list?{query}").status_code == 200, query
    html = client.get("/offload/list?before=1").get_data(as_text=True)
    assert ids["failed"][:12] not in html


# -- reads beside writes ------------------------------------------------------------------


def test_an_enqueue_completes_while_a_dashboard_read_is_held_open(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dashboard's reads go through a connection of their own: while one of them is
    held inside SQLite (its read transaction open), an enqueue of the same process commits."""
    offload = Offload()

    @offload.task(name="visit")
    def visit(n: int) -> None:
        return None

    reading = threading.Event()
    release = threading.Event()
    readers: list[threading.Thread] = []

    def hold_reads(db: sqlite3.Connection) -> None:
        """Block any statement the reading thread runs, mid-statement, until released."""

        def progress() -> int:
            if threading.current_thread() in readers and not release.is_set():
                reading.set()
                release.wait(30)
            return 0

        db.set_progress_handler(progress, 1)

    connect = SQLiteBackend._connect

    def instrumented(self: SQLiteBackend, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        db = connect(self, *args, **kwargs)
        hold_reads(db)
        return db

    monkeypatch.setattr(SQLiteBackend, "_connect", instrumented)
    app, _ = make_app(offload, DEBUG=True, OFFLOAD_DASHBOARD=True, OFFLOAD_WORKERS=0)
    with app.app_context():
        visit.delay(0)
    pages: list[int] = []
    reader = threading.Thread(
        target=lambda: pages.append(app.test_client().get("/offload/").status_code)
    )
    readers.append(reader)
    reader.start()
    try:
        assert reading.wait(10), "the overview started reading"
        stored = threading.Event()

        def enqueue() -> None:
            with app.app_context():
                visit.delay(1)
            stored.set()

        writer = threading.Thread(target=enqueue, daemon=True)
        writer.start()
        assert stored.wait(10), "the enqueue waited for the dashboard's read"
        assert reader.is_alive(), "the read was still held open meanwhile"
    finally:
        release.set()
        reader.join(10)
    assert pages == [200]
    assert offload.runtime(app).backend.counts()[("visit", "queued")] == 2


def test_open_tabs_share_one_count(site: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Twenty tabs polling the overview at once, and a scrape, cost one count of the jobs;
    the next poll, a second later, counts again."""
    app, offload, _ = site
    backend = offload.runtime(app).backend
    calls: list[float] = []
    count = backend.counts

    def counted() -> Any:
        calls.append(time.monotonic())
        return count()

    monkeypatch.setattr(backend, "counts", counted)
    monkeypatch.setattr(queries, "COST_SHARE", 0)  # shared for FRESH seconds, however slow
    answers: list[int] = []

    def tab() -> None:
        answers.append(
            app.test_client().get("/offload/", headers={"X-Offload-Live": "1"}).status_code
        )

    tabs = [threading.Thread(target=tab) for _ in range(20)]
    for each in tabs:
        each.start()
    for each in tabs:
        each.join(30)
    assert answers == [200] * 20 and len(calls) == 1
    client = app.test_client()
    assert client.get("/offload/metrics").status_code == 200 and len(calls) == 2
    assert client.get("/offload/metrics").status_code == 200 and len(calls) == 2
    time.sleep(queries.FRESH)
    assert "1 succeeded, 1 failed" in client.get("/offload/").get_data(as_text=True)
    assert len(calls) == 3


def test_tabs_share_one_live_render_each_with_its_own_token_and_rights(site: Any) -> None:
    """The overview's live part is rendered once a second for every tab with the same rights:
    each tab still gets its own CSRF token, and a read-only tab never an admin's forms."""
    app, offload, _ = site
    verdict: dict[str, Any] = {"value": True}
    offload.dashboard_access(lambda: verdict["value"])
    live = {"X-Offload-Live": "1"}
    tabs = [app.test_client() for _ in range(3)]
    tokens = [token(tab) for tab in tabs]
    assert len(set(tokens)) == 3
    mains = [tab.get("/offload/", headers=live).get_json()["main"] for tab in tabs]
    for main, own in zip(mains, tokens, strict=True):
        assert re.findall(r'name="csrf" value="([^"]+)"', main) == [own] * main.count('name="csrf"')
        assert 'name="csrf"' in main and "csrf-" not in main.replace(own, "")
    assert mains[0].replace(tokens[0], "") == mains[1].replace(tokens[1], ""), "one render"
    verdict["value"] = "read"
    read_only = tabs[2].get("/offload/", headers=live).get_json()["main"]
    assert 'name="csrf"' not in read_only and 'method="post"' not in read_only


def test_a_slow_read_is_shared_for_longer(site: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read that takes 0.3 s answers the tabs for COST_SHARE times that (6 s), not one:
    open tabs then never spend more than a twentieth of the process's time reading."""
    app, offload, _ = site
    backend = offload.runtime(app).backend
    calls: list[float] = []
    count = backend.counts

    def slow() -> Any:
        calls.append(time.monotonic())
        time.sleep(0.3)
        return count()

    monkeypatch.setattr(backend, "counts", slow)
    client = app.test_client()
    assert client.get("/offload/", headers={"X-Offload-Live": "1"}).status_code == 200
    time.sleep(queries.FRESH + 0.2)
    assert client.get("/offload/", headers={"X-Offload-Live": "1"}).status_code == 200
    assert len(calls) == 1, "still the answer of the slow read"
