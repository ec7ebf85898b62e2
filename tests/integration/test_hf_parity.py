"""Canonical GPT-2, LLaMA, Mistral, Qwen2, Qwen3 and BERT equal HF transformers in fp32 on CPU."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import eet_pipe
from eet_pipe.generation.sequences import pad_prompts
from eet_pipe.models.meta import positions_from_mask
from tests.hf_models import MISTRAL_WINDOW, _randomise, mistral_dir, qwen2_dir, qwen3_dir  # noqa: F401

DECODERS = ["gpt2_dir", "llama_dir", "mistral_dir", "qwen2_dir", "qwen3_dir"]
PROMPTS = [[5, 17, 33, 9, 41, 2 + 1, 77, 12, 5, 6, 90], [8, 13], [100, 3, 4, 5, 6, 44, 23]]  # 11, 2, 7 tokens


def _hf_logits(hf, ids, mask):
    return hf(input_ids=ids, attention_mask=mask.long(), position_ids=positions_from_mask(mask)).logits


def _assert_logits_and_greedy_match(hf, ours, prompts: list[list[int]], new_tokens: int) -> None:
    """Logits of the padded `prompts` within 1e-4 of HF's, and `new_tokens` greedy tokens (EOS ignored) equal."""
    ids, mask = pad_prompts(prompts)
    with torch.no_grad():
        logits = _hf_logits(hf, ids, mask)
        ref = hf.generate(ids, attention_mask=mask.long(), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=0, eos_token_id=None)[:, ids.shape[1]:]
    assert (ours.forward(ids, mask) - logits)[mask].abs().max().item() <= 1e-4
    assert [r.token_ids for r in ours.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True)] == ref.tolist()


@pytest.mark.parametrize("fixture", DECODERS)
def test_decoder_logits_match_hf(fixture, request):
    path = request.getfixturevalue(fixture)
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    ours = eet_pipe.from_pretrained(str(path))
    ids, mask = pad_prompts(PROMPTS)
    with torch.no_grad():
        ref = _hf_logits(hf, ids, mask)
    out = ours.forward(ids, mask)
    assert out.shape == ref.shape
    err = (out - ref)[mask].abs().max().item()
    assert err <= 1e-4, err
    assert ref[mask].abs().max() > 0.5  # the comparison is not between near-zero numbers


@pytest.mark.parametrize("fixture", DECODERS)
def test_greedy_generation_matches_hf(fixture, request):
    path = request.getfixturevalue(fixture)
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    ours = eet_pipe.from_pretrained(str(path))
    ids, mask = pad_prompts(PROMPTS)
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask.long(), max_new_tokens=32, do_sample=False,
                          pad_token_id=0, eos_token_id=None, min_new_tokens=32)[:, ids.shape[1]:]
    got = ours.generate(PROMPTS, max_new_tokens=32, ignore_eos=True)
    assert [r.token_ids for r in got] == ref.tolist()
    assert len(set(ref[0].tolist())) > 3  # varied tokens, not a degenerate repeat


def test_mistral_context_beyond_the_window_matches_hf(mistral_dir):  # noqa: F811
    """A 40-token prompt and 24 generated tokens: far past the window of MISTRAL_WINDOW, in prefill and decode."""
    hf = AutoModelForCausalLM.from_pretrained(mistral_dir).eval()
    ours = eet_pipe.from_pretrained(str(mistral_dir))
    assert ours.cfg.sliding_window == MISTRAL_WINDOW
    _assert_logits_and_greedy_match(hf, ours, [[(7 * i + 3) % 180 + 1 for i in range(40)], [5, 9, 11]], 24)


def test_llama3_rope_scaling_matches_hf(tmp_path):
    """A checkpoint with rope_scaling={"rope_type": "llama3", ...} (saved by transformers 5.x as
    rope_parameters) loads with its scaling and matches HF, at positions past the original context."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    cfg = LlamaConfig(vocab_size=151, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
                      rope_theta=500000.0, rope_scaling=scaling, tie_word_embeddings=True, pad_token_id=0)
    torch.manual_seed(6)
    hf = _randomise(LlamaForCausalLM(cfg), 6, 0.1)
    hf.save_pretrained(tmp_path)
    ours = eet_pipe.from_pretrained(str(tmp_path))
    assert (ours.cfg.rope_type, ours.cfg.rope_factor, ours.cfg.rope_original_max_positions) == ("llama3", 8.0, 16)
    _assert_logits_and_greedy_match(hf, ours, [[(5 * i + 2) % 150 + 1 for i in range(30)], [4, 8, 15, 16, 23, 42]], 12)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_bert_hidden_states_and_pooler_match_hf(bert_dir, padding):
    """HF's BERT numbers positions 0..T-1 whatever the padding; ours follows (ArchConfig.position_ids='index')."""
    hf = AutoModel.from_pretrained(bert_dir).eval()
    ours = eet_pipe.from_pretrained(str(bert_dir))
    assert ours.cfg.position_ids == "index"
    rows = [[2, 45, 99, 13, 7, 150, 3], [2, 8, 9, 10, 11, 12, 13, 14, 3]]
    types = [[0] * 4 + [1] * 3, [0] * 9]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    type_ids = torch.zeros_like(ids)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for b, (row, kinds) in enumerate(zip(rows, types, strict=True)):
        cols = slice(0, len(row)) if padding == "right" else slice(width - len(row), width)
        ids[b, cols], type_ids[b, cols], mask[b, cols] = torch.tensor(row), torch.tensor(kinds), True
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask.long(), token_type_ids=type_ids)
    out = ours.forward(ids, mask, token_type_ids=type_ids)
    assert (out - ref.last_hidden_state)[mask].abs().max().item() <= 1e-4
    if padding == "right":  # the pooler reads the first column, a pad on a left-padded row
        pooled = ours.model.pool(out)
        assert (pooled - ref.pooler_output).abs().max().item() <= 1e-4


def test_encoder_cannot_generate(bert_dir):
    ours = eet_pipe.from_pretrained(str(bert_dir))
    with pytest.raises(ValueError, match="encoder"):
        ours.generate([[1, 2, 3]])
