"""Device-list rules shared by the engine, the server and the command line."""

from __future__ import annotations

import pytest
import torch

from eet_pipe.options.typed import EngineOptions
from eet_pipe.runtime.placement import pipeline_devices
from eet_pipe.serving.driver import stage_devices


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_a_gpu_listed_twice_needs_permission_everywhere(two_gpus):
    for pick in (lambda d, ok: pipeline_devices(d, None, ok), lambda d, ok: stage_devices(d, 1, ok)):
        with pytest.raises(ValueError, match=r"device\(s\) cuda:0 listed more than once"):
            pick(["cuda:0", "cuda:1", "cuda:0"], False)
        assert pick(["cuda:0", "cuda:0"], True) == ["cuda:0", "cuda:0"]
    assert stage_devices(["cpu", "cpu", "cpu"], 1) == ["cpu"] * 3  # CPU stages may repeat


def test_stages_and_devices_must_agree(two_gpus):
    assert stage_devices(["cuda:1", "cuda:0"], 1) == ["cuda:1", "cuda:0"]  # stages=1 with devices: one per device
    with pytest.raises(ValueError, match=r"stages=3 but 2 devices were given \(cuda:0, cuda:1\)"):
        pipeline_devices(["cuda:0", "cuda:1"], 3, False)
    with pytest.raises(ValueError, match="'cuda:2' is not visible: this machine has 2 CUDA device"):
        pipeline_devices(["cuda:0", "cuda:2"], None, False)
    assert EngineOptions().allow_duplicate_devices is False
