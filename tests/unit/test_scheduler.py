"""The scheduler on a fake pipeline, in one process: no workers, no HTTP.

`FakePipeline` executes each command as the stages would (per-slot cache rows, inputs of decode parts
from the fed-back tokens, the real `SlotSampler` for stopping) and hands results out in order, one
step late if asked, behind a gate the test controls. Its "model" picks a token from the slot's whole
cache row, so a stale row (a slot reused without being cleared) or a wrong cache column changes the
output or trips its checks.
"""

from __future__ import annotations

import queue
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from eet_pipe.generation.sequences import SamplingParams
from eet_pipe.runtime.slot_sampler import SlotSampler, new_payload
from eet_pipe.runtime.step_parts import ServeInit, StepCommand, prefill_width, step_rows
from eet_pipe.runtime.supervisor import WorkerError
from eet_pipe.serving.driver import StepDriver
from eet_pipe.serving.metrics import Metrics
from eet_pipe.serving.scheduler import QueueFullError, Scheduler, ServiceUnavailableError
from eet_pipe.serving.sequences import GenRequest

VOCAB = 50
EOS = 49


def next_token(row: list[int]) -> int:
    """The fake model: the next token of a cache row (never EOS unless the row's sum says so)."""
    return (sum(row) * 31 + len(row)) % VOCAB


def reference(prompt: list[int], n: int, eos: bool = True) -> list[int]:
    row, out = list(prompt), []
    for _ in range(n):
        tok = next_token(row)
        if eos and tok == EOS:
            break
        out.append(tok)
        row.append(tok)
    return out


def decode(ids: list[int]) -> str:
    return "".join(chr(97 + i % 26) for i in ids)


def stage_decode(ids: list[int]) -> str:
    """The last stage's decoder, which fails on one token (a per-sequence error inside a stage)."""
    if 13 in ids:
        raise ValueError("token 13 cannot be decoded")
    return decode(ids)


class FakePipeline(StepDriver):
    def __init__(self, slots: int = 4, groups: int = 2, fail_at: int | None = None) -> None:
        super().__init__()
        self.setup = SimpleNamespace(groups=groups, max_slots=slots, eos_ids=[EOS])
        self.rows: dict[int, list[int]] = {}
        self.fed: dict[int, int] = {}
        self.sampler = SlotSampler(stage_decode)
        self.results: queue.Queue = queue.Queue()
        self.gate = threading.Event()
        """Cleared: results are held (the steps stay in flight)."""
        self.gate.set()
        self.fail_at, self.closed, self.problems = fail_at, False, []
        self.sent = 0

    def start(self) -> None:
        pass

    def send(self, cmd: StepCommand | ServeInit) -> None:
        if self.closed:
            raise WorkerError("closed")
        self.sent += 1
        for slot in [*cmd.free, *cmd.new]:
            self.rows[slot] = []
        self.sampler.drop([*cmd.free, *cmd.new])
        self.sampler.start(cmd.new)
        slots, logits = [], []
        for part in cmd.parts:
            for r, slot in enumerate(part.slots.tolist()):
                row = self.rows.setdefault(slot, [])
                start = int(part.start[r])
                if start != len(row):
                    self.problems.append(f"step {cmd.step}: slot {slot} writes column {start}, holds {len(row)}")
                if part.tokens is None:
                    row.append(self.fed[slot])
                else:
                    row.extend(part.tokens[r, : int(part.lengths[r])].tolist())
                one_hot = torch.zeros(VOCAB)
                one_hot[next_token(row)] = 1.0
                slots.append(slot)
                logits.append(one_hot)
        tokens, pending = self.sampler.sample_async(torch.stack(logits), slots)
        for slot, tok in zip(slots, tokens.tolist(), strict=True):
            self.fed[slot] = tok
        payload = new_payload(cmd.group, cmd.step)
        self.sampler.resolve(pending, payload)
        self.results.put(payload)

    def collect(self) -> dict:
        self.gate.wait()
        if self.fail_at is not None and self.sent >= self.fail_at:
            self.closed = True
            raise WorkerError("stage 1 (cpu) failed: injected")
        return self.results.get(timeout=10)

    def check_alive(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class Client:
    """A request's sink: every event, with a flag when it ended."""

    def __init__(self) -> None:
        self.events, self.ended = [], threading.Event()

    def __call__(self, event) -> None:
        self.events.append(event)
        if event.kind in ("done", "error"):
            self.ended.set()

    def tokens(self, index: int = 0) -> list[int]:
        return [t for e in self.events if e.kind == "token" and e.index == index for t in e.token_ids]

    @property
    def error(self):
        return next((e for e in self.events if e.kind == "error"), None)


def request(prompt: list[int], max_tokens: int, n: int = 1, stop: list[str] | None = None) -> tuple[GenRequest, Client]:
    client = Client()
    params = [SamplingParams(max_new_tokens=max_tokens, stop=stop or []) for _ in range(n)]
    return GenRequest([prompt], params, n, decode, client), client


def scheduler(driver: FakePipeline, max_queue: int = 8, start: bool = True) -> Scheduler:
    sched = Scheduler(driver, max_queue=max_queue, max_prefill_tokens=4096, metrics=Metrics())
    if start:
        sched.thread.start()
    return sched


def wait_for(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


PROMPTS = [[1, 2, 3], [4, 5], [7], [8, 9, 10, 11]]


def test_outputs_equal_step_by_step_decoding_with_slots_reused_after_finish():
    driver = FakePipeline(slots=2, groups=2)
    sched = scheduler(driver)
    clients = []
    for k in range(8):
        req, client = request(PROMPTS[k % 4], max_tokens=3 + k)
        sched.submit(req)
        clients.append((PROMPTS[k % 4], 3 + k, client))
    for prompt, n, client in clients:
        assert client.ended.wait(10)
        assert client.error is None and client.tokens() == reference(prompt, n)
    sched.stop(1.0)
    assert driver.problems == [] and sched.free_total == 2 and sched.queued == 0
    text = sched.metrics.render()
    steps = int(next(x for x in text.splitlines() if x.startswith("eet_pipe_steps_total ")).split()[1])
    assert f"eet_pipe_step_host_seconds_count {steps}" in text and steps > 0  # host time of every step


def test_cancel_while_a_step_is_in_flight_frees_the_slot_for_the_next_request():
    driver = FakePipeline(slots=1, groups=1)
    sched = scheduler(driver)
    req, client = request([1, 2], max_tokens=10**6)
    sched.submit(req)
    wait_for(lambda: len(client.tokens()) >= 3)
    driver.gate.clear()  # hold every later result: the next steps stay in flight
    time.sleep(0.05)
    wait_for(lambda: len(sched.inflight[0]) == 2 and driver.results.qsize() > 0)
    seen = len(client.events)
    sched.cancel(req)
    time.sleep(0.05)
    driver.gate.set()
    wait_for(lambda: sched.free_total == 1)
    assert len(client.events) == seen  # nothing reaches a cancelled request
    after, other = request([4, 5, 6], max_tokens=6)
    sched.submit(after)
    assert other.ended.wait(10) and other.tokens() == reference([4, 5, 6], 6)
    sched.stop(1.0)
    assert driver.problems == []


def test_queue_limit_counts_sequences_and_recovers():
    driver = FakePipeline(slots=1, groups=1)
    sched = scheduler(driver, max_queue=1, start=False)
    first, c1 = request([1], max_tokens=2)
    second, c2 = request([2], max_tokens=2)
    sched.submit(first)
    sched.submit(second)  # one slot + one place in the queue
    with pytest.raises(QueueFullError, match="max_queue=1"):
        sched.submit(request([3], max_tokens=2)[0])
    with pytest.raises(QueueFullError):
        sched.submit(request([3], max_tokens=2, n=3)[0])
    sched.thread.start()
    assert c1.ended.wait(10) and c2.ended.wait(10)
    wait_for(lambda: sched.queued == 0 and sched.free_total == 1)
    third, c3 = request([3], max_tokens=2, n=2)
    sched.submit(third)
    assert c3.ended.wait(10) and c3.tokens(0) == c3.tokens(1) == reference([3], 2)
    sched.stop(1.0)


def test_drain_expiry_ends_running_requests_with_503_and_closes_the_pipeline():
    driver = FakePipeline(slots=1, groups=1)
    sched = scheduler(driver)
    req, client = request([1, 2], max_tokens=10**6)
    queued, waiting = request([3], max_tokens=4)
    sched.submit(req)
    sched.submit(queued)
    wait_for(lambda: len(client.tokens()) >= 2)
    began = time.monotonic()
    sched.stop(0.2)
    assert time.monotonic() - began < 5 and not sched.thread.is_alive() and driver.closed
    assert client.error.status == 503 and waiting.error.status == 503
    with pytest.raises(ServiceUnavailableError):
        sched.submit(request([1], max_tokens=2)[0])


def test_a_worker_error_fails_every_request_with_503_and_later_ones_too():
    driver = FakePipeline(slots=2, groups=2, fail_at=6)
    sched = scheduler(driver)
    failures = []
    sched.on_failure = failures.append
    clients = []
    for prompt in PROMPTS[1:]:  # none of them meets EOS
        req, client = request(prompt, max_tokens=50)
        sched.submit(req)
        clients.append(client)
    for client in clients:
        assert client.ended.wait(10)
        assert client.error.status == 503 and "stage 1 (cpu) failed" in client.error.message
    assert failures and driver.closed
    with pytest.raises(ServiceUnavailableError, match="stage 1"):
        sched.submit(request([1], max_tokens=2)[0])


def test_a_per_sequence_error_fails_that_request_only():
    bad_prompt = next(p for p in ([i, j] for i in range(VOCAB) for j in range(VOCAB)) if reference(p, 2)[1:2] == [13]
                      and 13 not in reference(p, 1))
    driver = FakePipeline(slots=4, groups=2)
    sched = scheduler(driver)
    bad, bad_client = request(bad_prompt, max_tokens=8, n=2, stop=["zzz"])  # stop strings make the stage decode
    good, good_client = request([4, 5], max_tokens=12, stop=["zzz"])
    sched.submit(bad)
    sched.submit(good)
    assert bad_client.ended.wait(10) and good_client.ended.wait(10)
    error = bad_client.error
    assert error.status == 500 and error.error_id and error.error_id in error.message
    assert "Traceback" not in error.message and "token 13" not in error.message
    assert good_client.error is None and good_client.tokens() == reference([4, 5], 12)
    wait_for(lambda: sched.free_total == 4)
    after, client = request([6], max_tokens=5)
    sched.submit(after)
    assert client.ended.wait(10) and client.tokens() == reference([6], 5)
    sched.stop(1.0)
    assert driver.problems == []


class AdmissionLog(FakePipeline):
    """Records when each command admitted sequences, and how many."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.admissions: list[tuple[float, int]] = []

    def send(self, cmd) -> None:
        if cmd.new:
            self.admissions.append((time.monotonic(), len(cmd.new)))
        super().send(cmd)


def long_request() -> tuple[GenRequest, Client]:
    client = Client()
    params = [SamplingParams(max_new_tokens=10**6, ignore_eos=True)]
    return GenRequest([[1, 2]], params, 1, decode, client), client


def test_prefill_wait_holds_a_partial_admission_while_the_pipeline_decodes_and_admits_full_parts_at_once():
    driver = AdmissionLog(slots=4, groups=1)
    sched = Scheduler(driver, max_queue=8, max_prefill_tokens=4096, metrics=Metrics(), prefill_wait=0.5)
    sched.thread.start()
    idle_began = time.monotonic()
    long, long_client = long_request()
    sched.submit(long)  # an idle pipeline admits at once
    wait_for(lambda: len(long_client.tokens()) >= 2)
    assert driver.admissions[0][0] - idle_began < 0.4
    partial_began = time.monotonic()
    short, short_client = request([4, 5], max_tokens=3)
    sched.submit(short)  # 1 of 3 free slots while the long request decodes: waits prefill_wait
    assert short_client.ended.wait(10) and short_client.tokens() == reference([4, 5], 3)
    assert driver.admissions[1][1] == 1 and driver.admissions[1][0] - partial_began >= 0.5
    wait_for(lambda: sched.free_total == 3)
    full_began = time.monotonic()
    full, full_client = request([7, 8], max_tokens=4, n=3)  # three sequences fill the group's free slots
    sched.submit(full)
    assert full_client.ended.wait(10)
    assert [full_client.tokens(k) for k in range(3)] == [reference([7, 8], 4)] * 3
    assert driver.admissions[2][1] == 3 and driver.admissions[2][0] - full_began < 0.4
    sched.cancel(long)
    sched.stop(1.0)
    assert driver.problems == [] and long_client.error is None


def test_prefill_wait_admits_at_once_a_prompt_no_other_could_join_and_everything_when_stopping():
    driver = AdmissionLog(slots=4, groups=1)
    sched = Scheduler(driver, max_queue=8, max_prefill_tokens=8, metrics=Metrics(), prefill_wait=5.0)
    sched.thread.start()
    long, long_client = long_request()
    sched.submit(long)
    wait_for(lambda: len(long_client.tokens()) >= 2)
    wide_began = time.monotonic()
    wide, wide_client = request([1, 2, 3, 4, 5, 6], max_tokens=3)  # 2 x 6 > 8 tokens: nothing can join it
    sched.submit(wide)
    assert wide_client.ended.wait(10) and wide_client.tokens() == reference([1, 2, 3, 4, 5, 6], 3)
    assert driver.admissions[1][0] - wide_began < 2.0
    wait_for(lambda: sched.free_total == 3)
    short, short_client = request([4, 5], max_tokens=3)  # a partial part: held back while the long one decodes
    sched.submit(short)
    wait_for(lambda: sched.queued == 1 and len(sched.waiting) == 1)
    threading.Thread(target=sched.stop, args=(1.0,), daemon=True).start()
    assert short_client.ended.wait(10)  # a stopping server admits at once: the drain finishes it
    assert short_client.error is None and short_client.tokens() == reference([4, 5], 3)
    assert long_client.ended.wait(10) and long_client.error.status == 503  # the drain deadline ends it


def gpu_padding(rows: int, width: int) -> tuple[int, int]:
    """How a GPU stage that graphs every part pads a prompt part (row and width buckets, 512 cache columns)."""
    return step_rows(rows), prefill_width(width, 512)


@pytest.mark.parametrize(("prompt_len", "n", "parts"), [
    (150, 5, [4, 1]),  # 192 wide once padded: 5 rows run as 8 would pad 3 x 192 = 576 tokens
    (256, 6, [4, 2]),  # 2 x 256 = 512 padding tokens: the limit itself cuts
    (255, 3, [3]),  # 1 x 256 tokens: padded, whole
    (4, 3, [3]),  # 3 rows run as 4 x 16: whole
])
def test_a_part_that_padding_would_waste_is_cut_to_a_row_bucket_and_the_rest_follow_at_once(prompt_len, n, parts):
    driver = AdmissionLog(slots=8, groups=1)
    sched = Scheduler(driver, max_queue=8, max_prefill_tokens=4096, metrics=Metrics(), prompt_padding=gpu_padding)
    sched.thread.start()
    prompt = [i % 40 for i in range(prompt_len)]
    req, client = request(prompt, max_tokens=3, n=n)
    sched.submit(req)
    assert client.ended.wait(10)
    assert [client.tokens(k) for k in range(n)] == [reference(prompt, 3)] * n
    assert [count for _, count in driver.admissions] == parts
    assert driver.admissions[-1][0] - driver.admissions[0][0] < 0.5  # the next step, not a wait
    sched.stop(1.0)
    assert driver.problems == []


def test_a_part_over_the_graphed_size_runs_whole_and_a_held_part_is_cut_only_when_it_goes():
    def graphed_up_to_1024(rows: int, width: int) -> tuple[int, int]:
        shape = gpu_padding(rows, width)
        return shape if shape[0] * shape[1] <= 1024 else (rows, width)

    driver = AdmissionLog(slots=8, groups=1)
    sched = Scheduler(driver, max_queue=8, max_prefill_tokens=4096, metrics=Metrics(),
                      prompt_padding=graphed_up_to_1024)
    sched.thread.start()
    prompt = [i % 40 for i in range(150)]
    eager, eager_client = request(prompt, max_tokens=3, n=5)  # 8 x 192 > 1024: eager, unpadded, whole
    sched.submit(eager)
    assert eager_client.ended.wait(10) and [n for _, n in driver.admissions] == [5]
    sched.stop(1.0)

    driver = AdmissionLog(slots=9, groups=1)
    sched = Scheduler(driver, max_queue=16, max_prefill_tokens=4096, metrics=Metrics(), prefill_wait=0.5,
                      prompt_padding=gpu_padding)
    sched.thread.start()
    long, long_client = long_request()
    sched.submit(long)
    wait_for(lambda: len(long_client.tokens()) >= 2)
    first, first_client = request(prompt, max_tokens=3, n=5)  # 5 of 8 free slots: held, not cut and sent
    sched.submit(first)
    time.sleep(0.1)
    second, second_client = request(prompt, max_tokens=3, n=3)  # fills the 8 slots: one 8-row part
    sched.submit(second)
    assert first_client.ended.wait(10) and second_client.ended.wait(10)
    assert [n for _, n in driver.admissions] == [1, 8]
    sched.cancel(long)
    sched.stop(1.0)
    assert driver.problems == [] and long_client.error is None



class RowLog(FakePipeline):
    """Records the rows of every command per group (decode and prefill parts together)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.rows_per_step: list[tuple[int, int]] = []

    def send(self, cmd) -> None:
        self.rows_per_step.append((cmd.group, sum(len(p.slots) for p in cmd.parts)))
        super().send(cmd)


def test_admissions_share_the_sequences_evenly_over_the_groups():
    driver = RowLog(slots=16, groups=2)
    driver.gate.clear()  # results held: every admission below happens before any sequence finishes
    sched = scheduler(driver, max_queue=16)
    reqs = [request(PROMPTS[i % 4], max_tokens=3) for i in range(6)]
    for req, _ in reqs:
        sched.submit(req)
    wait_for(lambda: sched.free_total == 10)
    assert sorted(len(r) for r in sched.running) == [3, 3]
    driver.gate.set()
    for (_, client), i in zip(reqs, range(6), strict=True):
        assert client.ended.wait(10) and client.tokens() == reference(PROMPTS[i % 4], 3)
    sched.stop(1.0)
    assert driver.problems == []


def test_groups_of_unequal_size_are_all_filled_when_the_sequences_outnumber_the_slots():
    driver = FakePipeline(slots=5, groups=2)  # slots 0, 2, 4 in group 0; 1, 3 in group 1
    driver.gate.clear()
    sched = scheduler(driver, max_queue=8)
    reqs = [request([4, 5], max_tokens=2) for _ in range(7)]
    for req, _ in reqs:
        sched.submit(req)
    wait_for(lambda: sched.free_total == 0)
    assert [len(r) for r in sched.running] == [3, 2] and len(sched.waiting) == 2
    driver.gate.set()
    for _, client in reqs:
        assert client.ended.wait(10) and client.tokens() == reference([4, 5], 2)
    sched.stop(1.0)
    assert driver.problems == []


def test_a_closed_loop_of_clients_keeps_every_group_within_an_even_share():
    """64 clients, each sending its next request when the last one ends, over 2 groups of 64 slots: no group
    step carries more than 32 rows, so none pads to the 64-row bucket."""
    driver = RowLog(slots=128, groups=2)
    sched = scheduler(driver, max_queue=256)
    done = threading.Semaphore(0)
    lengths = [3 + (7 * i) % 11 for i in range(64 * 4)]

    def send(i: int) -> None:
        def sink(event) -> None:
            if event.kind in ("done", "error"):
                done.release()
                if i + 64 < len(lengths):
                    send(i + 64)

        params = [SamplingParams(max_new_tokens=lengths[i], ignore_eos=True)]
        sched.submit(GenRequest([PROMPTS[i % 4]], params, 1, decode, sink))

    for i in range(64):
        send(i)
    for _ in lengths:
        assert done.acquire(timeout=20)
    sched.stop(1.0)
    assert driver.problems == []
    assert max(rows for _, rows in driver.rows_per_step) <= 32, sorted(driver.rows_per_step)[-5:]
