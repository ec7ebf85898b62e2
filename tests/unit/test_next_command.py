"""A serving worker's wait for its next command (`runtime.step.next_command`): each step's result leaves as
soon as its tokens reach the host, not when the whole queue ran dry, and a command never waits for them."""

from __future__ import annotations

import queue
import threading
import time
from collections import deque

import torch

from eet_pipe.runtime.step import next_command


class _Clock:
    def __init__(self, unreported: bool = False) -> None:
        self.spans = unreported

    def unreported(self) -> bool:
        return self.spans

    def report(self, force: bool = False) -> dict:
        assert force
        self.spans = False
        return {"busy": 0.0, "elapsed": 1.0, "spans": []}


class _State:
    """Steps whose tokens reach the host at given times (as `ServeState` on a GPU)."""

    def __init__(self, ready_at: list[float], unreported: bool = False) -> None:
        self.rank, self.device = 0, torch.device("cpu")
        self.pending = deque((i, t) for i, t in enumerate(ready_at))
        self.clock = _Clock(unreported)

    def results(self, block: bool) -> list[dict]:
        out = []
        while self.pending and (block or time.monotonic() >= self.pending[0][1]):
            out.append({"step": self.pending.popleft()[0]})
        return out


def test_each_result_leaves_when_its_step_ends():
    now = time.monotonic()
    state = _State([now + 0.1, now + 0.6, now + 1.2])
    commands: queue.Queue = queue.Queue()
    emitted: list[tuple[float, int]] = []

    def emit(msg: tuple) -> None:
        emitted.append((time.monotonic() - now, msg[2]["step"]))
        if msg[2]["step"] == 0:  # the scheduler answers the first result with the group's next step
            threading.Timer(0.04, commands.put, ["next"]).start()

    assert next_command(commands.get, commands.get_nowait, state, emit) == "next"
    # step 0 left on its own, long before step 1 ended; the command came back without waiting for step 1
    assert [s for _, s in emitted] == [0]
    assert emitted[0][0] < 0.5
    assert time.monotonic() - now < 0.5 and len(state.pending) == 2
    threading.Timer(1.6, commands.put, ["last"]).start()
    assert next_command(commands.get, commands.get_nowait, state, emit) == "last"
    # each of the other two left at its own end, not together with the last one
    assert [s for _, s in emitted] == [0, 1, 2]
    assert 0.6 <= emitted[1][0] < 1.1 and 1.2 <= emitted[2][0] < 1.6


def test_a_waiting_command_comes_first_and_idle_tracing_stages_flush_their_spans():
    now = time.monotonic()
    state = _State([now + 0.1], unreported=True)
    commands: queue.Queue = queue.Queue()
    commands.put("waiting")
    emitted: list[tuple] = []
    assert next_command(commands.get, commands.get_nowait, state, emitted.append) == "waiting"
    assert emitted == [] and len(state.pending) == 1  # nothing waited for
    threading.Timer(0.3, commands.put, ["later"]).start()
    assert next_command(commands.get, commands.get_nowait, state, emitted.append) == "later"
    assert [m[0] for m in emitted] == ["result", "stats"]  # the result, then the spans, before blocking
    assert not state.pending and not state.clock.unreported()
