"""eet_pipe: pipeline-parallel transformer inference.

The public names are imported on first use (PEP 562), so `import eet_pipe` is light: torch, the
models and the worker runtime load only when a name that needs them is touched.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {  # public name -> module that defines it
    "ArchConfig": "eet_pipe.models.config",
    "CanonicalModel": "eet_pipe.models.model",
    "GenerationResult": "eet_pipe.generation.sequences",
    "SamplingParams": "eet_pipe.generation.sequences",
    "LanguageModel": "eet_pipe.generation.lm",
    "from_pretrained": "eet_pipe.generation.lm",
    "PipelineEngine": "eet_pipe.runtime.engine",
    "WorkerError": "eet_pipe.runtime.supervisor",
    "WorkerDiedError": "eet_pipe.runtime.supervisor",
    "WorkerTimeoutError": "eet_pipe.runtime.supervisor",
}

__all__ = ["ArchConfig", "CanonicalModel", "GenerationResult", "LanguageModel", "PipelineEngine", "SamplingParams",
           "WorkerDiedError", "WorkerError", "WorkerTimeoutError", "from_pretrained", "__version__"]

if TYPE_CHECKING:
    from eet_pipe.generation.lm import LanguageModel, from_pretrained
    from eet_pipe.generation.sequences import GenerationResult, SamplingParams
    from eet_pipe.models.config import ArchConfig
    from eet_pipe.models.model import CanonicalModel
    from eet_pipe.runtime.engine import PipelineEngine
    from eet_pipe.runtime.supervisor import WorkerDiedError, WorkerError, WorkerTimeoutError


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:  # a subpackage used as an attribute (`eet_pipe.ops`) after a plain `import eet_pipe`
        if importlib.util.find_spec(f"{__name__}.{name}") is None:
            raise AttributeError(f"module 'eet_pipe' has no attribute {name!r}")
        return importlib.import_module(f"{__name__}.{name}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
