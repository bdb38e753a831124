"""The dashboard and the metrics through Flask's test client, on a real SQLite file: who gets
in, what a refusal shows, that actions need a POST from this origin with the CSRF token, and
that the pages show and do what they say."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from conftest import AppFactory
from flask_offload import Offload
from flask_offload.job import Outcome

ORIGIN = {"Origin": "http://localhost"}
SECRET = "alice@example.com"
PAGES = ["/offload/", "/offload/list", "/offload/workers", "/offload/periodic", "/offload/queues"]


@pytest.fixture
def site(make_app: AppFactory) -> Iterator[tuple[Flask, Offload, dict[str, str]]]:
    """An app with the dashboard on and no pool (jobs are moved by hand): one failed, one
    succeeded, one queued job, in queue ``mail``."""
    offload = Offload()

    @offload.task(name="send", queue="mail")
    def send(to: str) -> str:
        return to

    @offload.periodic(every=3600, name="hourly")
    def hourly() -> None:
        return None

    app, _ = make_app(offload, OFFLOAD_DASHBOARD=True, OFFLOAD_WORKERS=0)
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


def test_a_remote_client_gets_a_bare_403_without_the_hook(site: Any) -> None:
    app, offload, ids = site
    client = app.test_client()
    remote = {"REMOTE_ADDR": "203.0.113.9"}
    before = snapshot(app, offload)
    for path in [*PAGES, f"/offload/job/{ids['failed']}", f"/offload/job/{'0' * 32}"]:
        answer = client.get(path, environ_base=remote)
        assert answer.status_code == 403, path
        body = answer.get_data(as_text=True)
        assert body == "Forbidden\n", "no job, no argument, no reason leaks"
    assert client.get("/offload/metrics", environ_base=remote).status_code == 403
    for path, form in action_posts(ids):
        assert client.post(path, data=form, headers=ORIGIN, environ_base=remote).status_code == 403
    assert snapshot(app, offload) == before
    proxied = client.get("/offload/", headers={"X-Forwarded-For": "203.0.113.9"})
    assert proxied.status_code == 403, "a proxy on this host does not make its clients local"
    assert client.get("/offload/").status_code == 200, "loopback is let in"


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


def test_bulk_actions_ask_first_and_are_capped(site: Any) -> None:
    app, offload, _ = site
    app.config["OFFLOAD_DASHBOARD_BULK_LIMIT"] = 2
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
        assert offload.drain() == 1
        assert ran == ["other 2"]
        assert offload.resume_queue("mail") and offload.drain() == 1
    assert ran == ["other 2", "mail 1"]


def test_overview_shows_counts_chart_and_workers(site: Any) -> None:
    app, _, _ = site
    html = app.test_client().get("/offload/").get_data(as_text=True)
    assert "1 succeeded, 1 failed" in html
    assert html.count('<rect class="ok"') == 60
    assert time.strftime("%H:%M") in html
