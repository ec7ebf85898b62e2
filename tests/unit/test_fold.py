"""A folded step (`StepMeta.fold`): a decode part and a prompt part run as one forward (one pass over the
weights) give the logits and the KV cache of the two parts run one after the other."""

from __future__ import annotations

import pytest
import torch

from eet_pipe.models.config import ArchConfig
from eet_pipe.models.meta import StepMeta, fold_meta
from eet_pipe.weights.loader import init_random


def _config(kind: str) -> ArchConfig:
    if kind == "gpt2":
        return ArchConfig(model_type="gpt2", vocab_size=101, hidden_size=64, num_layers=3, num_heads=4,
                          intermediate_size=128, max_positions=64)
    return ArchConfig(model_type="llama", vocab_size=97, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                      intermediate_size=96, norm="rmsnorm", activation="silu_gated", positions="rotary",
                      qkv_bias=False, out_bias=False, mlp_bias=False, tie_embeddings=False, max_positions=64,
                      sliding_window=5, sliding_window_layers=[1], qk_norm=True)


def _prompt(slots: torch.Tensor, lengths: torch.Tensor, width: int) -> StepMeta:
    cols = torch.arange(width).expand(len(slots), width)
    valid = cols < lengths.view(-1, 1)
    return StepMeta(positions=cols.masked_fill(~valid, 0), valid=valid, slots=slots, write_index=cols.clone(),
                    kv_len=width)


def _decode(slots: torch.Tensor, columns: torch.Tensor) -> StepMeta:
    col = columns.view(-1, 1)
    return StepMeta(positions=col.clone(), valid=torch.ones_like(col, dtype=torch.bool), slots=slots,
                    write_index=col.clone(), kv_len=int(columns.max()) + 1)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_folded_step_gives_the_logits_and_cache_of_its_parts_run_in_turn(kind):
    torch.manual_seed(0)
    cfg = _config(kind)
    model = init_random(cfg, None, seed=4)
    vocab = cfg.vocab_size
    # sequences on slots 0, 2, 5 have prompts of 7, 3 and 9 tokens in the cache; 1, 3 and 4 start now
    running, old_lengths = torch.tensor([0, 2, 5]), torch.tensor([7, 3, 9])
    caches = [model.new_cache(num_slots=7, max_len=24) for _ in range(2)]
    history = torch.randint(0, vocab, (3, 9))
    for cache in caches:
        model(history, _prompt(running, old_lengths, 9), cache)
    new, lengths, width = torch.tensor([1, 3, 4]), torch.tensor([6, 2, 8]), 8
    prompts = torch.randint(0, vocab, (3, width))
    fed = torch.randint(0, vocab, (3, 1))
    decode, prompt = _decode(running, old_lengths), _prompt(new, lengths, width)
    last = lengths - 1

    # apart: the decode part, then the prompt part (each commits its own columns first)
    alone_decode = model(fed, decode, caches[0])[:, 0]
    alone_prompt = model(prompts, prompt, caches[0], last=last)[:, 0]

    folded = fold_meta(decode, prompt)
    assert folded.fold == (3, 3, width) and folded.slots.tolist()[:4] == [0, 2, 5, 1]
    ids = torch.cat([fed, prompts.reshape(-1, 1)])
    out = model(ids, folded, caches[1], last=last)[:, 0]
    assert out.shape == (6, vocab)
    torch.testing.assert_close(out[:3], alone_decode, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[3:], alone_prompt, rtol=1e-5, atol=1e-5)
    for i in caches[0].k:
        torch.testing.assert_close(caches[1].k[i], caches[0].k[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(caches[1].v[i], caches[0].v[i], rtol=1e-5, atol=1e-5)
    assert torch.equal(caches[1].valid, caches[0].valid)


def test_fold_meta_wants_one_token_decode_rows_with_slots():
    prompt = _prompt(torch.tensor([1]), torch.tensor([3]), 4)
    with pytest.raises(ValueError, match="one token per row"):
        fold_meta(prompt, prompt)
