"""Model-level behaviour: the padded LM head and the mask-free path for unpadded batches."""

from __future__ import annotations

import dataclasses

import torch

from eet_pipe.models.config import ArchConfig
from eet_pipe.models.meta import prefill_meta
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
