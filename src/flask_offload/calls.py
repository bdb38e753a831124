"""How an enqueue's arguments and options become the Job it stores: every check made in the
caller's frame, before anything is stored (strict JSON, sizes, types, due times, parents)."""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any

from . import serializer, tracing
from .errors import InvalidArgument, InvalidValue, UnknownDependency
from .execution import LATEST_DUE
from .job import Job, new_id, valid_id


def build(
    max_payload_bytes: int,
    task_name: str,
    args: Any = (),
    kwargs: Any = None,
    *,
    delay: float | timedelta | None = None,
    at: datetime | None = None,
    key: str | None = None,
    priority: int = 0,
    queue: str = "default",
    max_attempts: int = 1,
    id: str | None = None,
    owner_json: str | None = None,
    ephemeral: bool = False,
    after: Any = (),
    feed: str | None = None,
    group_id: str | None = None,
    payload: tuple[str, str] | None = None,
) -> Job:
    """The Job an enqueue stores, its options checked: raise before anything is stored if
    the arguments are not strict JSON. ``after``: the jobs (or ids) it waits for;
    ``payload``: the arguments as ``serializer.call`` encoded them already (a signature)."""
    args_json, kwargs_json = serializer.call(args, kwargs) if payload is None else payload
    check_size(max_payload_bytes, args_json, kwargs_json)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidArgument(f"priority must be an int, not {priority!r}")
    if not isinstance(queue, str) or not queue:
        raise InvalidArgument(f"queue must be a non-empty str, not {queue!r}")
    if key is not None and not isinstance(key, str):
        raise InvalidArgument(f"key must be a str, not {type(key).__name__}")
    if id is not None and not valid_id(id):
        raise InvalidValue(
            f"id must be 32 lowercase hex characters, as offload.new_id() gives, not {id!r}"
        )
    now = time.time()
    return Job(
        id=new_id() if id is None else id,
        task=task_name,
        queue=queue,
        priority=priority,
        args_json=args_json,
        kwargs_json=kwargs_json,
        key=key,
        max_attempts=max_attempts,
        created_at=now,
        run_at=_due(now, delay, at),
        relative=at is None,
        owner_json=owner_json,
        ephemeral=ephemeral,
        trace_json=tracing.carrier() if tracing.ENABLED else None,
        after=parent_ids(after),
        feed=feed,
        group_id=group_id,
    )


def check_size(max_payload_bytes: int, args_json: str, kwargs_json: str) -> None:
    """Raise unless a call's stored arguments fit in ``OFFLOAD_MAX_PAYLOAD_BYTES``."""
    size = len(args_json) + len(kwargs_json)
    if size > max_payload_bytes:
        raise InvalidValue(
            f"the arguments take {size} bytes, over OFFLOAD_MAX_PAYLOAD_BYTES "
            f"({max_payload_bytes}); store large data elsewhere and pass its id"
        )


def parent_ids(after: Any) -> tuple[str, ...]:
    """The ids of ``after`` (jobs or ids), each once, in order; a malformed one is an
    ``UnknownDependency`` at once."""
    if isinstance(after, (str, Job)):
        after = [after]
    ids: dict[str, None] = {}
    for parent in after or ():
        parent_id = parent.id if isinstance(parent, Job) else parent
        if not valid_id(parent_id):
            raise UnknownDependency(f"after= takes jobs or job ids, not {parent!r}")
        ids[parent_id] = None
    return tuple(ids)


def _due(now: float, delay: float | timedelta | None, at: datetime | None) -> float:
    """When a job may start, from ``delay`` (seconds or a timedelta) or an aware ``at``."""
    if delay is not None and at is not None:
        raise InvalidArgument("give delay= or at=, not both")
    if isinstance(delay, timedelta):
        delay = delay.total_seconds()
    if delay is not None:
        if (
            isinstance(delay, bool)
            or not isinstance(delay, (int, float))
            or not 0 <= delay < LATEST_DUE - now
        ):
            raise InvalidValue(
                f"delay must be a number of seconds >= 0 that falls before 9999-12-31, "
                f"not {delay!r}"
            )
        return now + delay
    if at is not None:
        if not isinstance(at, datetime):
            raise InvalidArgument(f"at must be a datetime, not {type(at).__name__}")
        if at.tzinfo is None or at.utcoffset() is None:
            raise InvalidValue(
                "at must be an aware datetime (with tzinfo), e.g. "
                "datetime.now(timezone.utc) + timedelta(minutes=5)"
            )
        return at.timestamp()
    return now
