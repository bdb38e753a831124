"""The README's demo: examples/visits.py under a real `flask run`."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import requests

from conftest import answers, free_port, process, wait_until

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_visits_are_recorded_in_the_background_and_notify(tmp_path: Path) -> None:
    """Pages answer at once; the visits land in the example's table; the tenth visit of a page
    queues a notification; Ctrl-C stops the server and its pool."""
    shutil.copy(ROOT / "examples" / "visits.py", tmp_path / "visits.py")
    port = free_port()
    out = tmp_path / "out.log"
    args = [sys.executable, "-m", "flask", "--app", "visits", "run", "--port", str(port)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with process(args, env, out, cwd=tmp_path) as server:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: answers(f"{base}/visits"))
        for _ in range(10):
            page = requests.get(f"{base}/pages/about", timeout=10)
            assert page.status_code == 200 and "recorded in the background" in page.text
        wait_until(lambda: requests.get(f"{base}/visits", timeout=10).json() == {"about": 10})
        wait_until(lambda: "NOTIFICATION: about has 10 visits" in out.read_text())
        server.send_signal(signal.SIGINT)
        assert server.wait(30) is not None
    assert (tmp_path / "instance" / "visits-jobs.db").exists()
    assert "Traceback" not in out.read_text()
