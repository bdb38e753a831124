"""The dashboard: placeholder while it is built."""

from __future__ import annotations

from flask import Flask


def install(app: Flask) -> None:
    """Mount the dashboard when ``OFFLOAD_DASHBOARD`` is on."""
