"""Real storage faults on SQLite: a full disk, a damaged file, a file that cannot be used.
Each error names the setting and the file, and none of them makes the pool run work twice."""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from conftest import AppFactory, start_pool, wait_until
from flask_offload import Offload
from flask_offload.backends import SQLiteBackend
from flask_offload.pool import Pool


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MB filesystem (tmpfs, mounted as root), unmounted afterwards."""
    volume = tmp_path / "volume"
    volume.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(volume)], capture_output=True
    )
    if mounted.returncode != 0:
        reason = f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield volume
    finally:
        subprocess.run(["umount", "-l", str(volume)], check=False)


def fill(path: Path) -> None:
    """Write to ``path`` until the volume is full."""
    with path.open("wb", buffering=0) as sink:
        try:
            while True:
                sink.write(b"\0" * 4096)
        except OSError:
            pass


def test_a_full_small_volume_recovers_once_space_is_freed(
    make_app: AppFactory,
    small_volume: Path,
    caplog: pytest.LogCaptureFixture,
    pools: list[Pool],
) -> None:
    """Outcomes fill the volume with WAL; once a file beside it is deleted, the WAL must not
    grow back into the space freed: it is checkpointed and truncated, and the jobs finish."""
    app, offload = make_app(OFFLOAD_URL=f"sqlite:///{small_volume / 'jobs.db'}", OFFLOAD_WORKERS=0)
    ran: Counter[int] = Counter()

    @offload.task
    def report(n: int) -> str:
        ran[n] += 1
        return "x" * 3000  # outcomes that make the WAL grow

    filler = small_volume / "filler"
    with app.app_context():
        jobs = [report.delay(n) for n in range(300)]
    fill(filler)
    os.truncate(filler, filler.stat().st_size - 300_000)  # less than the outcomes need
    start_pool(pools, app, offload, threads=2, lease=1.0, poll_interval=0.05)
    wait_until(lambda: "full" in caplog.text, timeout=30)
    filler.unlink()
    for job in jobs:
        assert job.wait(timeout=60).state == "succeeded"
    assert set(ran) == set(range(300))


def test_a_damaged_file_is_named_and_the_pool_stops_claiming(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "jobs.db"
    offload = Offload()
    ran: Counter[int] = Counter()

    @offload.task(name="damaged.work")
    def work(n: int) -> None:
        ran[n] += 1

    def make(**settings: Any) -> Flask:
        app = Flask(__name__, instance_path=str(tmp_path))
        app.config.update(OFFLOAD_URL=f"sqlite:///{path}", OFFLOAD_WORKERS=0, **settings)
        offload.init_app(app)
        return app

    with make().app_context():
        for n in range(3000):
            work.delay(
                n,
            )
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = path.stat().st_size
    with path.open("r+b") as damaged:
        damaged.seek(size // 2)
        damaged.write(os.urandom(size // 4))

    caplog.set_level(logging.INFO, "flask_offload")
    app = make(OFFLOAD_POLL_INTERVAL=0.05)
    runtime = offload.runtime(app)
    runtime.start([(2, None)])
    try:
        wait_until(lambda: "is damaged or not a SQLite database" in caplog.text, timeout=30)
        record = next(r for r in caplog.records if "is damaged" in r.getMessage())
        assert record.levelno == logging.CRITICAL and str(path) in record.getMessage()
        assert "OFFLOAD_URL" in record.getMessage() and "stops claiming" in record.getMessage()
    finally:
        runtime.stop(5)
    assert all(count == 1 for count in ran.values()), "no job ran twice"
    said = [r for r in caplog.records if "is damaged or not a SQLite database" in r.getMessage()]
    assert len(said) == 1, "said once, not in a retry loop"


def test_one_damaged_history_is_not_a_damaged_database(
    make_app: AppFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLite answers "malformed JSON" for one row whose history is not JSON (a hand edit, a
    bad restore): that is no damaged file. Its jobs finish, a lost one is taken back, and the
    pool goes on claiming."""
    caplog.set_level(logging.INFO, "flask_offload")
    app, offload = make_app(OFFLOAD_WORKERS=0, OFFLOAD_LEASE=1)

    @offload.task(retries=2)
    def work(n: int) -> int:
        return n

    with app.app_context():
        damaged = [work.delay(n) for n in range(2)]
    backend = offload.runtime(app).backend
    lost = backend.claim("dead", [damaged[1].task], None, 2, -1)
    assert {job.id for job in lost} == {job.id for job in damaged}
    backend.release(next(job for job in lost if job.id == damaged[0].id))
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        db.execute("UPDATE offload_jobs SET history_json = '[{\"attempt\": 1,'")
    pools: list[Pool] = []
    try:
        start_pool(pools, app, offload, threads=2, poll_interval=0.05)
        for job in damaged:
            assert job.wait(timeout=30).state == "succeeded"
        with app.app_context():
            assert work.delay(7).wait(timeout=30).result == 7, "the pool goes on"
    finally:
        for pool in pools:
            pool.stop(5)
    assert "is damaged" not in caplog.text
    assert [h["outcome"] for h in damaged[1].history] == ["lost", "succeeded"]


@pytest.mark.parametrize("case", ["no folder", "not a database", "read-only"])
def test_storage_that_cannot_be_used_is_named_at_init_app(
    tmp_path: Path, case: str, small_volume: Path
) -> None:
    if case == "no folder":
        url, expected = "sqlite:////nonexistent/dir/jobs.db", "check that its folder exists"
    elif case == "not a database":
        junk = tmp_path / "junk.db"
        junk.write_bytes(b"these are not the pages you are looking for" * 200)
        url, expected = f"sqlite:///{junk}", "damaged or not a SQLite database"
    else:
        SQLiteBackend(str(small_volume / "jobs.db")).close()
        subprocess.run(["mount", "-o", "remount,ro", str(small_volume)], check=True)
        url = f"sqlite:///{small_volume / 'jobs.db'}"
        expected = "read-only|may write there"
    app = Flask(__name__, instance_path=str(tmp_path))
    app.config.update(OFFLOAD_URL=url)
    with pytest.raises(Exception, match=expected) as raised:
        Offload(app)
    message = str(raised.value)
    assert "OFFLOAD_URL" in message and url.removeprefix("sqlite:///") in message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("OFFLOAD_LEASE", float("nan")),
        ("OFFLOAD_LEASE", float("inf")),
        ("OFFLOAD_POLL_INTERVAL", float("nan")),
        ("OFFLOAD_POLL_INTERVAL", "inf"),
        ("OFFLOAD_SHUTDOWN_TIMEOUT", float("nan")),
        ("OFFLOAD_RESULT_TTL", float("nan")),
        ("OFFLOAD_URL_PREFIX", 5),
        ("OFFLOAD_URL_PREFIX", "no-slash"),
        ("OFFLOAD_MAX_REQUEST_BYTES", float("inf")),
    ],
)
def test_every_setting_is_checked_at_init_app_naming_its_key(
    tmp_path: Path, key: str, value: Any
) -> None:
    app = Flask(__name__, instance_path=str(tmp_path))
    app.config.update({"OFFLOAD_URL": "memory://", key: value})
    with pytest.raises((ValueError, TypeError), match=key):
        Offload(app)
