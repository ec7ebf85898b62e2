"""Pipeline runtime: workers, communication, schedules' executor, engine.

`PipelineEngine` and the worker errors are imported on first use (PEP 562), so importing a runtime
module (a worker imports `runtime.wire`, say) does not pull in the engine."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["PipelineEngine", "WorkerDiedError", "WorkerError", "WorkerTimeoutError"]

_EXPORTS = {"PipelineEngine": "eet_pipe.runtime.engine", "WorkerDiedError": "eet_pipe.runtime.supervisor",
            "WorkerError": "eet_pipe.runtime.supervisor", "WorkerTimeoutError": "eet_pipe.runtime.supervisor"}

if TYPE_CHECKING:
    from eet_pipe.runtime.engine import PipelineEngine
    from eet_pipe.runtime.supervisor import WorkerDiedError, WorkerError, WorkerTimeoutError


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'eet_pipe.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
