"""Failures in workers become clear errors in the caller, within the timeout, with no process left."""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest
import torch

from eet_pipe.runtime import PipelineEngine, WorkerDiedError, WorkerError, WorkerTimeoutError
from eet_pipe.runtime.worker import FAULT_ENV


def _children() -> list[psutil.Process]:
    kids = psutil.Process().children(recursive=True)
    return [p for p in kids if p.is_running() and "resource_tracker" not in " ".join(p.cmdline())]


def _assert_no_workers(pids: list[int]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            break
        time.sleep(0.1)
    assert not alive, f"worker processes left behind: {alive}"
    zombies = [p for p in psutil.Process().children() if p.status() == psutil.STATUS_ZOMBIE]
    assert not zombies


def _ids():
    return torch.randint(0, 200, (4, 7))


@pytest.mark.timeout(120)
def test_worker_exception_names_stage_device_and_traceback(monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "1:raise:2")
    engine = PipelineEngine("tiny", devices=["cpu", "cpu"], plan="even", timeout=30)
    pids = [p.pid for p in engine._sup.procs]
    with pytest.raises(WorkerError) as err:
        engine.forward(_ids(), microbatches=2)
    text = str(err.value)
    assert "stage 1 (device cpu" in text and "injected fault at stage 1" in text and "Traceback" in text
    _assert_no_workers(pids)
    with pytest.raises(WorkerError, match="closed"):
        engine.forward(_ids())
    engine.close()


@pytest.mark.timeout(120)
def test_worker_killed_mid_generate():
    engine = PipelineEngine("tiny", devices=["cpu", "cpu"], plan="even", timeout=30)
    pids = [p.pid for p in engine._sup.procs]
    threading.Timer(1.0, os.kill, (pids[1], signal.SIGKILL)).start()
    start = time.monotonic()
    with pytest.raises(WorkerDiedError, match=r"stage 1 \(device cpu.*died \(killed by signal 9\) while generate"):
        engine.generate(["hello"] * 4, max_new_tokens=400, ignore_eos=True)
    assert time.monotonic() - start < 30
    _assert_no_workers(pids)
    engine.close()


@pytest.mark.timeout(120)
def test_hung_peer_times_out(monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "0:hang:3")
    engine = PipelineEngine("tiny", devices=["cpu", "cpu"], plan="even", timeout=3)
    pids = [p.pid for p in engine._sup.procs]
    start = time.monotonic()
    with pytest.raises(WorkerTimeoutError, match="no stage made progress for 3 s") as err:
        engine.forward(_ids(), microbatches=4)
    # the error says where each stage was: stage 0 inside the injected hang, stage 1 waiting for it
    where = str(err.value).split("stage 0 (device cpu", 2)[-1]
    assert "in hook" in where and "worker.py" in where, str(err.value)
    assert "stage 1 (device cpu" in str(err.value)
    assert time.monotonic() - start < 20
    _assert_no_workers(pids)


@pytest.mark.timeout(120)
def test_close_leaves_nothing_behind():
    before = {p.pid for p in _children()}
    with PipelineEngine("tiny", devices=["cpu", "cpu", "cpu"], plan="even") as engine:
        pids = [p.pid for p in engine._sup.procs]
        engine.forward(_ids())
    _assert_no_workers(pids)
    assert {p.pid for p in _children()} <= before


@pytest.mark.parametrize("kwargs,msg", [
    ({"devices": ["cpu"] * 7}, "7 stages x 1 chunks = 7 chunks but the model has only 6 partition units"),
    ({"devices": ["cpu", "cpu"], "schedule": "interleaved", "virtual": 4}, "8 chunks but the model has only 6"),
    ({"devices": ["cuda:0", "cuda:1"]}, "is not visible"),
    ({"devices": ["cpu"], "schedule": "zigzag"}, "schedule='zigzag' is not a forward schedule"),
    ({"devices": ["tpu:0"]}, "not a valid device name|not supported"),
    ({"devices": ["cpu"], "microbatches": 0}, "microbatches=0 is invalid"),
])
def test_invalid_setups_fail_before_spawning(kwargs, msg):
    before = {p.pid for p in _children()}
    with pytest.raises(ValueError, match=msg):
        PipelineEngine("tiny", plan="even", **kwargs)
    assert {p.pid for p in _children()} <= before


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_duplicate_gpu_needs_permission():
    with pytest.raises(ValueError, match="listed more than once"):
        PipelineEngine("tiny", devices=["cuda:0", "cuda:0"], plan="even")
