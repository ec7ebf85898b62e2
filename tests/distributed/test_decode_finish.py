"""Pipelined decoding when groups finish at different steps (EOS, stop strings, length), greedy
(tokens read one step late on the last stage) and sampled (read at once)."""

from __future__ import annotations

import pytest

import eet_pipe
from eet_pipe.runtime import PipelineEngine

PROMPTS = ["the quick brown", "a", "hello there", "xyz", "pipeline"]


@pytest.fixture(scope="module", params=[(2, "gpipe"), (3, "gpipe"), (2, "interleaved")],
                ids=["P2", "P3", "P2-virtual2"])
def pair(request):
    stages, schedule = request.param
    single = eet_pipe.from_pretrained("tiny")
    engine = PipelineEngine("tiny", devices=["cpu"] * stages, schedule=schedule, virtual=2, plan="even",
                            timeout=120)
    yield single, engine
    engine.close()


def _run(gen, **kw):
    return [(r.token_ids, r.finish_reason, r.text) for r in gen(PROMPTS, **kw)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("groups", [1, 2, 3])
def test_groups_finishing_early_give_the_single_device_result(pair, groups):
    single, engine = pair
    free = single.generate(PROMPTS, max_new_tokens=16, ignore_eos=True)
    eos = free[0].token_ids[3]  # prompt 0 meets it as its 4th token; others at other steps or never
    stop = single.tokenizer.decode(free[2].token_ids[5:7])
    saved = (single.cfg.eos_token_id, engine.cfg.eos_token_id)
    single.cfg.eos_token_id = engine.cfg.eos_token_id = eos
    try:
        want = _run(single.generate, max_new_tokens=16, stop=[stop])
        got = _run(lambda p, **kw: engine.generate(p, microbatches=groups, **kw), max_new_tokens=16, stop=[stop])
        assert got == want
        assert want[0][1] == "stop" and len(want[0][0]) <= 3  # really finished early
        sampled = dict(max_new_tokens=10, temperature=0.9, top_k=20, seed=7, stop=[stop])
        assert _run(lambda p, **kw: engine.generate(p, microbatches=groups, **kw), **sampled) == \
            _run(single.generate, **sampled)
    finally:
        single.cfg.eos_token_id, engine.cfg.eos_token_id = saved
