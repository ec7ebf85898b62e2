"""The engine process's outbox: the events of a step, of every request, leave in one message."""

from __future__ import annotations

import zmq

from eet_pipe.generation.sequences import SamplingParams
from eet_pipe.serving import scheduler as scheduler_mod
from eet_pipe.serving.engine_core import _FlushingDriver, _Outbox
from eet_pipe.serving.ipc import NO_TEXT, IpcPaths, loads, pull_socket
from eet_pipe.serving.metrics import Metrics
from eet_pipe.serving.sequences import Event, GenRequest
from tests.unit.test_scheduler import FakePipeline, decode


class _Driver:
    def __init__(self, outbox_sock: zmq.Socket) -> None:
        self.sock, self.seen = outbox_sock, []
        self.setup = "setup"

    def collect(self) -> dict:
        self.seen.append(self.sock.poll(1000))  # the outbox went out before the wait on the pipeline
        return {"group": 0}

    def check_alive(self) -> None:
        pass


def test_a_step_of_many_requests_is_one_message(tmp_path):
    ctx = zmq.Context()
    paths = IpcPaths(str(tmp_path))
    inbox = pull_socket(ctx, paths.frontend())
    outbox = _Outbox(ctx, [paths.frontend()])
    sinks = [outbox.sink(rid) for rid in range(3)]
    for rid, sink in enumerate(sinks):
        sink(Event("token", 0, "", [10 + rid]))
    sinks[1](Event("finish", 0, NO_TEXT, finish_reason="length"))
    sinks[2](Event("finish", 0, "final text", finish_reason="stop"))
    driver = _FlushingDriver(_Driver(inbox), outbox)
    assert driver.setup == "setup" and driver.collect() == {"group": 0} and driver.seen == [zmq.POLLIN]
    kind, events = loads(inbox.recv())
    assert kind == "events" and [e[:4] for e in events[:3]] == [(r, "token", 0, [10 + r]) for r in range(3)]
    assert [(e[0], e[5], e[6]) for e in events[3:]] == [(1, "length", None), (2, "stop", "final text")]
    assert inbox.poll(200) == 0  # nothing more: one message for the whole step
    outbox.flush()
    assert inbox.poll(200) == 0  # an empty outbox sends nothing
    inbox.close()
    outbox.close()
    ctx.term()


def test_a_request_ends_at_once_when_the_pipeline_goes_idle(tmp_path, monkeypatch):
    """The events of the last step of the only request leave as soon as its result is in, not after the
    scheduler's idle wait (a closed-loop client would otherwise wait that long before every request)."""
    monkeypatch.setattr(scheduler_mod, "IDLE_CHECK_S", 30.0)
    ctx = zmq.Context()
    paths = IpcPaths(str(tmp_path))
    inbox = pull_socket(ctx, paths.frontend())
    outbox = _Outbox(ctx, [paths.frontend()])
    pipeline = FakePipeline(slots=2, groups=1)
    sched = scheduler_mod.Scheduler(_FlushingDriver(pipeline, outbox), max_queue=4, max_prefill_tokens=64,
                                    metrics=Metrics())
    sched.thread.start()
    sched.submit(GenRequest([[4, 5]], [SamplingParams(max_new_tokens=5)], 1, decode, outbox.sink(7)))
    kinds = []
    try:
        while "done" not in kinds:
            assert inbox.poll(5000), f"the request's events stopped after {kinds}"
            kinds += [e[1] for e in loads(inbox.recv())[1] if e[0] == 7]
        assert kinds == ["token"] * 5 + ["finish", "done"], kinds
    finally:
        sched.stop(1.0)
        inbox.close()
        outbox.close()
        ctx.term()


def test_the_requests_of_a_dead_http_process_are_cancelled_and_only_those(tmp_path):
    """With two HTTP processes, the engine keys requests by (process, id): ids repeat across processes, and
    when one process dies its requests are cancelled while the other's go on."""
    from types import SimpleNamespace

    from eet_pipe.serving.engine_core import EngineCore

    sched = scheduler_mod.Scheduler(FakePipeline(slots=4, groups=1), max_queue=8, max_prefill_tokens=64,
                                    metrics=Metrics())
    rt = SimpleNamespace(status="ready", message="", scheduler=sched, metrics=Metrics())
    core = EngineCore(rt, IpcPaths(str(tmp_path)), frontends=2)
    core.start()
    params = [SamplingParams(max_new_tokens=10_000, ignore_eos=True)]
    try:
        for index in (0, 1):
            for rid in (1, 2):  # the same ids in both processes
                assert core._submit(index, rid, [[4, 5]], params, 1, None) == (200, "")
        assert sorted(core.requests) == [(0, 1), (0, 2), (1, 1), (1, 2)]
        kept = [core.requests[(0, 1)], core.requests[(0, 2)]]
        dropped = [core.requests[(1, 1)], core.requests[(1, 2)]]
        core.cancel_frontend(1)
        assert sorted(core.requests) == [(0, 1), (0, 2)]
        assert all(r.closed for r in dropped) and not any(r.closed for r in kept)  # no event reaches them
    finally:
        core.close()
