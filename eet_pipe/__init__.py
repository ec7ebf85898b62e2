"""eet_pipe: pipeline-parallel transformer inference."""

from eet_pipe.generation import GenerationResult, SamplingParams
from eet_pipe.lm import LanguageModel, from_pretrained
from eet_pipe.models.config import ArchConfig
from eet_pipe.models.model import CanonicalModel

__version__ = "0.1.0"

__all__ = ["ArchConfig", "CanonicalModel", "GenerationResult", "LanguageModel", "SamplingParams",
           "from_pretrained", "__version__"]
