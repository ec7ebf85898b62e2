"""Server steps in process, on one stage. On CPU: inputs packed through the upload buffers (the GPU's path)
give the tokens of inputs passed as they are. On one GPU (`pytest -m cuda`): prompt parts padded to their
buckets and replayed from CUDA graphs give the tokens of the same steps run eagerly, and a step never waits
for GPU work queued before it (its inputs travel through page-locked buffers)."""

from __future__ import annotations

import gc
import time

import pytest
import torch

from eet_pipe.generation.sequences import SamplingParams
from eet_pipe.loading.presets import resolve_model
from eet_pipe.runtime.context import StageContext
from eet_pipe.runtime.stage import Stage
from eet_pipe.runtime.step import ServeState
from eet_pipe.runtime.step_parts import PAD_ENV, SeqInit, ServeInit, StepCommand, StepPart, step_rows
from eet_pipe.runtime.upload import Uploader

MAX_SLOTS, MAX_LEN = 16, 96


@pytest.fixture(autouse=True)
def _release_graphs():
    """Captured graphs, their memory pools and page-locked buffers go before the next test (of any file)."""
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _stage(head_apart: bool = False, device: str = "cuda:0") -> Stage:
    """GPT-2 (the tiny model on CPU) as one stage: one chunk, or two with the head alone in the second (a chunk
    without layers, hence without a KV cache)."""
    spec = resolve_model("gpt2" if device != "cpu" else "tiny", weights="random")
    ctx = StageContext(rank=0, world=1, device=torch.device(device), backend="nccl" if device != "cpu" else "gloo")
    units = spec.cfg.unit_names()
    dtype = torch.float16 if device != "cpu" else torch.float32
    return Stage(ctx, spec, [units[:-1], units[-1:]] if head_apart else [units], dtype)


class _Script:
    """A deterministic serving workload: each step admits a few prompts (lengths cycling through a list,
    some past 16 tokens), decodes every running slot, and frees a slot once it has run `life` steps."""

    def __init__(self, vocab: int, life: int = 5, seed: int = 0) -> None:
        self.vocab, self.gen = vocab, torch.Generator().manual_seed(seed)
        self.life, self.step = life, 0
        self.running: dict[int, list[int]] = {}  # slot -> [next column, steps run]
        self.free_slots = list(range(MAX_SLOTS))

    def next(self) -> StepCommand:
        self.step += 1
        done = [s for s, (_, age) in self.running.items() if age >= self.life]
        for s in done:
            del self.running[s]
        self.free_slots = sorted(self.free_slots + done)
        parts = []
        if self.running:
            slots = sorted(self.running)
            parts.append(StepPart(slots=torch.tensor(slots), tokens=None, lengths=torch.ones(len(slots), dtype=torch.long),
                                  start=torch.tensor([self.running[s][0] for s in slots])))
        admit = min((3, 3, 2, 5)[self.step % 4], len(self.free_slots))
        new = {}
        if admit:
            lengths = [(3, 9, 14, 5, 30, 2, 11)[(self.step + i) % 7] for i in range(admit)]
            slots = [self.free_slots.pop(0) for _ in range(admit)]
            tokens = torch.zeros(admit, max(lengths), dtype=torch.long)
            for row, n in enumerate(lengths):
                tokens[row, :n] = torch.randint(0, self.vocab, (n,), generator=self.gen)
            parts.append(StepPart(slots=torch.tensor(slots), tokens=tokens, lengths=torch.tensor(lengths),
                                  start=torch.zeros(admit, dtype=torch.long)))
            for s, n in zip(slots, lengths, strict=True):
                self.running[s] = [n - 1, -1]  # the prompt's step counts as its first
                params = SamplingParams(max_new_tokens=64, ignore_eos=True) if s % 2 == 0 else \
                    SamplingParams(max_new_tokens=64, ignore_eos=True, temperature=0.9, top_k=40, seed=s)
                new[s] = SeqInit(params, logprobs=2 if s % 3 == 0 else None)
        for s in self.running:
            self.running[s][0] += 1
            self.running[s][1] += 1
        return StepCommand(group=0, parts=parts, new=new, free=done, step=self.step)


def _run(state: ServeState, steps: int, block: bool = False) -> list[dict]:
    """Payloads of `steps` steps of the script. The script frees a slot after a fixed number of steps,
    not after its token arrived, and a token resolved after its slot was freed is dropped (as a cancelled
    sequence's): only `block`, resolving every step before the next, makes runs of different speeds
    comparable on a GPU."""
    script, out = _Script(state.stage.spec.cfg.vocab_size), []
    for _ in range(steps):
        state.step(script.next())
        out += state.results(block=block)
    return out + state.results(block=True)


@torch.inference_mode()
def test_inputs_packed_through_upload_buffers_give_the_same_tokens_cpu(monkeypatch):
    monkeypatch.setenv(PAD_ENV, "1")
    stage = _stage(device="cpu")
    plain = _run(ServeState(stage, ServeInit(MAX_SLOTS, MAX_LEN)), 24)
    state = ServeState(stage, ServeInit(MAX_SLOTS, MAX_LEN))
    state.uploader = Uploader("cpu", 4096, depth=3, packed=True)  # every step wraps the buffers around
    state.sampler.table.upload = state.uploader.upload
    packed = _run(state, 24)
    assert [p["tokens"] for p in packed] == [p["tokens"] for p in plain] and state.uploader.direct == 0
    assert [p["logprobs"] for p in packed] == [p["logprobs"] for p in plain]
    assert sum(len(p["tokens"]) for p in plain) > 100 and not any(p["errors"] for p in plain)


@torch.inference_mode()
def test_decode_parts_past_the_largest_bucket_padded_to_128_rows_give_the_same_tokens_cpu(monkeypatch):
    """300 sequences decode as one part: padded (to 384 rows, a graph per 128 rows on GPU) and not padded,
    the same tokens and log-probabilities."""
    assert [step_rows(r) for r in (1, 3, 200, 256, 257, 300, 384, 385)] == [1, 4, 256, 256, 384, 384, 384, 512]
    stage, rows, gen = _stage(device="cpu"), 300, torch.Generator().manual_seed(3)
    prompts = torch.randint(0, stage.spec.cfg.vocab_size, (rows, 4), generator=gen)
    slots = torch.arange(rows)
    new = {s: SeqInit(SamplingParams(max_new_tokens=8, ignore_eos=True), logprobs=1 if s % 7 == 0 else None)
           for s in range(rows)}

    seen = []  # the rows of every forward the stage runs
    forward = stage.run_chunk
    monkeypatch.setattr(stage, "run_chunk", lambda c, x, *a, **k: seen.append(x.shape[0]) or forward(c, x, *a, **k))

    def run(pad: str) -> list[dict]:
        monkeypatch.setenv(PAD_ENV, pad)
        seen.clear()
        state = ServeState(stage, ServeInit(rows, MAX_LEN))
        state.step(StepCommand(group=0, parts=[StepPart(slots=slots, tokens=prompts, lengths=torch.full((rows,), 4),
                                                        start=torch.zeros(rows, dtype=torch.long))],
                               new=new, free=[], step=1))
        for step in range(2, 5):
            part = StepPart(slots=slots, tokens=None, lengths=torch.ones(rows, dtype=torch.long),
                            start=torch.full((rows,), step + 2))  # after the 4 prompt columns
            state.step(StepCommand(group=0, parts=[part], new={}, free=[], step=step))
        return state.results(block=True)

    padded = run("1")
    assert seen == [rows, 384, 384, 384]  # the prompt part (300 x 16 tokens) is past the graphed size
    plain = run("0")
    assert seen == [rows] * 4
    assert [p["tokens"] for p in padded] == [p["tokens"] for p in plain]
    assert [p["logprobs"] for p in padded] == [p["logprobs"] for p in plain]
    assert sum(len(p["tokens"]) for p in plain) == 4 * rows and not any(p["errors"] for p in plain)


@pytest.mark.parametrize("head_apart", [False, True], ids=["one-chunk", "head-chunk"])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.inference_mode()
def test_prompt_parts_replayed_from_graphs_equal_the_same_parts_run_eagerly(head_apart, monkeypatch):
    stage = _stage(head_apart)
    graphed = _run(ServeState(stage, ServeInit(MAX_SLOTS, MAX_LEN, cuda_graphs=True)), 24, block=True)
    keys = [k for k in stage._graphs._graphs if k[0] == "prefill"]
    assert stage._graphs.replays > 0 and keys, "no prompt part was replayed from a graph"
    assert {k[2][0] for k in keys} <= {1, 2, 4, 8, 16} and {k[2][1] for k in keys} <= {16, 32, 48}
    monkeypatch.setenv(PAD_ENV, "1")  # the same padded shapes, eagerly
    eager = _run(ServeState(stage, ServeInit(MAX_SLOTS, MAX_LEN, cuda_graphs=False)), 24, block=True)
    assert [p["tokens"] for p in graphed] == [p["tokens"] for p in eager]
    assert [p["logprobs"] for p in graphed] == [p["logprobs"] for p in eager]
    assert sum(len(p["tokens"]) for p in graphed) > 100 and not any(p["errors"] for p in graphed)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.inference_mode()
def test_a_step_does_not_wait_for_gpu_work_queued_before_it():
    stage = _stage()
    state = ServeState(stage, ServeInit(MAX_SLOTS, MAX_LEN, cuda_graphs=True))
    script = _Script(stage.spec.cfg.vocab_size)
    for _ in range(12):  # graphs captured, page-locked buffers in use
        state.step(script.next())
    state.results(block=True)
    torch.cuda.synchronize()
    cmd = script.next()
    assert cmd.new and cmd.free and len(cmd.parts) == 2
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time queued on the current stream
    began = time.perf_counter()
    state.step(cmd)
    host_s = time.perf_counter() - began
    assert host_s < 0.2, f"the step waited {host_s:.2f} s for queued GPU work"
    torch.cuda.synchronize()
    assert state.results(block=True)[0]["tokens"]
