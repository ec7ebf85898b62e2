"""Server steps over spawned CPU workers, without HTTP: tokens fed back from the last stage to stage 0,
two steps in flight per group, and answers equal to `PipelineEngine.generate` (greedy and seeded) for
one stage, three stages, and two stages of two interleaved chunks each (where the feedback shares the
last-to-first link with hidden states); and the same after the graph warm-up's steps have used the slots."""

from __future__ import annotations

import threading

import pytest

from eet_pipe.generation.sequences import SamplingParams
from eet_pipe.options.parse import build_config
from eet_pipe.runtime.engine import PipelineEngine
from eet_pipe.runtime.step_parts import PAD_ENV
from eet_pipe.serving.driver import ServingEngine, resolve_setup, warmup_shapes
from eet_pipe.serving.metrics import Metrics
from eet_pipe.serving.scheduler import Scheduler
from eet_pipe.serving.sequences import GenRequest
from eet_pipe.serving.serve_options import ServeOptions

PROMPTS = ["hello world", "the quick brown fox", "a", "pipeline parallel", "xyz", "ab cd", "once upon a time"]
CASES = [dict(max_new_tokens=8 + i, ignore_eos=True) if i % 2 == 0 else
         dict(max_new_tokens=9, temperature=0.8, top_k=20, top_p=0.9, seed=i, ignore_eos=True)
         for i in range(len(PROMPTS))]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("stages,virtual,warmup", [(1, 1, False), (3, 1, False), (2, 2, False), (3, 1, True)],
                         ids=["P1", "P3", "P2-virtual2", "P3-warmup"])
def test_server_steps_equal_the_engine(stages, virtual, warmup, monkeypatch):
    monkeypatch.setenv(PAD_ENV, "1")  # decode parts padded to batch buckets, as on GPU
    schedule = {"schedule": "interleaved", "virtual": virtual} if virtual > 1 else {}
    opts = build_config(ServeOptions, {"model": "tiny", "weights": "random", "stages": stages, "plan": "even",
                                       "max_slots": 8, "microbatches": 2, **schedule})
    setup = resolve_setup(opts, ["cpu"] * stages)
    driver = ServingEngine(setup, timeout=120, threads=1)
    driver.start()
    if warmup:  # every graphed step shape run twice first (on GPU stages this captures their graphs)
        rows, prompts = warmup_shapes(setup)
        assert driver.warm_up_graphs() == 2 * len(prompts) + 2 * len(rows) + len(set(rows) - {r for r, _ in prompts})
    sched = Scheduler(driver, max_queue=16, max_prefill_tokens=4096, metrics=Metrics())
    sched.thread.start()
    tok = setup.tokenizer
    got, ended = [], []
    try:
        for prompt, case in zip(PROMPTS, CASES, strict=True):
            tokens, done, errors = [], threading.Event(), []

            def sink(event, tokens=tokens, done=done, errors=errors):
                tokens.extend(event.token_ids if event.kind == "token" else [])
                errors.extend([event.message] if event.kind == "error" else [])
                if event.kind in ("done", "error"):
                    done.set()

            sched.submit(GenRequest([tok.encode(prompt)], [SamplingParams(**case)], 1, tok.decode, sink))
            got.append((tokens, errors))
            ended.append(done)
        assert all(done.wait(300) for done in ended)
    finally:
        sched.stop(5.0)
    with PipelineEngine("tiny", weights="random", devices=["cpu"] * stages, plan="even", cpu_threads=1,
                        **schedule) as engine:
        want = [engine.generate([p], **case)[0].token_ids for p, case in zip(PROMPTS, CASES, strict=True)]
    assert [errors for _, errors in got] == [[]] * len(PROMPTS)
    assert [tokens for tokens, _ in got] == want
