"""Settings are read once, at ``init_app``: every key of the configuration reference is
checked there (a wrong value names its key), the reference and the code's table of keys agree,
a misspelt key is warned about with the key meant, and a change to ``app.config`` afterwards
changes nothing."""

from __future__ import annotations

import ast
import logging
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from conftest import AppFactory
from flask_offload import Offload
from flask_offload.config import KEYS, PREFIX, Config
from flask_offload.errors import ConfigurationError
from test_docs import REFERENCE, keys_in_the_reference


class Unreadable:
    """A value of no type any setting takes."""

    def __repr__(self) -> str:
        return "<unreadable>"


def reference_sections() -> list[tuple[str, str]]:
    """``(key, its section's text)`` for each key of docs/configuration.md, in its order."""
    parts = re.split(r"^### `(OFFLOAD_\w+)`$", REFERENCE.read_text(), flags=re.M)
    return list(zip(parts[1::2], parts[2::2], strict=True))


@pytest.mark.parametrize("value", [Unreadable(), [1.5]], ids=["object", "list"])
@pytest.mark.parametrize("key", sorted(keys_in_the_reference()))
def test_every_key_of_the_reference_refuses_a_wrong_value_naming_it(
    tmp_path: Path, key: str, value: Any
) -> None:
    app = Flask(__name__, instance_path=str(tmp_path))
    app.config.update({"OFFLOAD_URL": "memory://", "OFFLOAD_WORKERS": 0, key: value})
    with pytest.raises(ConfigurationError) as raised:
        Offload(app)
    message = str(raised.value)
    assert message.startswith(f"{key} must be "), message
    assert message.endswith(f", not {value!r}"), message
    assert "offload" not in app.extensions, "nothing is set up"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("OFFLOAD_DASHBOARD_BULK_LIMIT", "lots"),
        ("OFFLOAD_DASHBOARD_BULK_LIMIT", 0),
        ("OFFLOAD_SQLITE_SYNCHRONOUS", "sometimes"),  # refused with any storage, not only SQLite
        ("OFFLOAD_METRICS_TOKEN", True),
        ("OFFLOAD_DASHBOARD", "maybe"),
        ("OFFLOAD_LEASE", "lots"),
    ],
)
def test_a_value_out_of_range_is_refused_at_init_app(tmp_path: Path, key: str, value: Any) -> None:
    app = Flask(__name__, instance_path=str(tmp_path))
    app.config.update({"OFFLOAD_URL": "memory://", "OFFLOAD_WORKERS": 0, key: value})
    expected = f"^{key} must be .*, not {re.escape(repr(value))}$"
    with pytest.raises(ConfigurationError, match=expected):
        Offload(app)


def test_a_wrong_type_is_still_the_type_error_it_was() -> None:
    """``except TypeError`` around a setup that refused a list of names keeps working."""
    app = Flask(__name__)
    app.config.update(OFFLOAD_URL="memory://", OFFLOAD_QUEUES=5)
    with pytest.raises(TypeError, match="OFFLOAD_QUEUES must be a list of queue names"):
        Offload(app)


def test_the_reference_and_the_table_of_keys_agree() -> None:
    documented = reference_sections()
    assert [key for key, _ in documented] == [key.name for key in KEYS], "same keys, same order"
    for (name, text), key, field in zip(documented, KEYS, fields(Config), strict=True):
        assert name == PREFIX + field.name.upper(), f"the field of {name} is named for it"
        match = re.search(r"Default: `([^`]*)`", text)
        assert match, f"{name} says its default"
        default = ast.literal_eval(match.group(1))
        expected = list(key.default) if isinstance(key.default, tuple) else key.default
        assert default == expected and type(default) in (type(expected), int), name
        assert len(key.about) < 80, f"{name}: one short line"


def test_the_defaults_fill_app_config_and_pass_their_own_checks(tmp_path: Path) -> None:
    app = Flask(__name__, instance_path=str(tmp_path))
    app.config["OFFLOAD_URL"] = "memory://"
    Offload(app)
    for key in KEYS:
        if key.name != "OFFLOAD_URL":
            assert app.config[key.name] == key.fresh_default(), key.name
    assert Config.of(app) == Config(url="memory://")
    assert app.config["OFFLOAD_DASHBOARD_MASK"] is not KEYS[-1].default, "a list of its own"


@pytest.mark.parametrize(
    ("where", "name", "meant"),
    [
        ("config", "OFFLOAD_DASHBORD", "OFFLOAD_DASHBOARD"),
        ("config", "OFFLOAD_WORKER", "OFFLOAD_WORKERS"),
        ("config", "OFFLOAD_RESULTS_TTL", "OFFLOAD_RESULT_TTL"),
        ("environment", "FLASK_OFFLOAD_LEAS", "FLASK_OFFLOAD_LEASE"),
        ("environment", "FLASK_OFFLOAD_POLL_INTERVALL", "FLASK_OFFLOAD_POLL_INTERVAL"),
    ],
)
def test_a_misspelt_key_is_warned_about_naming_the_key_meant(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
    name: str,
    meant: str,
) -> None:
    caplog.set_level(logging.WARNING, "flask_offload")
    app = Flask(__name__, instance_path=str(tmp_path))
    app.config.update(OFFLOAD_URL="memory://", OFFLOAD_WORKERS=0)
    if where == "config":
        app.config[name] = 1
    else:
        monkeypatch.setenv(name, "1")
    Offload(app)
    [warning] = [r for r in caplog.records if name in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert f"{name} is not a Flask-Offload setting" in warning.getMessage()
    assert f"did you mean {meant} (" in warning.getMessage()


def test_a_key_like_no_setting_is_warned_about_without_a_guess(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "flask_offload")
    app = Flask(__name__, instance_path=str(tmp_path))
    app.config.update(OFFLOAD_URL="memory://", OFFLOAD_WORKERS=0, OFFLOAD_CELERY_BROKER="x")
    Offload(app)
    [warning] = [r for r in caplog.records if "OFFLOAD_CELERY_BROKER" in r.getMessage()]
    assert "did you mean" not in warning.getMessage()
    assert "flask offload config" in warning.getMessage()


def test_known_keys_warn_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "flask_offload")
    app = Flask(__name__, instance_path=str(tmp_path))
    app.config.update(OFFLOAD_URL="memory://", OFFLOAD_WORKERS=0, OFFLOAD_DASHBOARD=True)
    Offload(app)
    assert not caplog.records, caplog.text


def test_settings_changed_after_init_app_change_nothing(make_app: AppFactory) -> None:
    """Each of these was read at every request before: a change after init_app changed the
    running app (and a wrong one failed requests long after start)."""
    offload = Offload()

    @offload.task(name="send")
    def send(n: int) -> int:
        return n

    app, _ = make_app(
        offload,
        DEBUG=True,
        OFFLOAD_WORKERS=0,
        OFFLOAD_DASHBOARD=True,
        OFFLOAD_DASHBOARD_BULK_LIMIT=1,
        OFFLOAD_DASHBOARD_MASK=["card"],
        OFFLOAD_MAX_REQUEST_BYTES=10,
        OFFLOAD_POLL_INTERVAL=3,
        OFFLOAD_METRICS_TOKEN="s3cret",
    )

    @app.post("/report")
    @offload.background
    def report() -> str:
        return "done"

    with app.app_context():
        jobs = [send.delay(n) for n in range(2)]
        masked = send.enqueue(kwargs={"card": "4111 1111"})
    app.config.update(
        OFFLOAD_DASHBOARD=False,
        OFFLOAD_DASHBOARD_BULK_LIMIT="lots",
        OFFLOAD_DASHBOARD_MASK=[],
        OFFLOAD_MAX_REQUEST_BYTES=1 << 20,
        OFFLOAD_POLL_INTERVAL=60,
        OFFLOAD_METRICS_TOKEN=None,
        OFFLOAD_URL_PREFIX="/elsewhere",
    )
    client = app.test_client()
    assert client.post("/report", data="x" * 11).status_code == 413, "the limit read at start"
    pending = client.post("/report", data="x" * 10)
    assert pending.status_code == 202 and pending.headers["Retry-After"] == "3"
    token = {"Authorization": "Bearer s3cret"}
    remote = {"REMOTE_ADDR": "203.0.113.9"}
    assert client.get("/offload/metrics", headers=token, environ_base=remote).status_code == 200
    page = client.get(f"/offload/job/{masked.id}").get_data(as_text=True)
    assert "4111" not in page and "[masked]" in page
    client.get("/offload/")  # sets the CSRF cookie, for the pages' path
    csrf = client.get_cookie("offload_csrf", path="/offload")
    assert csrf is not None
    form = {"csrf": csrf.value, "verb": "cancel", "state": "queued", "task": "send"}
    ask = client.post("/offload/bulk", data=form, headers={"Origin": "http://localhost"})
    assert ask.status_code == 200 and "Cancel 1 job(s)" in ask.get_data(as_text=True)
    assert all(job.refresh().state == "queued" for job in jobs)


def test_text_settings_from_the_environment_read_as_before(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A variable is read as JSON where it parses: a numeric token is a number there, and
    still the token; a list of names may be one comma-separated string."""
    monkeypatch.setenv("FLASK_OFFLOAD_METRICS_TOKEN", "123456")
    monkeypatch.setenv("FLASK_OFFLOAD_DASHBOARD_MASK", "Card, ssn")
    app, _ = make_app(OFFLOAD_WORKERS=0)
    assert app.config["OFFLOAD_METRICS_TOKEN"] == 123456, "app.config holds what it read"
    assert Config.of(app).dashboard_mask == ("card", "ssn")
    client = app.test_client()
    token = {"Authorization": "Bearer 123456"}
    assert client.get("/offload/metrics", headers=token).status_code == 200
