"""Device sampling: counter-based seeds, per-row parameters, non-finite logits, and per-slot errors."""

from __future__ import annotations

import math

import pytest
import torch

from eet_pipe.generation.sampling import LOGPROB_FLOOR, TOP_K_CAP, SamplingTable, mix64, top_logprobs
from eet_pipe.generation.sequences import Sampler, SamplingParams


def _splitmix_final(x: int) -> int:
    m = (1 << 64) - 1
    x &= m
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & m
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def test_mix64_is_splitmix64_with_wrapping_int64():
    values = [0, 1, 7, 2**63 - 1, -1, -(2**63), 123456789123456789]
    got = mix64(torch.tensor(values, dtype=torch.long)).tolist()
    assert [g & ((1 << 64) - 1) for g in got] == [_splitmix_final(v) for v in values]


def test_a_seeded_row_draws_the_same_tokens_in_any_batch_position():
    logits = torch.randn(3, 40)
    p = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=11)
    alone = Sampler([p])
    mixed = Sampler([SamplingParams(temperature=1.3, seed=5), SamplingParams(), p])
    for _ in range(8):
        assert int(alone(logits[2:3])) == int(mixed(logits)[2])


def test_samples_follow_softmax_of_logits_over_temperature():
    logits = torch.tensor([[1.0, 2.0, 0.0, 3.0]])
    sampler = Sampler([SamplingParams(temperature=2.0, seed=3)])
    draws = torch.stack([sampler(logits) for _ in range(4000)]).view(-1)
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    want = (logits[0] / 2.0).softmax(-1).double()
    assert torch.allclose(freq, want, atol=0.03), (freq, want)


def test_per_row_top_k_and_top_p_in_one_batch():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9, 4.8]] * 3)
    sampler = Sampler([SamplingParams(temperature=5.0, top_k=2, seed=1), SamplingParams(temperature=5.0, top_p=0.3,
                                                                                        seed=2), SamplingParams()])
    seen = [set(), set(), set()]
    for _ in range(200):
        for row, tok in enumerate(sampler(logits).tolist()):
            seen[row].add(tok)
    assert seen == [{1, 3}, {1, 3}, {1}]  # top-2; the nucleus of p(1) = 0.27 < 0.3 adds token 3; greedy


@pytest.mark.parametrize("temperature", [1e-39, 1e-7, 0.0])
def test_tiny_temperatures_are_greedy(temperature):
    logits = torch.randn(4, 30)
    got = Sampler([SamplingParams(temperature=0.0)] * 4)(logits)
    tiny = Sampler([SamplingParams(temperature=temperature, seed=s) for s in range(4)])(logits)
    assert tiny.tolist() == got.tolist() == logits.argmax(-1).tolist()


def test_non_finite_logits_never_raise():
    v = 16
    logits = torch.randn(5, v)
    logits[0, 3] = float("nan")
    logits[1] = float("nan")
    logits[2, 7] = float("inf")
    logits[3] = float("-inf")
    logits[4, :] = float("inf")
    params = [SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=s) for s in range(5)]
    tokens = Sampler(params)(logits)
    assert tokens.shape == (5,) and all(0 <= t < v for t in tokens.tolist())
    assert int(tokens[2]) == 7  # +inf is the only candidate
    chosen, ids, values = top_logprobs(logits, tokens, 3)
    assert all(math.isfinite(x) and x >= LOGPROB_FLOOR for x in [*chosen.tolist(), *values.view(-1).tolist()])


def test_seeds_are_taken_modulo_2_64_within_the_accepted_range():
    """SamplingParams accepts what torch.Generator.manual_seed accepts (-2**63 .. 2**64 - 1); the sampler
    reads a seed modulo 2**64, so -1 and 2**64 - 1 are one seed, and a larger one is refused up front."""
    logits = torch.randn(1, 50)
    a = Sampler([SamplingParams(temperature=1.0, seed=-1)])
    b = Sampler([SamplingParams(temperature=1.0, seed=2**64 - 1)])
    assert [int(a(logits)) for _ in range(5)] == [int(b(logits)) for _ in range(5)]
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(temperature=1.0, seed=2**64 + 5)


def test_table_counters_advance_per_sampled_row_only():
    table = SamplingTable(4, "cpu")
    table.set([1, 3], [SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=1.0, seed=2)])
    logits = torch.randn(2, 10)
    table.sample(logits, torch.tensor([1, 3]), [1, 3])
    table.sample(logits[:1], torch.tensor([3]), [3])
    assert table.counters.tolist() == [0, 1, 0, 2]
    table.set([3], [SamplingParams(temperature=1.0, seed=2)])
    assert table.counters.tolist() == [0, 1, 0, 0]


def test_slot_sampler_fails_one_slot_and_keeps_the_others():
    from eet_pipe.runtime.slot_sampler import SlotSampler, new_payload
    from eet_pipe.runtime.step_parts import SeqInit

    def decode(ids):
        if 13 in ids:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "broken")
        return "".join(chr(65 + i % 26) for i in ids)

    sampler = SlotSampler(decode)
    sampler.start({0: SeqInit(SamplingParams(max_new_tokens=4, stop=["zz"])),
                   1: SeqInit(SamplingParams(max_new_tokens=4, stop=["zz"]))})
    logits = torch.zeros(2, 20)
    logits[0, 13] = 1.0  # slot 0 samples the token its decoder cannot read
    logits[1, 2] = 1.0
    out = new_payload(0, 1)
    sampler.sample(logits, [0, 1], out)
    assert list(out["errors"]) == [0] and len(out["errors"][0]) == 12
    assert out["tokens"] == {1: 2} and 0 not in sampler.slots and 1 in sampler.slots


def test_a_step_is_ready_only_when_its_last_copy_landed():
    from eet_pipe.runtime.slot_sampler import SlotSampler, new_payload
    from eet_pipe.runtime.step_parts import SeqInit

    class Event:  # a device copy's end, as torch.cuda.Event.query reports it
        def __init__(self, landed: bool) -> None:
            self.landed = landed

        def query(self) -> bool:
            return self.landed

        def synchronize(self) -> None:
            self.landed = True

    sampler = SlotSampler(None)
    sampler.start({0: SeqInit(SamplingParams(max_new_tokens=4)), 1: SeqInit(SamplingParams(max_new_tokens=4), logprobs=2)})
    logits = torch.zeros(2, 20)
    logits[0, 3] = logits[1, 5] = 1.0
    _, pending = sampler.sample_async(logits, [0, 1])
    assert pending.ready()  # CPU copies are done when made
    pending.tokens.event = Event(landed=True)
    for copy in pending.logprobs:
        copy.event = Event(landed=False)
    assert not pending.ready()  # the tokens landed, the log-probabilities (copied after them) did not
    for copy in pending.logprobs:
        copy.event.landed = True
    assert pending.ready()
    out = new_payload(0, 1)
    sampler.resolve(pending, out)
    assert out["tokens"] == {0: 3, 1: 5} and list(out["logprobs"]) == [1]


def test_a_top_k_beyond_int64_keeps_every_token():
    """Any top_k is accepted (one above the vocabulary means no limit); the table stores a capped value, so 2**64
    samples what a top_k of the vocabulary size samples with the same seed."""
    logits = torch.randn(1, 40).repeat(2, 1)
    table = SamplingTable(2, "cpu")
    table.set([0, 1], [SamplingParams(temperature=1.0, top_k=2**64, seed=3),
                       SamplingParams(temperature=1.0, top_k=40, seed=3)])
    assert table.top_k.tolist() == [TOP_K_CAP, 40]
    for _ in range(20):
        a, b = table.sample(logits, torch.tensor([0, 1]), [0, 1]).tolist()
        assert a == b
