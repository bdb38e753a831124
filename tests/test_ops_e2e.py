"""Operations end to end: signals and metrics under a real gunicorn with 4 workers, and the
dashboard driven in headless Chromium against a real app with real pools."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

from conftest import free_port, process, subprocess_env, wait_until

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent
# The README shows these screenshots: a run writes them to docs/ only when asked
# (OFFLOAD_SCREENSHOTS=docs), so the suite leaves the checkout as it found it.
DOCS = ROOT / ("docs" if os.environ.get("OFFLOAD_SCREENSHOTS") == "docs" else "test-artifacts")
ADMIN = {"X-Test-User": "admin"}


def signal_lines(tmp_path: Path) -> list[tuple[str, str, int]]:
    """(event, job id, pid) of every signal opsapp logged."""
    path = tmp_path / "signals.log"
    if not path.exists():
        return []
    return [
        (event, job_id, int(pid))
        for event, job_id, pid in (line.split() for line in path.read_text().splitlines())
    ]


def up(url: str) -> bool:
    """True once the server answers; a worker still booting may leave a request waiting."""
    try:
        return requests.get(url, timeout=5).ok
    except requests.RequestException:
        return False


@contextmanager
def gunicorn(tmp_path: Path, workers: int, **config: str) -> Iterator[str]:
    """opsapp under gunicorn on a free port; yields its base URL, then stops it by SIGTERM."""
    port = free_port()
    env = subprocess_env(
        OPSAPP_LOG=str(tmp_path / "signals.log"),
        OPSAPP_FAIL=str(tmp_path / "fail"),
        OPSAPP_INSTANCE=str(tmp_path / "instance"),
        OFFLOADTEST_OFFLOAD_URL=f"sqlite:///{tmp_path / 'jobs.db'}",
        OFFLOADTEST_OFFLOAD_DASHBOARD="true",
        OFFLOADTEST_OFFLOAD_POLL_INTERVAL="0.1",
        **{f"OFFLOADTEST_OFFLOAD_{key}": value for key, value in config.items()},
    )
    args = [sys.executable, "-m", "gunicorn", "-w", str(workers), "-b", f"127.0.0.1:{port}"]
    log = tmp_path / "gunicorn.log"
    with process([*args, "opsapp:create_app()"], env, log) as server:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: up(f"{base}/pid"), timeout=60)
        # every worker has loaded the app, so requests can reach any of them
        wait_until(lambda: log.read_text().count("started 2 threads") >= workers, timeout=60)
        yield base
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    text = log.read_text()
    refused = "ConnectionRefusedError: the mail server refused message"
    assert text.count("Traceback") == text.count(refused), "only the failing task's tracebacks"
    assert "signal handler failed" not in text


def test_signals_and_metrics_under_gunicorn_with_four_workers(tmp_path: Path) -> None:
    """Each job's signals are sent once, in the process where each event happened; every
    worker process answers /metrics with the same storage-wide figures."""
    jobs = 40
    with gunicorn(tmp_path, 4, METRICS_TOKEN="scrape-me") as base:
        enqueued_by: dict[str, int] = {}
        for n in range(jobs):
            answer = requests.post(
                f"{base}/enqueue/record", json=[n], headers={"Connection": "close"}, timeout=10
            )
            enqueued_by[answer.json()["id"]] = int(answer.headers["X-Served-By"])

        def succeeded() -> int:
            return sum(event == "job_succeeded" for event, _, _ in signal_lines(tmp_path))

        wait_until(lambda: succeeded() == jobs, timeout=60)
        lines = signal_lines(tmp_path)
        per_job = Counter((event, job_id) for event, job_id, _ in lines)
        for job_id in enqueued_by:
            for event in ("job_enqueued", "job_started", "job_succeeded"):
                assert per_job[event, job_id] == 1, (event, job_id)
        assert {e for e, _, _ in lines} == {"job_enqueued", "job_started", "job_succeeded"}
        enqueue_pids = {job_id: pid for event, job_id, pid in lines if event == "job_enqueued"}
        assert enqueue_pids == enqueued_by, "job_enqueued is sent by the process that stored it"
        assert len(set(enqueued_by.values())) >= 2, "the enqueues were spread over workers"
        started = {job_id: pid for event, job_id, pid in lines if event == "job_started"}
        finished = {job_id: pid for event, job_id, pid in lines if event == "job_succeeded"}
        assert started == finished, "a job's outcome is signalled where it ran"

        seen: dict[int, str] = {}
        refused = requests.get(f"{base}/offload/metrics", timeout=10)
        assert refused.status_code == 403, "not a dashboard user, no token"
        bearer = {"Authorization": "Bearer scrape-me", "Connection": "close"}

        def scrape_every_worker() -> bool:
            wanted = f'offload_jobs{{state="succeeded",task="ops.record"}} {jobs}.0'
            answer = requests.get(f"{base}/offload/metrics", headers=bearer, timeout=10)
            assert answer.status_code == 200
            text = answer.text
            if wanted in text and "offload_workers 4.0" in text:
                seen[int(answer.headers["X-Served-By"])] = text
            return len(seen) >= 3

        wait_until(scrape_every_worker, timeout=60, every=0.05)
        for text in seen.values():
            assert f'offload_job_run_seconds_bucket{{le="+Inf",task="ops.record"}} {jobs}.0' in text


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_the_dashboard_in_a_real_browser(tmp_path: Path) -> None:
    """Filter to failed jobs, open one and read its traceback and history, retry it and see
    it succeed live; bulk-retry the others; pause a queue and see nothing claimed from it;
    watch a running job's progress move. Screenshots of each page go to test-artifacts/ (to
    docs/ with OFFLOAD_SCREENSHOTS=docs)."""
    browser_path = _chromium()
    if browser_path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("Debian's chromium is not installed (.ci/run installs it)")
        pytest.skip("Debian's chromium is not installed: apt-get install chromium")
    playwright = pytest.importorskip("playwright.sync_api")
    (tmp_path / "fail").touch()
    with gunicorn(tmp_path, 2) as base:

        def enqueue(kind: str, *args: Any) -> str:
            answer = requests.post(f"{base}/enqueue/{kind}", json=list(args), timeout=10)
            return str(answer.json()["id"])

        def state(job_id: str) -> str:
            found = re.search(r'class="state state-(\w+)"', page_html(job_id))
            return found.group(1) if found else ""

        def page_html(job_id: str) -> str:
            return requests.get(
                f"{base}/offload/dashboard/jobs/{job_id}", headers=ADMIN, timeout=10
            ).text

        failing = [enqueue("flaky", n) for n in range(4)]
        for n in range(6):
            enqueue("record", n)
        wait_until(lambda: all(state(job_id) == "failed" for job_id in failing), timeout=60)
        DOCS.mkdir(exist_ok=True)
        violations: list[str] = []
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=browser_path,
                args=["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync"],
            )
            try:
                context = browser.new_context(
                    extra_http_headers=ADMIN, viewport={"width": 1280, "height": 900}
                )
                page = context.new_page()
                page.on(
                    "console",
                    lambda m: violations.append(m.text) if "Security Policy" in m.text else None,
                )
                page.on("dialog", lambda dialog: dialog.accept())
                page.goto(f"{base}/offload/")
                page.wait_for_selector("svg.chart")
                page.screenshot(path=str(DOCS / "dashboard-overview.png"), full_page=True)

                # Filter to failed jobs with the form: the filter lands in the URL.
                page.click("text=Jobs")
                page.select_option("select[name=state]", "failed")
                page.click("button:has-text('Filter')")
                page.wait_for_url(re.compile(r".*state=failed.*"))
                rows = page.locator("table.jobs tbody tr")
                assert rows.count() == len(failing)
                page.screenshot(path=str(DOCS / "dashboard-jobs.png"), full_page=True)

                # Open the oldest failed job: its error, traceback and history.
                target = failing[0]
                page.click(f"a[href$='/dashboard/jobs/{target}']")
                page.wait_for_selector("#history")
                page.click("#history details summary")
                assert "ConnectionRefusedError" in page.inner_text("#history pre.traceback")
                assert "Traceback (most recent call last)" in page.inner_text("#history")
                page.screenshot(path=str(DOCS / "dashboard-job-failed.png"), full_page=True)

                # Retry it now that the mail server answers, and watch it succeed live.
                (tmp_path / "fail").unlink()
                page.click("button:has-text('Retry')")
                page.wait_for_selector("#job-state .state-succeeded", timeout=30_000)
                assert page.locator("#history tbody tr").count() == 2, "both attempts shown"
                page.screenshot(path=str(DOCS / "dashboard-job.png"), full_page=True)

                # Bulk-retry the remaining failed jobs, confirmed.
                page.goto(f"{base}/offload/list?state=failed")
                page.click("button:has-text('Retry all')")
                assert "Retry 3 job(s)" in page.inner_text("main")
                page.click("#confirm")
                page.wait_for_url(re.compile(r".*notice=.*"))
                assert "retry: 3 of 3" in page.inner_text(".notice")
                wait_until(lambda: all(state(j) == "succeeded" for j in failing), timeout=60)
                page.wait_for_selector("text=No job matches.", timeout=15_000)

                # Pause the mail queue: a job there stays queued; resume: it runs.
                page.goto(f"{base}/offload/queues")
                page.click("tr[data-queue=mail] button:has-text('Pause')")
                page.wait_for_selector("tr[data-queue=mail] .state-paused")
                paused_job = enqueue("mail", 1)
                control = enqueue("record", 100)  # enqueued after it: other queues go on
                wait_until(lambda: state(control) == "succeeded", timeout=30)
                assert state(paused_job) == "queued", "nothing is claimed from a paused queue"
                page.reload()
                page.screenshot(path=str(DOCS / "dashboard-queues.png"), full_page=True)
                page.click("tr[data-queue=mail] button:has-text('Resume')")
                wait_until(lambda: state(paused_job) == "succeeded", timeout=30)

                # Watch a running job's progress move, live.
                slow = enqueue("progress", 8, 0.5)
                page.goto(f"{base}/offload/dashboard/jobs/{slow}")

                def progress() -> float:
                    bar = page.locator("#job-progress")
                    return float(bar.get_attribute("value") or 0) if bar.count() else 0.0

                # Polled from here: a page function would need eval, which the CSP forbids.
                first = wait_until(lambda: 2 <= progress() < 8 and progress(), timeout=30)
                page.screenshot(path=str(DOCS / "dashboard-progress.png"), full_page=True)
                wait_until(lambda: progress() > first, timeout=30)
                page.wait_for_selector("#job-state .state-succeeded", timeout=30_000)

                for name in ("workers", "periodic"):
                    page.goto(f"{base}/offload/{name}")
                    page.screenshot(path=str(DOCS / f"dashboard-{name}.png"), full_page=True)
                assert "ops.hourly" in page.inner_text("main")
            finally:
                browser.close()
        assert violations == [], "the pages run under their strict Content-Security-Policy"
