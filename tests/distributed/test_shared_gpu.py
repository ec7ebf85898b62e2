"""Several stages on one GPU (`allow_duplicate_devices=True`): the links between them run over gloo
through host memory, since NCCL refuses two ranks on one device. Run on a GPU with `pytest -m cuda`."""

from __future__ import annotations

import pytest
import torch

import eet_pipe
from eet_pipe import PipelineEngine
from eet_pipe.generation.sequences import pad_prompts
from eet_pipe.runtime.context import shared_gpu_links

PROMPTS = [[int(t) for t in torch.randint(0, 50000, (n,), generator=torch.Generator().manual_seed(n))]
           for n in (17, 40, 5, 33)]


def test_links_within_one_gpu_are_the_staged_ones():
    assert shared_gpu_links(["cuda:0", "cuda:0"]) == {(0, 1), (1, 0)}
    assert shared_gpu_links(["cuda:0", "cuda:1"]) == set()
    assert shared_gpu_links(["cuda:0", "cuda:1", "cuda:1"]) == {(1, 2)}
    assert shared_gpu_links(["cuda:0", "cuda:1", "cuda:0", "cuda:1"]) == set()  # no adjacent pair shares
    assert shared_gpu_links(["cpu", "cpu"]) == set()  # CPU stages use gloo anyway
    assert shared_gpu_links(["cuda:0"]) == set()


@pytest.mark.cuda
def test_duplicate_gpu_needs_the_flag():
    with pytest.raises(ValueError, match="allow_duplicate_devices=True"):
        PipelineEngine("tiny", devices=["cuda:0", "cuda:0"], plan="even")


@pytest.mark.cuda
@pytest.mark.timeout(600)
@pytest.mark.parametrize("devices", [["cuda:0", "cuda:0"], ["cuda:0", "cuda:0", "cuda:0"]])
def test_stages_sharing_one_gpu_equal_one_stage(devices):
    single = eet_pipe.from_pretrained("gpt2-medium", weights="random", dtype="fp16", device="cuda:0")
    ids, mask = pad_prompts(PROMPTS)
    ref = single.forward(ids, mask)[:, -1].cpu()
    greedy = [r.token_ids for r in single.generate(PROMPTS, max_new_tokens=24, ignore_eos=True)]
    del single
    with PipelineEngine("gpt2-medium", weights="random", dtype="fp16", devices=devices, plan="even",
                        allow_duplicate_devices=True, timeout=60) as engine:
        out = engine.forward(ids, mask, microbatches=1, output="last")
        assert torch.equal(out, ref) or (out.float() - ref.float()).abs().max() < 2e-2
        got = engine.generate(PROMPTS, max_new_tokens=24, ignore_eos=True, microbatches=1)
        assert [r.token_ids for r in got] == greedy  # same batch shapes as the single stage: same tokens
        assert [r.token_ids for r in engine.generate(PROMPTS, max_new_tokens=24, ignore_eos=True,
                                                     microbatches=len(devices))]  # groups in flight run too
