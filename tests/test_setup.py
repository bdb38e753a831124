"""Setting an app up as a user does: configuration from the environment (the scale-out
recipe), storage opened on first use, and storage that cannot be used named in one error."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flask import Flask

import pgtest
from conftest import free_port, process, subprocess_env
from flask_offload import Offload
from flask_offload.backends import SQLiteBackend, mask_password


def flask_command(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``flask --app plainapp ARGS`` in a subprocess, its instance folder in tmp_path."""
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", "plainapp", *args],
        env=subprocess_env(PLAINAPP_INSTANCE=str(tmp_path / "instance"), **env),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No FLASK_OFFLOAD_* variable of the developer's shell reaches the test's apps."""
    for name in list(__import__("os").environ):
        if name.startswith("FLASK_OFFLOAD_"):
            monkeypatch.delenv(name)
    return monkeypatch


# -- the environment --------------------------------------------------------------------------


def test_flask_offload_variables_configure_an_app_that_never_reads_them(
    tmp_path: Path, clean_environment: pytest.MonkeyPatch
) -> None:
    clean_environment.setenv("FLASK_OFFLOAD_URL", f"sqlite:///{tmp_path / 'from-env.db'}")
    clean_environment.setenv("FLASK_OFFLOAD_WORKERS", "0")
    clean_environment.setenv("FLASK_OFFLOAD_EAGER", "false")
    app = Flask(__name__, instance_path=str(tmp_path / "instance"))
    offload = Offload(app)
    runtime = offload.runtime(app)
    assert isinstance(runtime.backend, SQLiteBackend)
    assert runtime.backend.path == str(tmp_path / "from-env.db")
    assert app.config["OFFLOAD_WORKERS"] == 0 and app.config["OFFLOAD_EAGER"] is False
    assert not runtime.started, "FLASK_OFFLOAD_WORKERS=0: no pool"


def test_the_apps_own_config_wins_and_the_variable_it_overrides_is_logged(
    tmp_path: Path, clean_environment: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clean_environment.setenv("FLASK_OFFLOAD_URL", f"sqlite:///{tmp_path / 'from-env.db'}")
    app = Flask(__name__, instance_path=str(tmp_path / "instance"))
    app.config.update(OFFLOAD_URL="memory://", TESTING=True)
    offload = Offload(app)
    assert type(offload.runtime(app).backend).__name__ == "MemoryBackend"
    [record] = [r for r in caplog.records if "FLASK_OFFLOAD_URL" in r.getMessage()]
    assert record.levelno == logging.WARNING and "OFFLOAD_URL" in record.getMessage()
    assert str(tmp_path) not in record.getMessage(), "values (passwords) are not logged"


@pytest.mark.slow
def test_the_scale_out_recipe_reaches_the_cli_which_names_the_storage(tmp_path: Path) -> None:
    """README: `export FLASK_OFFLOAD_URL=postgresql://…`, then `flask offload …`."""
    database = pgtest.new_database()
    with_password = database.replace("postgres@", "postgres:s3cret@", 1)  # trust: accepted
    done = flask_command(tmp_path, "offload", "stats", FLASK_OFFLOAD_URL=with_password)
    assert done.returncode == 0, done.stderr
    assert f"storage: PostgreSQL {mask_password(with_password)}" in done.stdout
    assert ":***@" in done.stdout and "s3cret" not in done.stdout + done.stderr
    assert not (tmp_path / "instance").exists(), "the SQLite default was not used"


def test_passwords_are_masked() -> None:
    assert mask_password("postgresql://app:pw@db:5432/app") == "postgresql://app:***@db:5432/app"
    assert mask_password("postgresql://db/app?password=pw&sslmode=require") == (
        "postgresql://db/app?password=***&sslmode=require"
    )
    assert mask_password("postgresql://app@db/app") == "postgresql://app@db/app"
    for bare in ("sqlite:////srv/app/jobs.db", "sqlite:///jobs.db", "memory://"):
        assert mask_password(bare) == bare, "nothing to mask: the URL as it was"


# -- storage opened on first use --------------------------------------------------------------


@pytest.mark.slow
def test_importing_the_app_creates_no_job_store(tmp_path: Path) -> None:
    for args in (["--help"], ["routes"]):
        done = flask_command(tmp_path, *args)
        assert done.returncode == 0, done.stderr
        assert not (tmp_path / "instance").exists(), f"flask {args[0]} created the job store"


def test_the_job_store_is_created_when_first_used(
    tmp_path: Path, clean_environment: pytest.MonkeyPatch
) -> None:
    offload = Offload()

    @offload.task(name="setup.first")
    def first() -> int:
        return 1

    app = Flask(__name__, instance_path=str(tmp_path / "instance"))
    app.config.update(OFFLOAD_WORKERS=0)
    offload.init_app(app)
    assert not (tmp_path / "instance").exists()
    with app.app_context():
        first.delay()
    assert (tmp_path / "instance" / "offload.db").exists()
    offload.runtime(app).backend.close()


def test_a_testing_app_without_its_own_storage_is_warned(
    tmp_path: Path, clean_environment: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for url in (None, "memory://"):
        app = Flask(__name__, instance_path=str(tmp_path / "instance"))
        app.config.update(TESTING=True, **({"OFFLOAD_URL": url} if url else {}))
        Offload(app)
    [warning] = [r for r in caplog.records if "testing" in r.getMessage()]
    assert "OFFLOAD_URL = 'memory://'" in warning.getMessage()
    assert not (tmp_path / "instance").exists()


# -- storage that cannot be used --------------------------------------------------------------


def test_a_missing_folder_is_named_when_the_app_loads(tmp_path: Path) -> None:
    """It fails in init_app, so Flask's CLI shows the factory's traceback: its last line,
    the one people read, names the key and the path."""
    done = flask_command(
        tmp_path, "offload", "jobs", FLASK_OFFLOAD_URL="sqlite:////nonexistent/dir/x.db"
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "OFFLOAD_URL" in last and "/nonexistent/dir/x.db" in last, done.stderr
    assert "folder exists" in last


@pytest.mark.slow
def test_an_unreachable_postgresql_is_one_error_and_the_worker_exits(tmp_path: Path) -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"  # nobody listens there
    out = tmp_path / "worker.log"
    env = subprocess_env(PLAINAPP_INSTANCE=str(tmp_path / "instance"), FLASK_OFFLOAD_URL=url)
    started = time.monotonic()
    with process(
        [sys.executable, "-m", "flask", "--app", "plainapp", "offload", "worker"], env, out
    ) as worker:
        code = worker.wait(60)  # before: it ran on, logging pool retries, until stopped
    assert time.monotonic() - started < 30
    assert code == 1
    text = out.read_text()
    assert "cannot reach PostgreSQL at 127.0.0.1" in text and "OFFLOAD_URL" in text
    assert "Traceback" not in text and "error connecting" not in text, text
    assert text.count("cannot reach PostgreSQL") == 1, text


def test_an_unreachable_postgresql_is_said_once_by_a_pool(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pgtest.require_psycopg()
    offload = Offload()

    @offload.task(name="setup.never")
    def never() -> None: ...

    app = Flask(__name__, instance_path=str(tmp_path))
    app.config.update(
        OFFLOAD_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/nothing",
        OFFLOAD_WORKERS=3,
        OFFLOAD_POLL_INTERVAL=0.05,
        OFFLOAD_LEASE=0.3,  # maintenance (heartbeats) every 0.1 s
    )
    caplog.set_level(logging.INFO)
    offload.init_app(app)
    runtime = offload.runtime(app)
    runtime.start()
    try:
        with app.app_context(), pytest.raises(ConnectionError, match="OFFLOAD_URL"):
            never.delay()
        time.sleep(1.5)  # each of the 3 loop threads fails and retries a few times meanwhile
    finally:
        runtime.stop(5)
        runtime.backend.close()
    said = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and "PostgreSQL at 127.0.0.1" in r.getMessage()
    ]
    assert len([m for m in said if "cannot claim jobs" in m]) == 1, said
    assert len([m for m in said if "maintenance failed" in m]) <= 1, said
    assert not [r for r in caplog.records if r.name.startswith("psycopg")], "no pool retries"
