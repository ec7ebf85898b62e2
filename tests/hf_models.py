"""Tiny HF transformers models with random weights large enough to give varied greedy tokens, and session
fixtures that save the newer decoders (import them into a test module to use them)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

MISTRAL_WINDOW = 6
"""The tiny Mistral's sliding window: shorter than the test prompts (11 tokens) plus what they generate."""


def _randomise(model: torch.nn.Module, seed: int, std: float) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or "ln_" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen) if name.endswith("weight")
                        else 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))
    return model.eval()


def make_gpt2(seed: int = 0, layers: int = 6) -> GPT2LMHeadModel:
    cfg = GPT2Config(vocab_size=211, n_embd=500, n_layer=layers, n_head=25, n_positions=128,
                     bos_token_id=210, eos_token_id=210, pad_token_id=0)
    torch.manual_seed(seed)
    return _randomise(GPT2LMHeadModel(cfg), seed, 0.08)


def make_llama(seed: int = 1, layers: int = 6) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=199, hidden_size=160, intermediate_size=300, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=20, max_position_embeddings=128,
                      rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return _randomise(LlamaForCausalLM(cfg), seed, 0.1)


def make_bert(seed: int = 2, layers: int = 6) -> BertModel:
    cfg = BertConfig(vocab_size=157, hidden_size=80, num_hidden_layers=layers, num_attention_heads=5,
                     intermediate_size=200, max_position_embeddings=96, type_vocab_size=2)
    torch.manual_seed(seed)
    return _randomise(BertModel(cfg), seed, 0.1)


def make_mistral(seed: int = 3, layers: int = 4) -> MistralForCausalLM:
    """GQA 8:2, head_dim 24 set apart from hidden / heads, sliding window of MISTRAL_WINDOW on every layer."""
    cfg = MistralConfig(vocab_size=181, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                        num_attention_heads=8, num_key_value_heads=2, head_dim=24, max_position_embeddings=128,
                        sliding_window=MISTRAL_WINDOW, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                        pad_token_id=0)
    torch.manual_seed(seed)
    return _randomise(MistralForCausalLM(cfg), seed, 0.1)


def make_qwen2(seed: int = 4, layers: int = 4) -> Qwen2ForCausalLM:
    """q/k/v bias without an o_proj bias, tied embeddings, GQA 6:2, and sliding attention (window 5) on layers
    2 and 3 only (use_sliding_window with max_window_layers=2)."""
    cfg = Qwen2Config(vocab_size=173, hidden_size=96, intermediate_size=224, num_hidden_layers=layers,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, use_sliding_window=True, sliding_window=5, max_window_layers=2,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return _randomise(Qwen2ForCausalLM(cfg), seed, 0.1)


def make_qwen3(seed: int = 5, layers: int = 4) -> Qwen3ForCausalLM:
    """Per-head q/k RMSNorm, head_dim 32 (4 heads x 32 = 128 != hidden 96), GQA 4:2, tied embeddings."""
    cfg = Qwen3Config(vocab_size=167, hidden_size=96, intermediate_size=192, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return _randomise(Qwen3ForCausalLM(cfg), seed, 0.1)


def _saved(factory: pytest.TempPathFactory, name: str, model: torch.nn.Module):
    path = factory.mktemp(name)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def mistral_dir(tmp_path_factory: pytest.TempPathFactory):
    """Mistral with a sliding window of MISTRAL_WINDOW, saved as model.safetensors."""
    return _saved(tmp_path_factory, "mistral", make_mistral())


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory):
    """Qwen2 with q/k/v bias, tied embeddings and sliding attention on its last two layers."""
    return _saved(tmp_path_factory, "qwen2", make_qwen2())


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory):
    """Qwen3 with per-head q/k norms and tied embeddings."""
    return _saved(tmp_path_factory, "qwen3", make_qwen3())
