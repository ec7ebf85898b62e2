"""Simulator vs closed forms and hand-computed makespans."""

from __future__ import annotations

import dataclasses

import pytest

from eet_pipe.schedule import (
    Op,
    decode,
    decode_utilisation,
    gpipe,
    gpipe_bubble,
    interleaved,
    interleaved_bubble,
    parse_actions,
    sequential,
    simulate,
)


@pytest.mark.parametrize("stages", [2, 3, 4])
@pytest.mark.parametrize("micro", [1, 2, 4, 8])
def test_gpipe_bubble_matches_closed_form(stages: int, micro: int) -> None:
    result = simulate(gpipe(stages, micro), 1.0)
    assert result.makespan == micro + stages - 1
    assert result.busy == [float(micro)] * stages
    assert result.bubble == pytest.approx(gpipe_bubble(stages, micro), abs=1e-12)


@pytest.mark.parametrize("stages", [2, 4])
@pytest.mark.parametrize("rounds", [1, 2, 3])
def test_interleaved_bubble_matches_closed_form(stages: int, rounds: int) -> None:
    virtual, micro = 2, rounds * stages
    result = simulate(interleaved(stages, micro, virtual), 1.0 / virtual)
    assert result.makespan == pytest.approx(micro + (stages - 1) / virtual)
    assert result.bubble == pytest.approx(interleaved_bubble(stages, micro, virtual), abs=1e-9)


@pytest.mark.parametrize(
    ("stages", "micro", "virtual"), [(2, 3, 2), (2, 5, 3), (3, 4, 2), (4, 7, 3)]
)
def test_interleaved_bubble_exact_when_m_not_multiple_of_p(
    stages: int, micro: int, virtual: int
) -> None:
    result = simulate(interleaved(stages, micro, virtual), 1.0 / virtual)
    assert result.bubble == pytest.approx(interleaved_bubble(stages, micro, virtual), abs=1e-9)


def test_interleaved_beats_gpipe() -> None:
    assert simulate(interleaved(4, 8, 2), 0.5).bubble < simulate(gpipe(4, 8), 1.0).bubble


@pytest.mark.parametrize("stages", [2, 4])
@pytest.mark.parametrize("groups", [1, 2, 3, 4, 6])
def test_decode_utilisation(stages: int, groups: int) -> None:
    result = simulate(decode(stages, groups, 64), 1.0)
    expected = decode_utilisation(stages, groups)
    assert result.utilisation[0] == pytest.approx(expected, rel=0.05)
    assert result.busy[0] == 64 * groups


def test_sequential_transfer_adds_per_hop() -> None:
    for stages in (1, 2, 4):
        base = simulate(sequential(stages), 1.0).makespan
        slow = simulate(sequential(stages), 1.0, transfer=0.25).makespan
        assert base == stages
        assert slow - base == pytest.approx((stages - 1) * 0.25)


def test_transfer_per_link() -> None:
    def link(src: int, dst: int) -> float:
        return 1.0 if (src, dst) == (1, 2) else 0.0

    assert simulate(sequential(3), 1.0, transfer=link).makespan == pytest.approx(4.0)


def test_send_does_not_occupy_sender() -> None:
    result = simulate(gpipe(2, 2), 1.0, transfer=10.0)
    stage0 = [(a, b) for s, a, b, act in result.timeline if s == 0 and act.op is Op.FORWARD]
    assert stage0 == [(0.0, 1.0), (1.0, 2.0)]
    assert result.makespan == pytest.approx(1 + 10 + 1 + 1)  # F1c1 waits for arrival at 12


def test_decode_sample_delays_feedback() -> None:
    # One group, P stages of cost 1: each step is P long, plus sample between steps.
    assert simulate(decode(2, 1, 3), 1.0, sample=0.5).makespan == pytest.approx(3 * 2 + 2 * 0.5)
    assert simulate(decode(1, 1, 3), 1.0, sample=0.5).makespan == pytest.approx(3 + 2 * 0.5)
    # Enough groups hide the sampling latency on stage 0 (G=4 > P=2, sample 0.5 < 2 spare).
    hidden = simulate(decode(2, 4, 8), 1.0, sample=0.5)
    assert hidden.makespan == pytest.approx(simulate(decode(2, 4, 8), 1.0).makespan)


def test_compute_forms() -> None:
    # per-chunk sequence
    assert simulate(gpipe(2, 2), [1.0, 2.0]).makespan == pytest.approx(5.0)
    # fn(chunk, mb)
    result = simulate(gpipe(2, 2), lambda chunk, mb: 1.0 + mb)
    assert result.busy == [3.0, 3.0]
    assert result.makespan == pytest.approx(1 + 2 + 2)
    # per-chunk over virtual chunks
    costs = [0.5, 0.5, 0.25, 0.25]
    assert simulate(interleaved(2, 2, 2), costs).busy == [1.5, 1.5]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"compute": [1.0]}, "need num_stages\\*virtual=2"),
        ({"compute": -1.0}, "compute=-1.0"),
        ({"compute": 1.0, "transfer": -0.1}, "transfer=-0.1"),
        ({"compute": 1.0, "sample": -1.0}, "sample=-1.0"),
    ],
)
def test_simulate_rejects_bad_costs(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        simulate(gpipe(2, 1), **kwargs)


def test_simulate_detects_deadlock() -> None:
    sched = dataclasses.replace(
        interleaved(2, 2, 2),
        actions=[
            parse_actions("F0c0 S0c1>1 R0c2<1 F0c2 S0c3>1 F1c0 S1c1>1 R1c2<1 F1c2 S1c3>1"),
            parse_actions("R0c1<0 F0c1 R1c1<0 F1c1 S0c2>0 S1c2>0 R0c3<0 F0c3 R1c3<0 F1c3"),
        ],
    )
    with pytest.raises(ValueError, match=r"deadlock.*stage 0 at R0c2<1"):
        simulate(sched, 1.0)


def test_closed_forms() -> None:
    assert gpipe_bubble(1, 5) == 0.0
    assert gpipe_bubble(4, 4) == pytest.approx(3 / 7)
    assert interleaved_bubble(4, 8, 2) == pytest.approx(3 / 19)
    assert decode_utilisation(4, 2) == 0.5
    assert decode_utilisation(4, 8) == 1.0
    with pytest.raises(ValueError, match="groups=0"):
        decode_utilisation(2, 0)
    with pytest.raises(ValueError, match="num_stages=0"):
        gpipe_bubble(0, 1)
