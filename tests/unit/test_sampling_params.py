"""SamplingParams.validate: no accepted value can fail inside a stage's sampler."""

from __future__ import annotations

import math

import pytest
import torch

import eet_pipe
from eet_pipe.generation.sequences import SAMPLING_EPS, SEED_MAX, SEED_MIN, Sampler, SamplingParams


@pytest.mark.parametrize("field,value", [
    ("temperature", math.inf), ("temperature", math.nan), ("temperature", -math.inf),
    ("top_p", math.nan), ("top_p", math.inf), ("top_p", -0.0),
    ("seed", SEED_MAX + 1), ("seed", SEED_MIN - 1), ("seed", 1.5), ("seed", True),
    ("max_new_tokens", True), ("top_k", 2.0), ("temperature", "1"),
])
def test_rejects_non_finite_and_out_of_range_values(field, value):
    with pytest.raises(ValueError, match=f"{field}=.* is invalid"):
        SamplingParams(**{field: value})


def test_seed_range_is_what_the_generator_accepts():
    for seed in (SEED_MIN, SEED_MAX, 0):
        torch.Generator().manual_seed(SamplingParams(temperature=1.0, seed=seed).seed)
    with pytest.raises(ValueError, match="must be an integer in -9223372036854775808..18446744073709551615"):
        SamplingParams(seed=2**64)


@pytest.mark.parametrize("temperature", [1e-39, 5e-324, SAMPLING_EPS / 2])
def test_temperature_below_epsilon_is_greedy(temperature):
    params = SamplingParams(temperature=temperature, seed=3)
    assert params.greedy
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.9]])
    assert Sampler([params])(logits).tolist() == [1]
    assert not SamplingParams(temperature=SAMPLING_EPS).greedy


def test_generate_with_tiny_temperature_equals_greedy_and_huge_seed_is_a_clear_error():
    lm = eet_pipe.from_pretrained("tiny")
    greedy = lm.generate("Hello", max_new_tokens=6)[0].token_ids
    assert lm.generate("Hello", max_new_tokens=6, temperature=1e-39)[0].token_ids == greedy
    with pytest.raises(ValueError, match="seed=18446744073709551616 is invalid"):
        lm.generate("Hello", max_new_tokens=2, temperature=0.8, seed=2**64)
