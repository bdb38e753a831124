"""What the dashboard hides of a job's arguments, on its page and from the text search alike.

Always: a background view's request credentials (its ``Cookie``, ``Authorization`` and
``Proxy-Authorization`` headers) and the body of a form or JSON request with a password
field. And, by name, whatever ``OFFLOAD_DASHBOARD_MASK`` lists: a keyword argument, a dict key
at any depth, a positional argument (named by the task's signature), a background view's
header, query parameter or body field is masked when its name contains one of those names,
whatever the case. The stored job is untouched: the worker gets every argument.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode

from .. import serializer, snapshot
from ..job import Job

MASKED = "[masked]"
PASSWORD_FIELDS = ("passw", "pwd")  # a body with such a field is always masked


@dataclass(frozen=True)
class Mask:
    """The names whose values the dashboard masks (``OFFLOAD_DASHBOARD_MASK``: lower case,
    matched as substrings)."""

    names: tuple[str, ...]

    def hides(self, name: str) -> bool:
        """True if values under ``name`` are masked."""
        lowered = name.lower()
        return any(each in lowered for each in self.names)

    def arguments(self, job: Job, fn: Callable[..., Any] | None) -> tuple[Any, Any]:
        """The job's positional and keyword arguments as the dashboard shows them; ``fn`` is
        its task's function, whose signature names the positional ones."""
        try:
            args, kwargs = json.loads(job.args_json), json.loads(job.kwargs_json)
        except ValueError:  # a damaged row: nothing in it can be masked by name
            return MASKED, MASKED
        if job.ephemeral and snapshot.is_snapshot(args):
            return [self._snapshot(args[0])], self.value(kwargs)
        if not isinstance(args, list):
            return self.value(args), self.value(kwargs)
        names = _positional_names(fn, len(args))
        shown = [
            MASKED if name and self.hides(name) else self.value(arg)
            for name, arg in zip(names, args, strict=True)
        ]
        return shown, self.value(kwargs)

    def matches(self, job: Job, fn: Callable[..., Any] | None, text: str) -> bool:
        """True if ``text`` occurs (any case) in what the dashboard shows of the job's
        arguments, or in its error: the text search never finds a masked value."""
        needle = text.lower()
        args, kwargs = self.arguments(job, fn)
        shown = (serializer.dumps(args), serializer.dumps(kwargs), job.error or "")
        return any(needle in part.lower() for part in shown)

    def value(self, value: Any) -> Any:
        """``value`` with every dict entry whose key is masked replaced, at any depth."""
        if isinstance(value, dict):
            return {k: MASKED if self.hides(k) else self.value(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.value(item) for item in value]
        return value

    def _snapshot(self, shot: dict[str, Any]) -> dict[str, Any]:
        environ = {
            key: MASKED if self._secret_environ(key) else value
            for key, value in shot["environ"].items()
        }
        query = environ.get("QUERY_STRING")
        if isinstance(query, str):
            pairs = parse_qsl(query, keep_blank_values=True)
            if any(self.hides(name) for name, _ in pairs):
                masked = [(name, MASKED if self.hides(name) else v) for name, v in pairs]
                environ["QUERY_STRING"] = urlencode(masked, safe="/[]")
        body = MASKED if shot["body"] and self._secret_body(shot) else shot["body"]
        return {**shot, "environ": environ, "body": body}

    def _secret_environ(self, key: str) -> bool:
        header = key.startswith("HTTP_") and self.hides(key[5:].replace("_", "-"))
        return key in snapshot.SECRET_HEADERS or header

    def _secret_body(self, shot: dict[str, Any]) -> bool:
        try:
            fields = snapshot.body_fields(shot)
        except ValueError:  # unreadable as its type says: it may still hold one
            return True
        return fields is not None and any(
            self.hides(name) or any(each in name.lower() for each in PASSWORD_FIELDS)
            for name in fields
        )


def _positional_names(fn: Callable[..., Any] | None, count: int) -> list[str | None]:
    """The parameter name of each of ``count`` positional arguments (None where unknown):
    extra ones take the ``*args`` parameter's name."""
    names: list[str | None] = []
    rest: str | None = None
    try:
        parameters: Sequence[inspect.Parameter] = (
            [] if fn is None else list(inspect.signature(fn).parameters.values())
        )
    except (TypeError, ValueError):  # a callable without a signature Python can read
        parameters = []
    for parameter in parameters:
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            names.append(parameter.name)
        elif parameter.kind is parameter.VAR_POSITIONAL:
            rest = parameter.name
    return (names + [rest] * count)[:count]
