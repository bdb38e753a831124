"""The exception family: ``except flask_offload.OffloadError`` catches every error a user
meets from Flask-Offload itself, and each is still the built-in type it was raised as before,
so an app's existing ``except ValueError`` (or ``TypeError``, ``LookupError``, ...) holds."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask

from conftest import AppFactory, make_job, write_lock_held
from flask_offload import Offload, OffloadError, current_job, errors
from flask_offload.backends import SQLiteBackend
from flask_offload.testing import Harness

Raises = Callable[[AppFactory, Path], object]


def _app(make_app: AppFactory, **config: object) -> tuple[Flask, Offload]:
    """An app with a task ``send(to)``, no pool."""
    app, offload = make_app(OFFLOAD_WORKERS=0, **config)

    @offload.task(name="send")
    def send(to: str) -> str:
        return to

    return app, offload


def _delay(*args: object) -> Raises:
    def call(make_app: AppFactory, tmp_path: Path) -> object:
        app, offload = make_app(OFFLOAD_WORKERS=0)

        @offload.task(name="send")
        def send(to: object) -> None: ...

        with app.app_context():
            return send.delay(*args)

    return call


def _enqueue(**options: object) -> Raises:
    def call(make_app: AppFactory, tmp_path: Path) -> object:
        app, offload = _app(make_app)
        with app.app_context():
            return offload.enqueue("send", ["ann"], **options)

    return call


def _retry_unknown(make_app: AppFactory, tmp_path: Path) -> object:
    app, offload = _app(make_app)
    with app.app_context():
        return offload.retry("0" * 32)


def _retry_queued(make_app: AppFactory, tmp_path: Path) -> object:
    app, offload = _app(make_app)
    with app.app_context():
        job = offload.enqueue("send", ["ann"])
        return offload.retry(job.id)


def _unknown_name(make_app: AppFactory, tmp_path: Path) -> object:
    app, offload = _app(make_app, OFFLOAD_EAGER=True)
    with app.app_context():
        return offload.enqueue("app.tasks.nobody_registers_this", [1])


def _id_in_use(make_app: AppFactory, tmp_path: Path) -> object:
    app, offload = _app(make_app)
    job_id = offload.new_id()
    with app.app_context():
        offload.enqueue("send", ["ann"], id=job_id)
        return offload.enqueue("send", ["bob"], id=job_id)


def _setting(url: str) -> Raises:
    def call(make_app: AppFactory, tmp_path: Path) -> object:
        app = Flask(__name__, instance_path=str(tmp_path / "instance"))
        app.config["OFFLOAD_URL"] = url
        return Offload(app)

    return call


def _corrupt_file(make_app: AppFactory, tmp_path: Path) -> object:
    damaged = tmp_path / "damaged.db"
    damaged.write_bytes(b"not a SQLite database, whatever its name says " * 100)
    return _setting(f"sqlite:///{damaged}")(make_app, tmp_path)


def _wait_too_long(make_app: AppFactory, tmp_path: Path) -> object:
    app, offload = _app(make_app)
    with app.app_context():
        return offload.enqueue("send", ["ann"]).wait(timeout=0.01)


def _outside_a_task(make_app: AppFactory, tmp_path: Path) -> object:
    return current_job.id


def _no_app(make_app: AppFactory, tmp_path: Path) -> object:
    return Offload().runtime()


def _twice(make_app: AppFactory, tmp_path: Path) -> object:
    app, offload = _app(make_app)
    return offload.init_app(app)


def _task_option(**options: object) -> Raises:
    def call(make_app: AppFactory, tmp_path: Path) -> object:
        return Offload().task(name="t", **options)(lambda: None)  # type: ignore[call-overload]

    return call


def _celery_id(make_app: AppFactory, tmp_path: Path) -> object:
    app, offload = _app(make_app)
    with app.app_context():
        return offload.get_job(str(uuid.uuid4()))


def _after_commit_not_a_session(make_app: AppFactory, tmp_path: Path) -> object:
    app, offload = _app(make_app)
    with app.app_context():
        return offload.enqueue("send", ["ann"], after_commit=object())


def _periodic_without_a_schedule(make_app: AppFactory, tmp_path: Path) -> object:
    return Offload().periodic(name="p")


def _harness_on_a_plain_app(make_app: AppFactory, tmp_path: Path) -> object:
    return Harness(Flask(__name__))


def _connection_on_memory(make_app: AppFactory, tmp_path: Path) -> object:
    app, offload = _app(make_app, storage="memory")
    with app.app_context():
        return offload.enqueue("send", ["ann"], connection=object())


def _connection_not_a_connection(make_app: AppFactory, tmp_path: Path) -> object:
    app, offload = _app(make_app)
    with app.app_context():
        return offload.enqueue("send", ["ann"], connection=object())


def _store_locked(make_app: AppFactory, tmp_path: Path) -> object:
    backend = SQLiteBackend(str(tmp_path / "locked.db"), busy_timeout=0.1)
    backend.prepare()
    try:
        with write_lock_held(tmp_path / "locked.db"):
            return backend.enqueue(make_job())
    finally:
        backend.close()


def _bad_synchronous(make_app: AppFactory, tmp_path: Path) -> object:
    return SQLiteBackend(str(tmp_path / "jobs.db"), synchronous="SOMETIMES")


# What the user did, the built-in type it raised before the family, and its class now.
CASES: dict[str, tuple[Raises, type[Exception], type[OffloadError]]] = {
    "non-JSON argument at .delay()": (
        _delay(object()),
        TypeError,
        errors.NotSerializable,
    ),
    "a priority that is not an int": (
        _enqueue(priority="high"),
        TypeError,
        errors.InvalidArgument,
    ),
    "a negative delay": (_enqueue(delay=-1), ValueError, errors.InvalidValue),
    "a Celery option": (_enqueue(countdown=5), TypeError, errors.InvalidArgument),
    "retry of an unknown id": (_retry_unknown, LookupError, errors.JobNotFound),
    "retry of a queued job": (_retry_queued, ValueError, errors.NotRetryable),
    "enqueue by an unknown name (eager)": (_unknown_name, LookupError, errors.UnknownTask),
    "an id in use": (_id_in_use, ValueError, errors.JobIdInUse),
    "an unknown storage URL": (
        _setting("redis://localhost"),
        ValueError,
        errors.ConfigurationError,
    ),
    "a SQLite URL naming no file": (_setting("sqlite:///"), ValueError, errors.ConfigurationError),
    "a corrupt SQLite file on open": (_corrupt_file, RuntimeError, errors.StorageCorrupt),
    "job.wait() running out of time": (_wait_too_long, TimeoutError, errors.WaitTimeout),
    "current_job outside a task": (_outside_a_task, RuntimeError, errors.UsageError),
    "no app to use": (_no_app, RuntimeError, errors.NotInitialised),
    "init_app twice": (_twice, RuntimeError, errors.UsageError),
    "a negative retries=": (_task_option(retries=-1), ValueError, errors.ConfigurationError),
    "a queue that is not a str": (_task_option(queue=5), TypeError, errors.InvalidArgument),
    "a Celery id to get_job": (_celery_id, ValueError, errors.InvalidValue),
    "after_commit= not a session": (
        _after_commit_not_a_session,
        TypeError,
        errors.InvalidArgument,
    ),
    "a periodic task with no schedule": (
        _periodic_without_a_schedule,
        TypeError,
        errors.InvalidArgument,
    ),
    "connection= on storage that cannot take one": (
        _connection_on_memory,
        TypeError,
        errors.InvalidArgument,
    ),
    "connection= that is no connection": (
        _connection_not_a_connection,
        TypeError,
        errors.InvalidArgument,
    ),
    "a SQLite store locked past the busy wait": (
        _store_locked,
        sqlite3.OperationalError,
        errors.StorageLocked,
    ),
    "a SQLite synchronous mode that does not exist": (
        _bad_synchronous,
        ValueError,
        errors.ConfigurationError,
    ),
    "the testing harness on an app without Flask-Offload": (
        _harness_on_a_plain_app,
        RuntimeError,
        errors.NotInitialised,
    ),
}


@pytest.mark.parametrize("raises, builtin, kind", CASES.values(), ids=list(CASES))
def test_offload_error_catches_each_error_and_the_old_type_still_does(
    make_app: AppFactory,
    tmp_path: Path,
    raises: Raises,
    builtin: type[Exception],
    kind: type[OffloadError],
) -> None:
    with pytest.raises(OffloadError) as caught:
        raises(make_app, tmp_path)
    assert isinstance(caught.value, builtin), "an existing except of the old type still holds"
    assert type(caught.value) is kind
