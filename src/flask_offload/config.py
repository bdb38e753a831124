"""Every ``OFFLOAD_*`` setting, read, defaulted and checked once, at ``init_app``, into one
frozen :class:`Config` that the rest of the code reads.

The fields of ``Config`` are the one table of settings: each carries its key's name, its
default, its check and one line saying what it does, and the defaults ``app.config`` is filled
with, the checks, ``flask offload config`` and the warning about a misspelt key all come from
it. A setting changed in ``app.config`` after ``init_app`` changes nothing (``app.config``
keeps the values for the app's own reading); settings read at each request or enqueue could
differ between the threads of one process, and a wrong one failed a request long after start.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
import warnings
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from . import configchecks as checks
from .configchecks import Check
from .execution import Settings
from .logs import logger

if TYPE_CHECKING:
    from flask import Flask

PREFIX = "OFFLOAD_"
ENV_PREFIX = "FLASK_OFFLOAD_"
EXTENSION_KEY = "offload_config"  # the app's Config, in app.extensions


@dataclass(frozen=True)
class Key:
    """One setting: its ``app.config`` name, the default ``init_app`` fills in there, the
    check that turns a value into the typed one (naming the key when it cannot), and what it
    is for, in one line."""

    name: str
    default: Any
    check: Check
    about: str

    def fresh_default(self) -> Any:
        """The default as ``app.config`` gets it: a list of its own for a sequence, so that
        an app changing it in place changes no other app's."""
        return list(self.default) if isinstance(self.default, tuple) else self.default


def _setting(name: str, default: Any, check: Check, about: str) -> Any:
    """A field of ``Config``: its default is ``default`` as checked, so a default that its
    own check refuses fails at import."""
    key = Key(name, default, check, about)
    return field(default=check(name, default), metadata={"key": key})


@dataclass(frozen=True)
class Config:
    """One app's settings, as ``init_app`` read them; frozen, so what was checked at start
    is what runs. In the order of the reference, docs/configuration.md."""

    url: str = _setting(
        "OFFLOAD_URL", "sqlite:///offload.db", checks.text, "where jobs are stored (a storage URL)"
    )
    sqlite_synchronous: str = _setting(
        "OFFLOAD_SQLITE_SYNCHRONOUS",
        "NORMAL",
        checks.choice("OFF", "NORMAL", "FULL", "EXTRA"),
        "SQLite's synchronous setting: FULL also survives a power loss",
    )
    pg_listen: bool = _setting(
        "OFFLOAD_PG_LISTEN", True, checks.flag, "wake workers by LISTEN/NOTIFY (False: poll only)"
    )
    pg_pgbouncer: bool = _setting(
        "OFFLOAD_PG_PGBOUNCER",
        False,
        checks.flag,
        "OFFLOAD_URL is PgBouncer in transaction pooling: prepare no statements",
    )
    pg_listen_url: str | None = _setting(
        "OFFLOAD_PG_LISTEN_URL",
        None,
        checks.pg_url,
        "a direct (or session-pooled) URL to LISTEN on, when OFFLOAD_URL is PgBouncer's",
    )
    pg_pool_size: int = _setting(
        "OFFLOAD_PG_POOL_SIZE",
        4,
        checks.number(1, whole=True),
        "the most pooled connections a process that is not a worker holds",
    )
    result_ttl: float = _setting(
        "OFFLOAD_RESULT_TTL", 86400.0, checks.number(0), "seconds finished jobs are kept"
    )
    workers: int = _setting(
        "OFFLOAD_WORKERS", 2, checks.number(0, whole=True), "worker threads in each serving process"
    )
    async_concurrency: int = _setting(
        "OFFLOAD_ASYNC_CONCURRENCY",
        100,
        checks.number(1, whole=True),
        "async def jobs each pool runs at once on its event loop",
    )
    queues: tuple[str, ...] | None = _setting(
        "OFFLOAD_QUEUES", None, checks.queues, "the queues this process claims from (None: all)"
    )
    eager: bool = _setting(
        "OFFLOAD_EAGER", False, checks.flag, "run each job inline at .delay(), for tests"
    )
    shutdown_timeout: float = _setting(
        "OFFLOAD_SHUTDOWN_TIMEOUT",
        20.0,
        checks.number(0),
        "seconds running jobs get to finish on exit",
    )
    lease: float = _setting(
        "OFFLOAD_LEASE",
        30.0,
        checks.number(0.1),
        "seconds a claimed job is held without a heartbeat",
    )
    poll_interval: float = _setting(
        "OFFLOAD_POLL_INTERVAL", 1.0, checks.number(0.001), "seconds between looks for others' jobs"
    )
    max_payload_bytes: int = _setting(
        "OFFLOAD_MAX_PAYLOAD_BYTES", 2 << 20, checks.number(2, whole=True), "the largest arguments"
    )
    max_result_bytes: int = _setting(
        "OFFLOAD_MAX_RESULT_BYTES",
        10 << 20,
        checks.number(2, whole=True),
        "the largest result stored",
    )
    max_request_bytes: int = _setting(
        "OFFLOAD_MAX_REQUEST_BYTES",
        1 << 20,
        checks.number(0, whole=True),
        "the largest request body a background view accepts",
    )
    url_prefix: str = _setting(
        "OFFLOAD_URL_PREFIX", "/offload", checks.path, "where job status, dashboard and metrics are"
    )
    dashboard: bool = _setting("OFFLOAD_DASHBOARD", False, checks.flag, "serve the dashboard")
    metrics_token: str | None = _setting(
        "OFFLOAD_METRICS_TOKEN", None, checks.token, "the bearer token that lets a scraper in"
    )
    dashboard_bulk_limit: int = _setting(
        "OFFLOAD_DASHBOARD_BULK_LIMIT",
        1000,
        checks.number(1, whole=True),
        "the most jobs one bulk action of the dashboard changes",
    )
    dashboard_mask: tuple[str, ...] = _setting(
        "OFFLOAD_DASHBOARD_MASK",
        ("password", "passwd", "secret", "token"),
        checks.mask,
        "names whose values the dashboard masks",
    )

    @classmethod
    def read(cls, config: MutableMapping[str, Any]) -> Config:
        """Fill in the defaults of an app's ``config`` and check every value, raising
        :class:`~flask_offload.errors.ConfigurationError` naming the first key that is wrong."""
        values = {}
        for each in fields(cls):
            key: Key = each.metadata["key"]
            config.setdefault(key.name, key.fresh_default())
            values[each.name] = key.check(key.name, config[key.name])
        return cls(**values)

    @staticmethod
    def of(app: Flask) -> Config:
        """The settings ``init_app`` read for ``app``."""
        config: Config = app.extensions[EXTENSION_KEY]
        return config

    def pool(self) -> Settings:
        """The settings of the app's worker pool."""
        return Settings(
            threads=self.workers,
            async_concurrency=self.async_concurrency,
            queues=self.queues,
            lease=self.lease,
            poll_interval=self.poll_interval,
            shutdown_timeout=self.shutdown_timeout,
            result_ttl=self.result_ttl,
            max_payload_bytes=self.max_payload_bytes,
            max_result_bytes=self.max_result_bytes,
        )


KEYS: tuple[Key, ...] = tuple(each.metadata["key"] for each in fields(Config))


def from_environment(config: MutableMapping[str, Any]) -> dict[str, str]:
    """Fill in ``OFFLOAD_*`` keys from ``FLASK_OFFLOAD_*`` environment variables.

    The variables are the ones ``app.config.from_prefixed_env()`` reads, and their values are
    read the same way (JSON where they parse, such as ``4`` or ``false``, else strings), so a
    deployment configures an app that never calls it. A key the app's configuration sets
    wins: code and config files are explicit, the environment is ambient (a test config's
    ``memory://`` must never be replaced by a URL exported in the shell). A variable that is
    overridden so is logged, so it is never ignored silently. Returns the variable of each
    key that has one, set here or overridden.
    """
    variables: dict[str, str] = {}
    for name, raw in sorted(os.environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len("FLASK_") :]
        variables[key] = name
        value = _environment_value(raw)
        if key not in config:
            config[key] = value
        elif config[key] != value:
            logger.warning(
                "%s is set in the environment but the app's config sets %s, which wins",
                name,
                key,
            )
    return variables


def _environment_value(raw: str) -> Any:
    """A ``FLASK_OFFLOAD_*`` variable's value as ``from_prefixed_env`` reads it: JSON where it
    parses, else the string."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def warn_unknown(given: Iterable[str], variables: dict[str, str]) -> None:
    """Log a warning for each ``OFFLOAD_*`` key the app's config ``given`` and each
    ``FLASK_OFFLOAD_*`` variable that is no setting, naming the known one closest to it: a
    misspelt key would otherwise leave its default in force without a word."""
    known = {key.name: key for key in KEYS}
    in_code = {k for k in given if k not in known and k not in variables}  # else: its variable
    for name in sorted({*in_code, *variables.values()}):
        key = name.removeprefix("FLASK_")
        if key in known:
            continue
        suffixes = [k.removeprefix(PREFIX) for k in known]
        close = difflib.get_close_matches(key.removeprefix(PREFIX), suffixes, n=1, cutoff=0.5)
        if close:
            meant = known[PREFIX + close[0]]
            spelt = meant.name if name == key else f"FLASK_{meant.name}"
            hint = f"did you mean {spelt} ({meant.about})?"
        else:
            hint = "'flask offload config' lists every setting"
        logger.warning("%s is not a Flask-Offload setting and is ignored: %s", name, hint)


def sources(
    config: MutableMapping[str, Any], given: set[str], variables: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """Each setting's value in ``config`` and where it came from: the keys the app's config
    ``given`` before ``init_app``, the environment ``variables``, or else a default."""
    found: dict[str, dict[str, Any]] = {}
    for key in KEYS:
        value = config[key.name]
        entry: dict[str, Any] = {"value": value, "source": "default"}
        variable = variables.get(key.name)
        from_variable = variable is not None and value == _environment_value(
            os.environ.get(variable, "")
        )
        if key.name in given and not from_variable:
            entry["source"] = "app config"
            if variable is not None:
                entry["overrides"] = variable
        elif variable is not None:  # given too when the app calls config.from_prefixed_env()
            entry.update(source="environment", variable=variable)
        found[key.name] = entry
    return found


def eager_changed(value: Any) -> bool:
    """Deprecated: ``OFFLOAD_EAGER`` changed in ``app.config`` after ``init_app`` still
    switches inline running, as when it was read at every enqueue, with a warning."""
    eager = checks.flag("OFFLOAD_EAGER", value)
    warnings.warn(
        "OFFLOAD_EAGER changed after init_app: settings are read once, at init_app, and this "
        "one will stop being followed; switch a test's mode with flask_offload.testing "
        '(testing.using("inline", app), or the offload_inline fixture)',
        DeprecationWarning,
        stacklevel=_app_level(),
    )
    return eager


def _app_level() -> int:
    """The ``stacklevel`` of the first frame outside Flask-Offload, for a warning raised in
    the function that calls this: it names the app's own line, where the filters that show
    a ``DeprecationWarning`` (``__main__``, pytest) look for it."""
    frame, level = sys._getframe(2), 2
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith(
        "flask_offload"
    ):
        frame, level = frame.f_back, level + 1
    return level
