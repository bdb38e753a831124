"""How each ``OFFLOAD_*`` value is checked and typed: a wrong one is refused at ``init_app``
with an error that names the key, what it must be and what it got."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .errors import ConfigurationError, ConfigurationTypeError

Check = Callable[[str, Any], Any]  # (key, value in app.config) -> the typed value, or raises


def _refused(key: str, must: str, value: Any, wrong_type: bool = False) -> ConfigurationError:
    """The error for a value of ``key`` that is not what it ``must`` be; a wrong type is also
    a ``TypeError``, as it was before the settings had a class of their own."""
    kind = ConfigurationTypeError if wrong_type else ConfigurationError
    return kind(f"{key} must be {must}, not {value!r}")


def number(minimum: float, whole: bool = False) -> Check:
    """A finite number (or a whole one) of at least ``minimum``; numbers in strings are
    accepted, as a config file or the environment may give them."""
    must = f"{'a whole' if whole else 'a finite'} number >= {minimum}"

    def check(key: str, value: Any) -> Any:
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if (
            not math.isfinite(number)  # NaN passes every comparison; inf never expires
            or number < minimum
            or (whole and not number.is_integer())
        ):
            raise _refused(key, must, value, not isinstance(value, (str, int, float)))
        return int(number) if whole else number

    return check


def flag(key: str, value: Any) -> bool:
    """True or False, or a word meaning one of them (``"yes"``, ``"off"``, ``"1"``, …)."""
    if isinstance(value, bool):
        return value
    word = value.strip().lower() if isinstance(value, str) else None
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off", ""):
        return False
    raise _refused(key, "True or False", value, not isinstance(value, str))


def text(key: str, value: Any) -> str:
    """Any str (``OFFLOAD_URL``: which storage it names is the backends' to say)."""
    if not isinstance(value, str):
        raise _refused(key, "a str", value, wrong_type=True)
    return value


def pg_url(key: str, value: Any) -> str | None:
    """A ``postgresql://`` URL, or None (an empty one is none)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not value.startswith(("postgresql://", "postgres://")):
        raise _refused(key, "a postgresql:// URL or None", value, not isinstance(value, str))
    return value


def path(key: str, value: Any) -> str:
    """A URL path starting with ``/``."""
    if not isinstance(value, str) or not value.startswith("/"):
        must = "a path such as '/offload'"
        raise _refused(key, must, value, not isinstance(value, str))
    return value


def choice(*choices: str) -> Check:
    """One of ``choices``, in any case; the upper-case one."""
    must = f"{', '.join(choices[:-1])} or {choices[-1]}"

    def check(key: str, value: Any) -> str:
        if not isinstance(value, str) or value.upper() not in choices:
            raise _refused(key, must, value, not isinstance(value, str))
        return value.upper()

    return check


def names(must: str) -> Check:
    """A list of names, or one comma-separated string of them (as from the environment)."""

    def check(key: str, value: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [name for name in value.split(",") if name.strip()]
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(name, str) and name.strip() for name in value
        ):
            raise _refused(key, must, value, wrong_type=True)
        return tuple(name.strip() for name in value)

    return check


def queues(key: str, value: Any) -> tuple[str, ...] | None:
    """None (every queue), or queue names: a pool that consumes none would leave every job
    queued without a word."""
    if value is None:
        return None
    given: tuple[str, ...] = names("a list of queue names")(key, value)
    if not given:
        raise ConfigurationError(
            f"{key}={value!r} names no queue, so this process would run no job: leave it "
            "unset (None) to consume every queue"
        )
    return given


def mask(key: str, value: Any) -> tuple[str, ...]:
    """Names the dashboard masks, matched in lower case."""
    given = names("a list of argument names such as ['password', 'token']")(key, value)
    return tuple(name.lower() for name in given)


def token(key: str, value: Any) -> str | None:
    """A secret, or None (an empty one is none); a number is its digits, as
    ``FLASK_OFFLOAD_METRICS_TOKEN=123456`` reads as one."""
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise _refused(key, "a str or None", value, wrong_type=True)
    return value
