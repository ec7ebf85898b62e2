"""A bad schedule / microbatches / virtual combination fails in the PipelineEngine constructor, before
any worker process is started, with the message the schedule builder gives."""

from __future__ import annotations

import multiprocessing.context

import pytest

from eet_pipe import PipelineEngine


@pytest.fixture
def no_spawning(monkeypatch):
    """Starting a process raises instead: a check that runs only after spawning shows up as this error."""

    def refuse(self):
        raise AssertionError(f"a worker process was started: {self.name}")

    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", refuse)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"schedule": "sequential", "microbatches": 2}, "microbatches=2 is not used by schedule 'sequential'"),
    ({"schedule": "interleaved", "virtual": 1}, "virtual=1 is invalid"),
    ({"schedule": "gpipe", "microbatches": 0}, "microbatches=0 is invalid"),
    ({"schedule": "zigzag"}, "schedule='zigzag' is not a forward schedule"),
    ({"schedule": "decode"}, "schedule='decode' is not a forward schedule"),
])
def test_bad_combination_raises_before_any_process_starts(no_spawning, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PipelineEngine("tiny", devices=["cpu", "cpu"], plan="even", **kwargs)
    assert not multiprocessing.active_children()


def test_sequential_forward_takes_the_batch_whole():
    """The sequential schedule's automatic microbatch count is 1, so a batch larger than 1 runs."""
    import torch

    with PipelineEngine("tiny", devices=["cpu", "cpu"], plan="even", schedule="sequential") as pipe:
        ids = torch.randint(0, pipe.cfg.vocab_size, (3, 5))
        out = pipe.forward(ids)
        assert out.shape == (3, 5, pipe.cfg.vocab_size)
        with pytest.raises(ValueError, match="microbatches=3 is not used by schedule 'sequential'"):
            pipe.forward(ids, microbatches=3)
