"""Flask-Offload: durable background tasks for Flask, with no extra services."""

from .extension import Offload
from .job import Job, current_job
from .task import Task
from .worker import Cancelled, Retry

__all__ = ["Cancelled", "Job", "Offload", "Retry", "Task", "current_job"]
