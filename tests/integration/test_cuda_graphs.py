"""Decode through CUDA graphs equals eager decode. CPU tests cover the padded, full-cache static step
(the exact computation a graph replays) and the eager fallback; `cuda` tests capture real graphs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from eet_pipe.generation.lm import LanguageModel
from eet_pipe.generation.sequences import SamplingParams, generate_loop, pad_prompts
from eet_pipe.models.config import ArchConfig
from eet_pipe.models.meta import decode_meta, prefill_meta
from eet_pipe.models.quant import quantize_model
from eet_pipe.ops.cuda_graphs import (
    DecodeGraphs,
    GraphDecoder,
    StaticDecodeInputs,
    bucket_for,
    static_decode_step,
    static_greedy_step,
)
from eet_pipe.weights.loader import init_random

# GPT-2 shape with head dim 64 (the decode-attention kernel's case), weights large enough for varied tokens
CFG = ArchConfig(model_type="gpt2", vocab_size=512, hidden_size=256, num_layers=3, num_heads=4,
                 intermediate_size=1024, max_positions=256, eos_token_id=511)
LENGTHS = [7, 2, 11, 5, 1, 9, 3, 13, 4, 6, 8, 2, 10, 12, 3, 5]


def _prompts(batch: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(batch)
    return [torch.randint(0, CFG.vocab_size - 1, (LENGTHS[i % len(LENGTHS)],), generator=gen).tolist()
            for i in range(batch)]


def _model(dtype: torch.dtype = torch.float32, device: str = "cpu"):
    return init_random(CFG, seed=0, dtype=dtype, device=device, std=0.1)


def _prefilled(model, prompts, spare: int = 1, extra: int = 8):
    """A cache with `spare` unused slots after prefill; returns (cache, last tokens [B, 1], decode meta)."""
    ids, mask = pad_prompts(prompts)
    b, width = ids.shape
    cache = model.new_cache(b + spare, width + extra)
    device = cache.valid.device
    logits = model(ids.to(device), prefill_meta(mask, torch.arange(b)).to(device), cache)[:, -1]
    meta = decode_meta(torch.arange(b), torch.full((b,), width), mask.sum(-1))
    return cache, logits.argmax(-1).view(b, 1).cpu(), meta


def test_bucket_for():
    assert bucket_for(1, (1, 2, 4)) == 1
    assert bucket_for(3, (1, 2, 4)) == 4
    assert bucket_for(5, (1, 2, 4)) is None


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_static_step_with_padding_equals_eager_step_cpu(batch):
    model = _model()
    cache, nxt, meta = _prefilled(model, _prompts(batch))
    with torch.inference_mode():
        eager = model(nxt, meta, cache)[:, -1]  # attends over the first kv_len columns only
        inputs = StaticDecodeInputs(bucket_for(batch, (1, 2, 4, 8)), cache.num_slots - 1, torch.device("cpu"))
        assert inputs.load(nxt, meta) == batch
        static = static_decode_step(model, cache, inputs)  # padded batch, whole cache
    assert static.shape[0] >= batch
    torch.testing.assert_close(static[:batch], eager, atol=1e-5, rtol=1e-5)
    assert (inputs.slots[batch:] == cache.num_slots - 1).all()


@pytest.mark.parametrize("batch", [1, 3])
def test_static_greedy_step_feeds_its_tokens_on_cpu(batch):
    """Two greedy steps over the static buffers pick the tokens of two eager steps fed argmax by hand."""
    model = _model()
    cache, nxt, meta = _prefilled(model, _prompts(batch))
    twin, _, _ = _prefilled(model, _prompts(batch))
    with torch.inference_mode():
        want = []
        for n in range(2):
            step_meta = dataclasses.replace(meta, write_index=meta.write_index + n, positions=meta.positions + n,
                                            kv_len=meta.kv_len + n)
            nxt = model(nxt, step_meta, twin)[:, -1].argmax(-1).view(batch, 1)
            want.append(nxt.view(-1).tolist())
        inputs = StaticDecodeInputs(4, cache.num_slots - 1, torch.device("cpu"))
        inputs.load(_prefilled(model, _prompts(batch))[1], meta)
        got = [static_greedy_step(model, cache, inputs)[:batch].tolist() for _ in range(2)]
    assert got == want
    assert inputs.write_index[:batch].view(-1).tolist() == (meta.write_index.view(-1) + 2).tolist()
    assert (inputs.ids[:batch].view(-1) == torch.tensor(got[-1])).all()


def test_greedy_generation_through_an_advance_function_equals_the_step_loop_cpu():
    """`generate_loop` with a step that offers `greedy` (as `DecodeGraphs` does on a GPU) calls its `advance`
    once per decode step and gives the step-by-step loop's tokens."""
    model = _model()
    prompts = _prompts(3)
    want = LanguageModel(model).generate(prompts, max_new_tokens=12, ignore_eos=True, cuda_graphs=False)
    ids, _ = pad_prompts(prompts)
    cache = model.new_cache(len(prompts) + 1, ids.shape[1] + 12)
    calls = []

    def step(x, meta):
        return model(x, meta, cache)[:, -1]

    def greedy(first, meta):
        inputs = StaticDecodeInputs(4, cache.num_slots - 1, torch.device("cpu"))
        rows = inputs.load(first, meta)

        def advance():
            calls.append(rows)
            return static_greedy_step(model, cache, inputs)[:rows]

        return advance

    step.greedy = greedy
    with torch.inference_mode():
        got = generate_loop(step, prompts, [SamplingParams(max_new_tokens=12, ignore_eos=True)] * 3, [CFG.eos_token_id])
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert calls == [3] * 11


def test_decode_graphs_fall_back_to_eager_on_cpu():
    model = _model()
    cache, nxt, meta = _prefilled(model, _prompts(3))
    graphs = DecodeGraphs(model, cache, (1, 4))
    assert not graphs.enabled and graphs.spare_slot == 3
    with torch.inference_mode():
        got = graphs(nxt, meta)
    assert got.shape == (3, CFG.vocab_size) and not graphs.graphs
    assert graphs.greedy(nxt, meta) is None  # no graphs to replay: generation runs its step loop


def test_generate_with_cuda_graphs_flag_on_cpu_equals_eager():
    lm = LanguageModel(_model())
    prompts = _prompts(3)
    want = lm.generate(prompts, max_new_tokens=12, cuda_graphs=False)
    got = lm.generate(prompts, max_new_tokens=12, cuda_graphs=True)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert len({t for r in want for t in r.token_ids}) > 5


def test_graph_decoder_reuses_a_cache_that_fits():
    decoder = GraphDecoder(_model(), (1, 2, 4))
    first = decoder.prepare(3, 40)
    assert first.cache.num_slots == 5 and first.cache.max_len == 64
    first.cache.valid.fill_(True)
    again = decoder.prepare(2, 50)
    assert again is first and not again.cache.valid.any()
    assert decoder.prepare(4, 80) is not first


def test_errors():
    model = _model()
    with pytest.raises(ValueError, match="spare slot"):
        DecodeGraphs(model, model.new_cache(1, 16))
    cache, nxt, meta = _prefilled(model, _prompts(2), spare=1)
    inputs = StaticDecodeInputs(4, 1, torch.device("cpu"))  # spare slot 1 is a real sequence's slot
    with pytest.raises(ValueError, match="collides with the spare slot"):
        inputs.load(nxt, meta)
    with pytest.raises(ValueError, match="do not fit the bucket"):
        StaticDecodeInputs(1, 2, torch.device("cpu")).load(nxt, meta)


# ---------------------------------------------------------------- GPU


def _gpu_lm(quantize: bool = False) -> LanguageModel:
    model = _model(torch.float16, "cuda:0")
    return LanguageModel(quantize_model(model) if quantize else model)


@pytest.mark.cuda
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_graph_decode_equals_eager_decode_gpu(batch):
    lm = _gpu_lm()
    prompts = _prompts(batch)
    want = lm.generate(prompts, max_new_tokens=24, ignore_eos=True, cuda_graphs=False)
    got = lm.generate(prompts, max_new_tokens=24, ignore_eos=True, cuda_graphs=True)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert bucket_for(batch, lm._graphs.buckets) in lm._graphs.graphs.greedy_graphs  # greedy: one replay per step
    sampled = lm.generate(prompts, max_new_tokens=8, ignore_eos=True, temperature=0.7, seed=3, cuda_graphs=True)
    again = lm.generate(prompts, max_new_tokens=8, ignore_eos=True, temperature=0.7, seed=3, cuda_graphs=False)
    assert [r.token_ids for r in sampled] == [r.token_ids for r in again]
    assert bucket_for(batch, lm._graphs.buckets) in lm._graphs.graphs.graphs  # sampling: the logits graph


@pytest.mark.cuda
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_graph_step_logits_equal_eager_step_gpu(batch):
    model = _model(torch.float16, "cuda:0")
    cache, nxt, meta = _prefilled(model, _prompts(batch))
    with torch.inference_mode():
        eager = model(nxt.cuda(), meta.to("cuda:0"), cache)[:, -1]
        graphs = DecodeGraphs(model, cache)
        got = graphs(nxt, meta)
        again = graphs(nxt, meta)  # second replay of the same (idempotent) step
    torch.testing.assert_close(got, eager, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(again, got, atol=0, rtol=0)
    assert set(graphs.graphs) == {bucket_for(batch, graphs.buckets)}


@pytest.mark.cuda
def test_sequences_finishing_at_different_steps_gpu():
    lm = _gpu_lm()
    prompts = _prompts(5)
    free = lm.generate(prompts, max_new_tokens=16, ignore_eos=True, cuda_graphs=False)
    eos = free[0].token_ids[3]  # row 0 stops early at its 4th token; other rows when they reach it
    lm.cfg = dataclasses.replace(CFG, eos_token_id=eos)  # generation reads EOS from lm.cfg
    want = lm.generate(prompts, max_new_tokens=16, cuda_graphs=False)
    got = lm.generate(prompts, max_new_tokens=16, cuda_graphs=True)
    assert [(r.token_ids, r.finish_reason) for r in got] == [(r.token_ids, r.finish_reason) for r in want]
    assert got[0].finish_reason == "stop" and len(got[0].token_ids) <= 3


@pytest.mark.cuda
def test_int8_graph_decode_equals_eager_gpu():
    lm = _gpu_lm(quantize=True)
    prompts = _prompts(3)
    want = lm.generate(prompts, max_new_tokens=16, ignore_eos=True, cuda_graphs=False)
    got = lm.generate(prompts, max_new_tokens=16, ignore_eos=True, cuda_graphs=True)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]


def test_graph_cache_needs_cuda_and_graphed_is_identity_on_cpu():
    from eet_pipe.ops.cuda_graphs import GraphCache, cache_length, graphed

    with pytest.raises(ValueError, match="GraphCache needs a CUDA device, got cpu"):
        GraphCache(torch.device("cpu"))

    def fn():
        return 1

    assert graphed(fn, "cpu") is fn
    assert cache_length(96, 1024) == 128 and cache_length(1000, 1024) == 1024 and cache_length(1030, 1024) == 1030


@pytest.mark.cuda
def test_graph_cache_warms_up_eagerly_then_captures_and_replays():
    from eet_pipe.ops.cuda_graphs import GraphCache

    cache = GraphCache(torch.device("cuda:0"), max_graphs=2)
    w = torch.randn(64, 64, device="cuda:0")
    outs = [cache.run(("mm", 8), lambda x: (x @ w).relu(), (torch.full((8, 64), float(i), device="cuda:0"),)).clone()
            for i in range(4)]
    assert cache.captures == 1 and cache.replays == 3
    for i, out in enumerate(outs):
        torch.testing.assert_close(out, (torch.full((8, 64), float(i), device="cuda:0") @ w).relu())
    for key in (("a",), ("b",), ("c",)):  # two uses each: captured; the oldest is evicted past max_graphs
        for _ in range(2):
            cache.run(key, lambda x: x * 2, (torch.ones(4, device="cuda:0"),))
    assert len(cache) == 2


@pytest.mark.cuda
def test_graph_cache_keeps_large_outputs_eager_and_bounds_its_memory():
    from eet_pipe.ops.cuda_graphs import GraphCache

    x = torch.ones(256, 256, device="cuda:0")
    big = GraphCache(torch.device("cuda:0"), max_output_bytes=1024)
    for _ in range(3):
        torch.testing.assert_close(big.run(("big",), lambda t: t * 3, (x,)), x * 3)
    assert big.captures == 0 and len(big) == 0  # 256 KiB output > 1 KiB: never captured
    small = GraphCache(torch.device("cuda:0"), max_bytes=3 * 2 * 256 * 256 * 4)  # room for ~3 graphs
    for n in range(6):
        for _ in range(2):
            small.run(("k", n), lambda t, n=n: t + n, (x,))
    assert len(small) <= 3 and small.nbytes <= small.max_bytes


def test_to_device_leaves_cpu_tensors_alone_on_cpu():
    from eet_pipe.models.meta import to_device

    t = torch.arange(5)
    assert to_device(t, "cpu") is t


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_host_to_device_copies_do_not_wait_for_queued_gpu_work():
    """A stage copies a command's inputs while earlier GPU work may still be queued: once the pinned
    blocks are cached (the steady state of repeated commands), the copy must not stall the host."""
    import time

    from eet_pipe.models.meta import to_device

    meta = prefill_meta(torch.ones(4, 9, dtype=torch.bool))
    to_device(torch.arange(36).view(4, 9), "cuda"), meta.to("cuda", pin=True)  # warm the pinned-block cache
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time queued on the current stream
    began = time.perf_counter()
    ids = to_device(torch.arange(36).view(4, 9), "cuda")
    moved = meta.to("cuda", pin=True)
    host_s = time.perf_counter() - began
    torch.cuda.synchronize()
    assert host_s < 0.2, f"the copies waited {host_s:.2f} s for queued GPU work"
    assert torch.equal(ids.cpu(), torch.arange(36).view(4, 9))
    assert torch.equal(moved.positions.cpu(), meta.positions) and moved.positions.is_cuda
