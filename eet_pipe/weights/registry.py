"""The architecture registry: HF ``config.json`` ``model_type`` -> its weight-mapping table."""

from __future__ import annotations

from eet_pipe.weights.bert import BERT
from eet_pipe.weights.gpt2 import GPT2
from eet_pipe.weights.llama import LLAMA
from eet_pipe.weights.mapping import ArchMapping
from eet_pipe.weights.mistral import MISTRAL
from eet_pipe.weights.qwen import QWEN2, QWEN3

__all__ = ["ARCHS"]

ARCHS: dict[str, ArchMapping] = {m.model_type: m for m in (GPT2, BERT, LLAMA, MISTRAL, QWEN2, QWEN3)}
"""Every supported architecture by HF ``model_type``."""
