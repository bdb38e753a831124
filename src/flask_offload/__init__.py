"""Flask-Offload: durable background tasks for Flask, with no extra services."""

from .current import current_job
from .errors import OffloadError
from .execution import Cancelled, Retry
from .extension import Offload
from .job import Job
from .task import Task

__version__ = "0.1.0"
__all__ = ["Cancelled", "Job", "Offload", "OffloadError", "Retry", "Task", "current_job"]
