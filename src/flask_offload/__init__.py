"""Flask-Offload: durable background tasks for Flask, with no extra services."""

from .current import current_job
from .errors import DependencyFailed, OffloadError
from .execution import Cancelled, Retry
from .extension import Offload
from .job import Job
from .task import Task
from .workflow import Flow, Signature

__version__ = "0.1.0"
__all__ = [
    "Cancelled",
    "DependencyFailed",
    "Flow",
    "Job",
    "Offload",
    "OffloadError",
    "Retry",
    "Signature",
    "Task",
    "current_job",
]
