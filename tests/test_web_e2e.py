"""Background views end to end: a real gunicorn with 2 workers, and a real browser."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import requests

from conftest import answers, free_port, jobapp_env, process, wait_until

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent
ARTIFACTS = ROOT / "test-artifacts"


def test_the_poll_lands_on_another_gunicorn_worker_and_gets_the_views_response(
    tmp_path: Path,
) -> None:
    """202 + Location at once, Retry-After while pending, then the view's own status, headers
    and body, even when the poll is served by a process other than the one that ran it."""
    port = free_port()
    env = jobapp_env(tmp_path, OFFLOADTEST_OFFLOAD_POLL_INTERVAL="0.2")
    args = [
        sys.executable,
        "-m",
        "gunicorn",
        "-w",
        "2",
        "-b",
        f"127.0.0.1:{port}",
        "jobapp:create_app()",
    ]
    log = tmp_path / "gunicorn.log"
    base = f"http://127.0.0.1:{port}"
    with process(args, env, log) as server:
        wait_until(lambda: answers(f"{base}/pid"))
        accepted = requests.post(
            f"{base}/background/7", params={"q": "x", "sleep": "1"}, timeout=10
        )
        assert accepted.status_code == 202
        location = accepted.headers["Location"]
        assert accepted.json()["url"] == location
        pending = requests.get(base + location, timeout=10)
        assert pending.status_code == 202 and pending.headers["Retry-After"] == "1"
        assert pending.json()["state"] in ("queued", "running")

        seen: dict[str, requests.Response] = {}

        def poll_from_both_workers() -> bool:
            answer = requests.get(base + location, headers={"Connection": "close"}, timeout=10)
            if answer.status_code != 202:
                seen.setdefault(answer.headers["X-Served-By"], answer)
            return len(seen) == 2

        wait_until(poll_from_both_workers, timeout=60, every=0.01)
        runner = next(iter(seen.values())).headers["X-Ran-In"]
        for answer in seen.values():
            assert answer.status_code == 201
            assert answer.json() == {"n": 7, "q": "x", "ran_in": int(runner)}
            assert answer.headers["X-Ran-In"] == runner
        assert set(seen) - {runner}, "one poll was served by the process that did not run it"
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    text = log.read_text()
    assert "Traceback" not in text and "database is locked" not in text


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_the_reports_page_fills_its_progress_bar_in_a_real_browser(tmp_path: Path) -> None:
    """Click the example's button in headless Chromium; the bar reaches 100 % and the report
    appears. The screenshot is kept in test-artifacts/."""
    browser_path = _chromium()
    if browser_path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("Debian's chromium is not installed (.ci/run installs it)")
        pytest.skip("Debian's chromium is not installed: apt-get install chromium")
    playwright = pytest.importorskip("playwright.sync_api")
    shutil.copy(ROOT / "examples" / "reports.py", tmp_path / "reports.py")
    port = free_port()
    args = [sys.executable, "-m", "flask", "--app", "reports", "run", "--port", str(port)]
    out = tmp_path / "server.log"
    with process(args, {**os.environ, "PYTHONUNBUFFERED": "1"}, out, cwd=tmp_path) as server:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: answers(base + "/"))
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=browser_path,
                args=[
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--no-first-run",
                ],
            )
            try:
                page = browser.new_page()
                page.goto(f"{base}/?steps=5")
                page.click("#start")
                page.wait_for_function(
                    "document.getElementById('bar').value > 0"
                    " && document.getElementById('bar').value < 100",
                    timeout=20_000,
                )
                page.wait_for_selector("text=Report ready", timeout=30_000)
                assert page.eval_on_selector("#bar", "el => el.value") == 100
                assert page.text_content("#percent") == "100%"
                assert "5 sections" in (page.text_content("#result") or "")
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "reports.png"))
            finally:
                browser.close()
        server.send_signal(signal.SIGINT)
        server.wait(30)
    assert (ARTIFACTS / "reports.png").stat().st_size > 1000
    assert "Traceback" not in out.read_text()
