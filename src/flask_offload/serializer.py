"""Strict JSON in and out: the queue holds data, never pickled code.

Python's ``json`` quietly turns ``{1: "a"}`` into ``{"1": "a"}`` and writes ``NaN``; both would
change a task's arguments on the way through storage, so both are refused here, before anything
is stored, with a ``NotSerializable`` (a ``TypeError``) that names the offending value.
"""

from __future__ import annotations

import json
import math
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from typing import Any

from .errors import InvalidArgument, NotSerializable

_encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
# The same encoder made once (``JSONEncoder.encode`` makes one per call, most of the cost of
# a small value), without its check for circles: ``_check`` has walked the value first.
_once = (
    None
    if c_make_encoder is None
    else c_make_encoder(
        None, _encoder.default, encode_basestring, None, ":", ",", False, False, False
    )
)
_plain = (str, int, bool, type(None))
_EXACT = frozenset(_plain)
_EMPTY: dict[type, str] = {
    tuple: "[]",
    list: "[]",
    dict: "{}",
}  # most calls: no arguments, or no keywords


def _check(value: Any, where: str) -> None:
    """Raise ``NotSerializable`` unless ``value`` survives a JSON round trip unchanged (bar
    tuples)."""
    if isinstance(value, _plain):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise NotSerializable(f"{where} is {value!r}, which strict JSON cannot hold")
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            if type(item) not in _EXACT:  # the usual ints and strs: no name made for them
                _check(item, f"{where}[{index}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise NotSerializable(
                    f"{where} has the key {key!r} of type {type(key).__name__}; "
                    "JSON objects take string keys only"
                )
            if type(item) not in _EXACT:
                _check(item, f"{where}[{key!r}]")
        return
    raise NotSerializable(
        f"{where} is {value!r:.60} of type {type(value).__name__}, which is not JSON; "
        "pass plain data (str, int, float, bool, None, list, dict) such as an id to look up"
    )


def dumps(value: Any, what: str = "value") -> str:
    """Encode ``value`` as compact strict JSON, or raise ``NotSerializable`` (a ``TypeError``)
    naming ``what`` is wrong.

    Whatever the value (nested 10,000 deep, circular, an int of 5,000 digits, a string with a
    lone surrogate from ``os.listdir()``), the only error is that one.
    """
    if type(value) in _EMPTY and not value:
        return _EMPTY[type(value)]
    try:
        _check(value, what)
        text = _encoder.encode(value) if _once is None else "".join(_once(value, 0))
        if not text.isascii():
            text.encode("utf-8")  # a lone surrogate cannot be stored as UTF-8
    except RecursionError:
        raise NotSerializable(
            f"{what} is nested too deeply (or contains itself) for JSON"
        ) from None
    except UnicodeEncodeError as error:
        bad = error.object[error.start : error.end]
        raise NotSerializable(
            f"{what} holds the lone surrogate {bad!r}, which is not text UTF-8 can store "
            "(a file name from os.listdir()? decode it with errors='replace')"
        ) from None
    except ValueError as error:  # e.g. an int beyond Python's int-to-str digit limit
        raise NotSerializable(f"{what} cannot be written as JSON: {error}") from None
    return text


def call(args: Any, kwargs: Any) -> tuple[str, str]:
    """A call's positional and keyword arguments as the JSON a job stores, checked."""
    if not isinstance(args, (list, tuple)):
        raise InvalidArgument(f"args must be a tuple or list, not {type(args).__name__}")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise InvalidArgument(f"kwargs must be a dict, not {type(kwargs).__name__}")
    return dumps(args, "args"), dumps(kwargs or {}, "kwargs")


def safe_text(text: str) -> str:
    """``text`` as storable UTF-8 with no NUL: lone surrogates and NULs become escapes."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def clipped(text: str, limit: int) -> str:
    """``text`` as :func:`safe_text`, cut to at most ``limit`` UTF-8 bytes: its head and its
    tail (where a traceback's innermost frames and message are) around a marker of the cut."""
    text = safe_text(text)
    if len(text) <= limit // 4:  # no character takes more than 4 bytes
        return text
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    keep = (limit - 48) // 2  # bytes on each side; the marker fits in the 48 left
    cut = f" [... {len(data) - 2 * keep} bytes cut ...] "
    return data[:keep].decode("utf-8", "ignore") + cut + data[-keep:].decode("utf-8", "ignore")


def loads(text: str) -> Any:
    """Decode JSON text written by :func:`dumps`."""
    return json.loads(text)
