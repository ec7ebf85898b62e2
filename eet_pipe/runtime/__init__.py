"""Pipeline runtime: workers, communication, schedules' executor, engine."""

from eet_pipe.runtime.engine import PipelineEngine
from eet_pipe.runtime.supervisor import WorkerDiedError, WorkerError, WorkerTimeoutError

__all__ = ["PipelineEngine", "WorkerDiedError", "WorkerError", "WorkerTimeoutError"]
