"""Flask-Offload's own errors: one family to ``except``, each also the built-in type it was
raised as before the family existed, so no ``except ValueError`` in an app stops working.

``Cancelled`` and ``Retry`` are not here: a task raises them to tell its pool how a run ended,
and an ``except OffloadError`` in a task must not swallow them.
"""

from __future__ import annotations

import sqlite3


class OffloadError(Exception):
    """Base of every error Flask-Offload raises itself."""


class ConfigurationError(OffloadError, ValueError):
    """An ``OFFLOAD_*`` setting, or a task's option, that cannot work; the message names it."""


class ConfigurationTypeError(ConfigurationError, TypeError):
    """A setting of the wrong type (a number where a list of names goes): also the
    ``TypeError`` such a setting raised before."""


class NotInitialised(OffloadError, RuntimeError):
    """Flask-Offload is used on an app it was not initialised on, or with no app at all."""


class NotSerializable(OffloadError, TypeError):
    """Arguments, a result or progress that are not strict JSON (or are too large)."""


class JobNotFound(OffloadError, LookupError):
    """No stored job has this id (unknown, malformed, expired or purged)."""


class UnknownTask(OffloadError, LookupError):
    """No task of this app is registered under this name."""


class DependencyFailed(OffloadError, RuntimeError):
    """A job's parent (``after=``) failed or was cancelled: the job is cancelled with an error
    naming that parent (``DependencyFailed: <task> <id> failed``). ``offload.retry(parent)``
    re-arms it."""


class UnknownDependency(JobNotFound):
    """``after=`` names a job that is not stored (unknown, or expired and purged)."""


class JobIdInUse(OffloadError, ValueError):
    """``enqueue(id=...)`` with an id another job has."""


class NotRetryable(OffloadError, ValueError):
    """A retry asked of a job that cannot run again (not finished, or its snapshot is gone)."""


class RetryDelayError(OffloadError, ValueError):
    """A retry delay that is not a finite number of seconds before 9999-12-31."""


class StorageError(OffloadError, RuntimeError):
    """The job store cannot be used as it is (unreadable, read-only, a newer schema)."""


class StorageCorrupt(StorageError):
    """The storage answers that its data is damaged: running on would only repeat work."""


class StorageLocked(StorageError, sqlite3.OperationalError):
    """SQLite's write lock stayed held past the busy wait, most often by the caller's own
    write transaction on the job store's file; also the ``sqlite3`` error it was before."""


class StorageUnavailable(OffloadError, ConnectionError):
    """The job store's server cannot be reached."""


class InvalidArgument(OffloadError, TypeError):
    """A call, decorator or option given something of the wrong type, an option it does not
    take, or two options that exclude each other; the message names it."""


class InvalidValue(OffloadError, ValueError):
    """An argument of the right type whose value cannot be used (out of range, malformed, a
    naive datetime, over a size limit); the message names it."""


class UsageError(OffloadError, RuntimeError):
    """Something asked where it cannot work: ``current_job`` outside a task, a Job not
    stored, a pool that stopped, an enqueue that would wait for the caller's own lock."""


class WaitTimeout(OffloadError, TimeoutError):
    """``job.wait(timeout)`` ran out of time before the job finished."""


class MissingDependency(OffloadError, ImportError):
    """A feature needs an optional extra that is not installed; the message names it."""
