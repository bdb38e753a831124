"""Flask-Offload's log lines, seen without configuring logging, as Flask's own are.

Everything logs to the ``flask_offload`` logger; each job's own line (succeeded, retrying)
to its child ``flask_offload.jobs``. Like ``app.logger``, the logger gets
:data:`default_handler` only when no handler would show its records (an app that configures
logging, before ``init_app``, keeps full control), and then shows starts, stops, warnings
and failures; each job's line only in debug mode and in ``flask offload worker``, since a
busy web process would otherwise write one line per job. To silence it::

    from flask_offload.logs import default_handler
    logging.getLogger("flask_offload").removeHandler(default_handler)
"""

from __future__ import annotations

import logging

from flask.logging import has_level_handler, wsgi_errors_stream

logger = logging.getLogger("flask_offload")
jobs_logger = logging.getLogger("flask_offload.jobs")

default_handler: logging.Handler = logging.StreamHandler(wsgi_errors_stream)  # type: ignore[call-overload]
default_handler.setFormatter(
    logging.Formatter("[%(asctime)s] %(levelname)s in %(name)s: %(message)s")
)


def show_by_default(debug: bool) -> None:
    """Give the logger the default handler and levels, unless logging is configured."""
    if logger.level == logging.NOTSET:
        if has_level_handler(logger):
            return  # the app's own logging decides
        logger.setLevel(logging.INFO)
    if not has_level_handler(logger):
        logger.addHandler(default_handler)
    if jobs_logger.level == logging.NOTSET and default_handler in logger.handlers:
        jobs_logger.setLevel(logging.INFO if debug else logging.WARNING)


def show_worker(each_job: bool = True) -> None:
    """``flask offload worker``: starts and stops, and one line per job unless ``each_job`` is
    false (``--quiet``: a line costs about 10 µs, a busy worker runs thousands a second)."""
    logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))
    jobs_logger.setLevel(logging.INFO if each_job else logging.WARNING)
