"""Weights decoupled from structure: per-architecture mapping tables and lazy loading."""

from eet_pipe.weights.checkpoint import Checkpoint, CheckpointError
from eet_pipe.weights.loader import ARCHS, from_torch, init_random, load_checkpoint, mapping_for, read_hf_config
from eet_pipe.weights.mapping import MappingError, from_hf, to_hf

__all__ = ["ARCHS", "Checkpoint", "CheckpointError", "MappingError", "from_hf", "from_torch", "init_random",
           "load_checkpoint", "mapping_for", "read_hf_config", "to_hf"]
