"""Tiny HF transformers models with random weights large enough to give varied greedy tokens."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM


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
