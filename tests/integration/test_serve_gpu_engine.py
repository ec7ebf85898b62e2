"""Server steps on a GPU (run on a GPU machine with `pytest -m cuda`): device sampling without host
syncs, and a one-GPU server whose greedy and seeded answers equal `PipelineEngine.generate`'s."""

from __future__ import annotations

import signal

import httpx
import pytest
import torch

from eet_pipe.generation.sampling import SamplingTable
from eet_pipe.generation.sequences import Sampler, SamplingParams
from eet_pipe.serving.process import ServerProcess

pytestmark = pytest.mark.cuda


def test_device_sampling_equals_cpu_sampling_and_never_syncs():
    torch.manual_seed(0)
    logits = torch.randn(64, 50257) * 3
    params = [SamplingParams(temperature=0.5 + (i % 5) / 4, top_k=(0, 50, 1)[i % 3], top_p=(1.0, 0.9)[i % 2],
                             seed=1000 + i) for i in range(48)] + [SamplingParams()] * 16
    cpu, gpu = Sampler(params), Sampler(params)
    on_gpu = logits.cuda()
    gpu(on_gpu)  # first call: the table's copies to the device
    cpu(logits)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = [gpu(on_gpu) for _ in range(4)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = [cpu(logits) for _ in range(4)]
    same = sum(int((g.cpu() == w).sum()) for g, w in zip(got, want, strict=True))
    assert same >= 0.98 * 4 * 64  # float rounding of log() may flip a near tie, nothing more
    assert all(torch.equal(g.cpu()[48:], logits.argmax(-1)[48:]) for g in got)


def test_non_finite_logits_on_the_device():
    table = SamplingTable(4, "cuda")
    table.set([0, 1, 2, 3], [SamplingParams(temperature=t, top_p=0.9, top_k=3, seed=1) for t in (1e-39, 0.7, 1.0, 2.0)])
    logits = torch.randn(4, 1000, device="cuda")
    logits[1] = float("nan")
    logits[2, 5] = float("inf")
    logits[3] = float("-inf")
    tokens = table.sample(logits, torch.arange(4, device="cuda"), [0, 1, 2, 3]).tolist()
    assert tokens[0] == int(logits[0].argmax()) and tokens[2] == 5 and all(0 <= t < 1000 for t in tokens)


@pytest.mark.timeout(900)
def test_one_gpu_server_equals_the_engine_greedy_and_seeded():
    from eet_pipe.runtime.engine import PipelineEngine

    prompts = [f"Request {i}: " + "lorem ipsum dolor sit amet " * (1 + i % 4) for i in range(12)]
    with PipelineEngine("gpt2", devices=["cuda:0"], weights="random", dtype="fp16", plan="even") as engine:
        greedy = [engine.generate([p], max_new_tokens=16, ignore_eos=True)[0].token_ids for p in prompts[:4]]
        seeded = engine.generate([prompts[1]], max_new_tokens=16, ignore_eos=True, temperature=0.8, top_k=50,
                                 top_p=0.95, seed=7)[0].token_ids
    torch.cuda.empty_cache()
    args = ["model=gpt2", "weights=random", "dtype=fp16", "devices=cuda:0", "plan=even", "max_slots=16",
            "timeout=60", "log_level=warning"]
    server = ServerProcess(args).start()
    try:
        server.wait_ready(600)
        with httpx.Client(base_url=server.url, timeout=120) as client:
            def ask(**body) -> list[int]:
                r = client.post("/v1/completions", json={"max_tokens": 16, "ignore_eos": True,
                                                         "return_token_ids": True, **body})
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["token_ids"]

            assert [ask(prompt=p, temperature=0) for p in prompts[:4]] == greedy
            assert ask(prompt=prompts[1], temperature=0.8, top_k=50, top_p=0.95, seed=7) == seeded
            for body in ({"temperature": 1e-39}, {"temperature": 0.8, "seed": 2**64 - 1}):
                r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, **body})
                assert r.status_code in (200, 400), r.text
            assert ask(prompt=prompts[0], temperature=0) == greedy[0]  # still serving
            metrics = client.get("/metrics").text
            assert 'eet_pipe_stage_busy_fraction{stage="0"}' in metrics
            assert "eet_pipe_step_host_seconds_count" in metrics
    finally:
        assert server.stop(signal.SIGTERM) == 0, server.log()
