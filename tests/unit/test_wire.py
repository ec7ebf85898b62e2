"""Command serialisation between the driver and the workers."""

import pickle
from dataclasses import dataclass

import pytest
import torch

from eet_pipe.runtime import wire
from eet_pipe.runtime.step_parts import StepCommand, StepPart


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.float32, torch.float16, torch.bfloat16])
def test_tensors_round_trip_exactly(dtype):
    t = (torch.arange(24) % 5).to(dtype).view(2, 3, 4)
    back = wire.loads(wire.dumps(t))
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back, t)
    back.zero_()  # owns writable memory
    assert torch.equal(t, (torch.arange(24) % 5).to(dtype).view(2, 3, 4))


def test_views_empty_and_scalar_tensors():
    base = torch.arange(30).view(5, 6)
    for t in (base[1:4, ::2], base.t(), torch.empty(0, 7, dtype=torch.long), torch.tensor(3.5)):
        back = wire.loads(wire.dumps(t))
        assert back.shape == t.shape and back.dtype == t.dtype and back.is_contiguous()
        assert torch.equal(back, t)


def test_raw_bytes_not_an_archive_per_tensor():
    t = torch.arange(1000, dtype=torch.long)
    size = len(wire.dumps(t))
    assert 8000 <= size < 8000 + 200  # the data plus a small header
    assert size < len(pickle.dumps(t, protocol=pickle.HIGHEST_PROTOCOL))  # torch.save archive per tensor


@dataclass
class Holder:
    parts: list


def test_nested_commands_round_trip():
    cmd = StepCommand(group=1, step=7, parts=[StepPart(slots=torch.tensor([0, 2]), tokens=torch.tensor([[5], [9]]),
                                                       lengths=torch.ones(2, dtype=torch.long),
                                                       start=torch.tensor([3, 4]))])
    back = wire.loads(wire.dumps(Holder([cmd, {"x": torch.zeros(2, 2)}])))
    got = back.parts[0]
    assert got.group == 1 and got.step == 7
    for name in ("slots", "tokens", "lengths", "start"):
        assert torch.equal(getattr(got.parts[0], name), getattr(cmd.parts[0], name))
    assert torch.equal(back.parts[1]["x"], torch.zeros(2, 2))


def test_parameters_and_grad_tensors_use_the_default_path():
    p = torch.nn.Parameter(torch.ones(3))
    back = wire.loads(wire.dumps(p))
    assert isinstance(back, torch.nn.Parameter) and torch.equal(back.detach(), p.detach())
    g = torch.ones(3, requires_grad=True)
    back = wire.loads(wire.dumps(g))
    assert back.requires_grad and torch.equal(back.detach(), g.detach())


def test_conjugate_and_negative_views_travel_as_their_values():
    z = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    for t in (z.conj(), torch._neg_view(torch.arange(4.0))):
        back = wire.loads(wire.dumps(t))
        assert torch.equal(back, t.resolve_conj().resolve_neg())
