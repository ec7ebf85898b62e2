"""Model-level behaviour: the padded LM head, the mask-free path for unpadded batches, sliding windows,
position conventions and the config fields behind them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from eet_pipe.models.config import ArchConfig
from eet_pipe.models.kv_cache import KVCache
from eet_pipe.models.layers import attention_mask, window_valid
from eet_pipe.models.meta import decode_meta, index_positions, prefill_meta
from eet_pipe.weights.loader import init_random


def _gpt2(vocab: int, layers: int) -> ArchConfig:
    return ArchConfig(model_type="gpt2", vocab_size=vocab, hidden_size=64, num_layers=layers, num_heads=4,
                      intermediate_size=128, max_positions=64)


def test_padded_lm_head_gives_the_same_logits_and_keeps_shapes_and_tying():
    cfg = _gpt2(vocab=509, layers=2)
    model = init_random(cfg, None, seed=3)
    ids = torch.randint(0, 509, (2, 7))
    meta = prefill_meta(torch.ones(2, 7, dtype=torch.bool))
    want = model(ids, meta)
    model.pad_vocab(64)
    assert model.head.padded.shape == (512, 64) and model.head.weight.shape == (509, 64)
    assert model.embed.tok.weight is model.head.weight  # still tied, and a view of the padded buffer
    assert model.head.weight.data_ptr() == model.head.padded.data_ptr()
    assert model.head.padded[509:].abs().sum() == 0
    got = model(ids, meta)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # another GEMM blocking: last bits only
    assert {k: v.shape for k, v in model.state_dict().items()}["head.weight"] == (509, 64)
    model.double()  # a cast gives the weight new storage: the padding is dropped, results stay right
    assert model.head.padded is None
    torch.testing.assert_close(model(ids, meta).float(), want)


def test_unpadded_batches_take_the_maskless_path_with_the_same_result():
    cfg = _gpt2(vocab=128, layers=2)
    model = init_random(cfg, None, seed=4)
    ids = torch.randint(0, 128, (3, 9))
    dense = prefill_meta(torch.ones(3, 9, dtype=torch.bool))
    assert dense.dense and not prefill_meta(torch.tensor([[0, 1, 1]], dtype=torch.bool)).dense
    masked = dataclasses.replace(dense, dense=False)
    torch.testing.assert_close(model(ids, dense), model(ids, masked), rtol=1e-5, atol=1e-5)


def test_padded_head_notices_a_replaced_weight():
    cfg = _gpt2(vocab=509, layers=1)
    model = init_random(cfg, None, seed=5)
    model.pad_vocab(64)
    other = init_random(cfg, None, seed=6)
    model.load_state_dict(other.state_dict(), assign=True)  # new storage: the padded buffer is stale
    ids = torch.randint(0, 509, (1, 5))
    meta = prefill_meta(torch.ones(1, 5, dtype=torch.bool))
    torch.testing.assert_close(model(ids, meta), other(ids, meta))
    assert model.head.padded is None


def _llama(**fields) -> ArchConfig:
    base = dict(model_type="llama", vocab_size=97, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                intermediate_size=96, norm="rmsnorm", activation="silu_gated", positions="rotary", qkv_bias=False,
                out_bias=False, mlp_bias=False, tie_embeddings=False, max_positions=64)
    return ArchConfig(**{**base, **fields})


def test_sliding_window_mask_sees_the_last_window_columns_causally():
    meta = prefill_meta(torch.tensor([[False, True, True, True, True, True]]))
    mask = attention_mask(meta, causal=True, cache=None, window=3)[0, 0]
    want = torch.zeros(6, 6, dtype=torch.bool)
    for q in range(6):
        for k in range(max(1, q - 2), q + 1):  # the pad column 0 is never seen (except by itself)
            want[q, k] = True
    want[0, 0] = True
    assert torch.equal(mask, want)
    assert torch.equal(attention_mask(meta, causal=True, cache=None)[0, 0],
                       torch.ones(6, 6, dtype=torch.bool).tril() & (meta.valid[0] | torch.eye(6, dtype=torch.bool)))


def test_window_valid_drops_columns_before_each_slots_window():
    cfg = _llama()
    cache = KVCache(cfg, [0], num_slots=3, max_len=10, dtype=torch.float32, device="cpu")
    cache.valid[:, :8] = True
    cache.valid[1, 0] = False
    meta = decode_meta(torch.tensor([1, 0]), torch.tensor([7, 4]), torch.tensor([6, 4]), kv_len=8)
    valid = window_valid(meta, cache, window=3)
    assert valid.shape == (3, 8)
    assert valid[1].tolist() == [False] * 5 + [True] * 3  # columns 5..7 for the token written at 7
    assert valid[0].tolist() == [False] * 2 + [True] * 6  # columns 2..4 (and later ones, beyond its length)
    assert valid[2].tolist() == [True] * 8  # a slot outside the batch keeps its validity


def test_index_positions_ignore_padding_and_follow_the_cache_columns():
    meta = prefill_meta(torch.tensor([[False, False, True], [True, True, True]]))
    assert meta.positions.tolist() == [[0, 0, 0], [0, 1, 2]]
    assert index_positions(meta).positions.tolist() == [[0, 1, 2], [0, 1, 2]]
    step = decode_meta(torch.tensor([0]), torch.tensor([5]), torch.tensor([3]))
    assert index_positions(step).positions.tolist() == [[5]]


def test_position_ids_default_follows_the_kind_of_model():
    assert _llama().position_ids == "mask"  # decoders: as HF generate
    assert _gpt2(vocab=10, layers=1).position_ids == "mask"
    encoder = ArchConfig(model_type="bert", causal=False, lm_head=False, positions="learned")
    assert encoder.position_ids == "index"  # absolute-position encoders: as HF's BERT
    assert encoder.replace(position_ids="mask").position_ids == "mask"


@pytest.mark.parametrize("fields,message", [
    ({"position_ids": "cumsum"}, "position_ids='cumsum' is invalid: allowed: mask, index"),
    ({"sliding_window": 0}, "sliding_window=0 is invalid: must be a positive integer or None"),
    ({"sliding_window": 4, "sliding_window_layers": [3]}, r"sliding_window_layers=\[3\] is invalid: must be layer "
                                                         "indices 0..2"),
    ({"sliding_window_layers": [1]}, "needs sliding_window to be set"),
    ({"qk_norm": True, "norm": "layernorm"}, "qk_norm=True is invalid: needs norm='rmsnorm'"),
])
def test_new_fields_are_validated(fields, message):
    with pytest.raises(ValueError, match=message):
        _llama(**fields)


def test_a_window_longer_than_the_sequence_keeps_the_maskless_path():
    model = init_random(_llama(sliding_window=16), None, seed=7)
    ids = torch.randint(0, 97, (2, 9))
    dense = prefill_meta(torch.ones(2, 9, dtype=torch.bool))
    torch.testing.assert_close(model(ids, dense), model(ids, dataclasses.replace(dense, dense=False)))
    short = init_random(_llama(sliding_window=4), None, seed=7)
    assert (short(ids, dense) - model(ids, dense)).abs().max() > 1e-3  # a window shorter than 9 is applied


def test_windowed_decode_equals_the_windowed_full_forward():
    """Prefill + decode steps through the cache give the logits of a cache-free forward of the whole
    sequence, with a window shorter than the sequence, on some layers only (sliding_window_layers)."""
    cfg = _llama(sliding_window=3, sliding_window_layers=[0, 2], qk_norm=True)
    model = init_random(cfg, None, seed=8)
    for layer in model.layers.values():  # non-trivial q/k norm weights
        layer.attn.q_norm.weight.normal_(1.0, 0.2, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 97, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, :3] = False  # left padding
    full = model(ids, prefill_meta(mask))
    cache = model.new_cache(num_slots=2, max_len=10)
    slots = torch.tensor([0, 1])
    got = [model(ids[:, :6], prefill_meta(mask[:, :6], slots), cache)]
    lengths = mask[:, :6].sum(-1)
    for t in range(6, 10):
        step = decode_meta(slots, torch.full((2,), t), lengths.clone(), kv_len=t + 1)
        got.append(model(ids[:, t:t + 1], step, cache))
        lengths += 1
    torch.testing.assert_close(torch.cat(got, dim=1)[mask], full[mask], rtol=1e-5, atol=1e-5)
