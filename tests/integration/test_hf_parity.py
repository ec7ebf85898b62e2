"""Canonical GPT-2, LLaMA and BERT equal HF transformers in fp32 on CPU."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

import eet_pipe
from eet_pipe.generation import pad_prompts
from eet_pipe.models.meta import positions_from_mask

PROMPTS = [[5, 17, 33, 9, 41, 2 + 1, 77, 12, 5, 6, 90], [8, 13], [100, 3, 4, 5, 6, 44, 23]]  # 11, 2, 7 tokens


def _hf_logits(hf, ids, mask):
    return hf(input_ids=ids, attention_mask=mask.long(), position_ids=positions_from_mask(mask)).logits


@pytest.mark.parametrize("fixture", ["gpt2_dir", "llama_dir"])
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


@pytest.mark.parametrize("fixture", ["gpt2_dir", "llama_dir"])
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


def test_bert_hidden_states_and_pooler_match_hf(bert_dir):
    hf = AutoModel.from_pretrained(bert_dir).eval()
    ours = eet_pipe.from_pretrained(str(bert_dir))
    ids = torch.tensor([[2, 45, 99, 13, 7, 150, 3, 0, 0], [2, 8, 9, 10, 11, 12, 13, 14, 3]])
    mask = ids != 0
    mask[1] = True
    types = torch.tensor([[0] * 4 + [1] * 5, [0] * 9])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask.long(), token_type_ids=types)
    out = ours.forward(ids, mask, token_type_ids=types)
    assert (out - ref.last_hidden_state)[mask].abs().max().item() <= 1e-4
    pooled = ours.model.pool(out)
    assert (pooled - ref.pooler_output).abs().max().item() <= 1e-4


def test_encoder_cannot_generate(bert_dir):
    ours = eet_pipe.from_pretrained(str(bert_dir))
    with pytest.raises(ValueError, match="encoder"):
        ours.generate([[1, 2, 3]])
