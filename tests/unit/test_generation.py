"""Sampling, stopping and prompt checks."""

from __future__ import annotations

import pytest
import torch

from eet_pipe import from_pretrained
from eet_pipe.generation.sequences import Sampler, SamplingParams, SequenceState, check_prompts, pad_prompts


@pytest.mark.parametrize("field,value,msg", [
    ("temperature", -0.5, "temperature=-0.5 is invalid"),
    ("top_p", 0.0, "top_p=0.0 is invalid"),
    ("top_p", 1.5, "top_p=1.5 is invalid"),
    ("top_k", -1, "top_k=-1 is invalid"),
    ("max_new_tokens", 0, "max_new_tokens=0 is invalid"),
    ("max_new_tokens", -3, "max_new_tokens=-3 is invalid"),
])
def test_invalid_sampling_params(field, value, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**{field: value})


def test_pad_prompts_left_pads():
    ids, mask = pad_prompts([[1, 2, 3], [4]], pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]


def test_check_prompts_errors():
    with pytest.raises(ValueError, match="token id 300 outside the vocabulary 0..259"):
        check_prompts([[1, 300]], 260, 100)
    with pytest.raises(ValueError, match="prompt 0 has 90 tokens \\+ max_new_tokens=20 = 110 > the model's max"):
        check_prompts([[1] * 90], 260, 100, 20)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        check_prompts([[1], []], 260, 100)


def test_top_k_one_is_greedy_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9]])
    k1 = Sampler([SamplingParams(temperature=1.0, top_k=1, seed=0)])
    assert all(int(k1(logits)) == 1 for _ in range(20))
    nucleus = Sampler([SamplingParams(temperature=1.0, top_p=0.5, seed=0)])
    seen = {int(nucleus(logits)) for _ in range(50)}
    assert seen == {1}  # p(1) ~ 0.5 crosses top_p alone
    wide = Sampler([SamplingParams(temperature=1.0, top_p=0.9, seed=0)])
    assert {int(wide(logits)) for _ in range(200)} == {1, 3}


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(1, 50)
    a = Sampler([SamplingParams(temperature=1.0, seed=7)])
    b = Sampler([SamplingParams(temperature=1.0, seed=7)])
    assert [int(a(logits)) for _ in range(10)] == [int(b(logits)) for _ in range(10)]


def test_sequence_state_eos_and_stop_strings():
    s = SequenceState(SamplingParams(max_new_tokens=10), eos_ids=[0])
    s.append(5)
    s.append(0)
    s.append(6)
    assert s.tokens == [5] and s.finish_reason == "stop"
    decode = lambda ids: "".join(chr(i) for i in ids)
    t = SequenceState(SamplingParams(max_new_tokens=10, stop=["cd"]), eos_ids=[], decode=decode)
    for ch in "abcde":
        t.append(ord(ch))
    assert t.text == "ab" and t.finish_reason == "stop" and len(t.tokens) == 4
    u = SequenceState(SamplingParams(max_new_tokens=2), eos_ids=[])
    u.append(1)
    u.append(2)
    assert u.finish_reason == "length"


def test_generate_finishes_sequences_independently():
    lm = from_pretrained("tiny")
    greedy = lm.generate(["ab", "xyz"], max_new_tokens=6, ignore_eos=True)
    first = greedy[0].token_ids[0]
    lm.cfg.eos_token_id = first  # the first sequence now stops at once; the second runs on
    try:
        out = lm.generate(["ab", "xyz"], max_new_tokens=6)
    finally:
        lm.cfg.eos_token_id = 257
    assert out[0].token_ids == [] and out[0].finish_reason == "stop"
    if first not in greedy[1].token_ids:
        assert out[1].token_ids == greedy[1].token_ids and out[1].finish_reason == "length"


def test_generate_input_errors():
    lm = from_pretrained("tiny")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        lm.generate([[1, 2, 999]])
    with pytest.raises(ValueError, match="max positions 512"):
        lm.generate("a" * 500, max_new_tokens=20)
    with pytest.raises(ValueError, match="temperature=-1"):
        lm.generate("a", temperature=-1)


def _reference_greedy(lm, prompts, params, eos_ids):
    """Step-by-step greedy decoding: record each step's tokens before running the next step."""
    from eet_pipe.models.meta import decode_meta, prefill_meta

    ids, mask = pad_prompts(prompts)
    batch, width = ids.shape
    cache = lm.model.new_cache(batch, width + max(p.max_new_tokens for p in params))
    states = [SequenceState(p, eos_ids, lm.tokenizer.decode) for p in params]
    slots, lengths = torch.arange(batch), mask.sum(-1)
    logits = lm.model(ids, prefill_meta(mask, slots), cache)[:, -1]
    for n in range(max(p.max_new_tokens for p in params)):
        nxt = logits.argmax(-1)
        for s, t in zip(states, nxt.tolist(), strict=True):
            s.append(t)
        if all(s.finished for s in states):
            break
        meta = decode_meta(slots, torch.full((batch,), width + n), lengths + n)
        logits = lm.model(nxt.view(batch, 1), meta, cache)[:, -1]
    return [(s.tokens, s.finish_reason, s.text) for s in states]


def test_greedy_generation_reads_tokens_one_step_late_but_returns_the_step_by_step_result():
    lm = from_pretrained("tiny")
    prompts = ["ab", "the quick", "x"]
    free = lm.generate(prompts, max_new_tokens=12, ignore_eos=True)
    eos = free[1].token_ids[4]  # sequence 1 meets this token as its 5th: EOS ends it there
    stop = lm.tokenizer.decode(free[2].token_ids[2:4])  # sequence 2 stops on a string
    params = [SamplingParams(max_new_tokens=5, ignore_eos=True), SamplingParams(max_new_tokens=12),
              SamplingParams(max_new_tokens=12, stop=[stop], ignore_eos=True)]
    want = _reference_greedy(lm, [lm.tokenizer.encode(p) for p in prompts], params, [eos])
    lm.cfg.eos_token_id = eos
    try:
        got = lm.generate(prompts, max_new_tokens=12, stop=[stop])
        got_mixed = [lm.generate([p], **vars(q))[0] for p, q in zip(prompts, params, strict=True)]
    finally:
        lm.cfg.eos_token_id = 257
    assert [(r.token_ids, r.finish_reason) for r in got_mixed] == [(w[0], w[1]) for w in want]
    assert got_mixed[1].finish_reason == "stop" and len(got_mixed[1].token_ids) < 12
    assert got_mixed[2].finish_reason == "stop" and stop not in got_mixed[2].text
    assert all(r.finish_reason == "stop" for r in got[1:])


def test_pad_part_adds_spare_slot_rows():
    from eet_pipe.runtime.step_parts import StepPart, pad_part, part_meta

    part = StepPart(slots=torch.tensor([3, 1]), tokens=torch.tensor([[7], [9]]), lengths=torch.tensor([1, 1]),
                    start=torch.tensor([10, 4]))
    padded = pad_part(part, 4, spare_slot=16)
    assert padded.slots.tolist() == [3, 1, 16, 16] and padded.tokens.tolist() == [[7], [9], [0], [0]]
    assert padded.start.tolist() == [10, 4, 0, 0] and padded.lengths.tolist() == [1, 1, 1, 1]
    assert part_meta(padded).kv_len == 11 and pad_part(part, 2, 16) is part


def test_prompt_part_padded_to_row_and_width_buckets():
    from eet_pipe.runtime.step_parts import PREFILL_WIDTHS, StepPart, pad_part, part_meta, prefill_width

    assert PREFILL_WIDTHS[:8] == (16, 32, 48, 64, 96, 128, 192, 256)
    assert all(b / a <= 1.5 for a, b in zip(PREFILL_WIDTHS[1:], PREFILL_WIDTHS[2:], strict=False))
    assert [prefill_width(w, 1024) for w in (1, 16, 17, 33, 65, 129)] == [16, 16, 32, 48, 96, 192]
    assert prefill_width(70, 80) == 80 and prefill_width(80, 80) == 80  # never past the cache's columns
    part = StepPart(slots=torch.tensor([5, 2, 7]), tokens=torch.tensor([[1, 2, 3], [4, 5, 0], [6, 0, 0]]),
                    lengths=torch.tensor([3, 2, 1]), start=torch.zeros(3, dtype=torch.long))
    padded = pad_part(part, 4, spare_slot=16, width=16)
    assert padded.tokens.shape == (4, 16) and padded.tokens[:3, :3].tolist() == part.tokens.tolist()
    assert int(padded.tokens[:, 3:].abs().sum()) == 0 and padded.slots.tolist() == [5, 2, 7, 16]
    meta = part_meta(padded)
    assert meta.kv_len == 16 and meta.valid.sum(1).tolist() == [3, 2, 1, 1]
    assert meta.write_index[1].tolist() == list(range(16))  # pads on the row's own later columns
    assert meta.positions[1].tolist() == [0, 1] + [0] * 14
    assert pad_part(part, 3, 16, width=3) is part


def test_a_prompt_slice_with_last_columns_gives_their_logits_only():
    from eet_pipe.models.config import ArchConfig
    from eet_pipe.models.meta import prefill_meta
    from eet_pipe.weights.loader import init_random

    cfg = ArchConfig(model_type="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     intermediate_size=64, max_positions=64)
    model = init_random(cfg, seed=0, dtype=torch.float32, device="cpu")
    ids = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 5:] = mask[2, 2:] = False  # right padded rows of 5 and 2 tokens
    full = model(ids, prefill_meta(mask, torch.arange(3)), model.new_cache(3, 8))
    last = torch.tensor([6, 4, 1])
    picked = model(ids, prefill_meta(mask, torch.arange(3)), model.new_cache(3, 8), last)
    assert picked.shape == (3, 1, 64)
    torch.testing.assert_close(picked[:, 0], full[torch.arange(3), last], rtol=1e-5, atol=1e-6)


def test_uploader_packs_tensors_of_every_dtype_and_reuses_its_buffers():
    from eet_pipe.runtime.upload import Uploader

    up = Uploader("cpu", capacity=256, depth=2, packed=True)
    gen = torch.Generator().manual_seed(0)
    for n in range(7):  # more uploads than buffers: each buffer is reused
        host = [torch.randint(-5, 5, (3 + n,), generator=gen), torch.rand(2, 3, generator=gen),
                torch.rand(5, generator=gen) > 0.5, torch.empty(0, dtype=torch.long), torch.tensor(n, dtype=torch.int64),
                torch.rand(3, generator=gen).to(torch.bfloat16), torch.arange(4, dtype=torch.int32).view(2, 2)]
        moved = up.upload(host)
        for a, b in zip(host, moved, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
            assert b.numel() == 0 or b.data_ptr() != a.data_ptr()
    before = [t.clone() for t in moved]
    up.upload([torch.zeros(8, dtype=torch.long)] * 3)  # later uploads do not change what an earlier one returned
    assert all(torch.equal(a, b) for a, b in zip(before, moved, strict=True))
    big = up.upload([torch.ones(64, dtype=torch.long)])  # 512 bytes > 256: copied directly
    assert up.direct == 1 and torch.equal(big[0], torch.ones(64, dtype=torch.long))
    plain = Uploader("cpu", capacity=256)
    t = torch.arange(3)
    assert plain.upload([t])[0] is t and not plain.buffers
