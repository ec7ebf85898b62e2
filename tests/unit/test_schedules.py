"""Schedules vs literal hand-written tables, validation of broken schedules, build() errors."""

from __future__ import annotations

import dataclasses

import pytest

from eet_pipe.schedule import (
    SCHEDULES,
    Action,
    Op,
    Schedule,
    build,
    clock_table,
    decode,
    gpipe,
    interleaved,
    parse_action,
    parse_actions,
    sequential,
)


def table(*rows: str) -> list[list[Action]]:
    """One whitespace-separated row of short-form actions per stage."""
    return [parse_actions(row) for row in rows]


# --------------------------------------------------------------------------- actions as data


def test_action_str_and_parse_round_trip() -> None:
    action = Action(Op.SEND, mb=3, chunk=1, step=2, peer=0)
    assert str(action) == "S3c1t2>0"
    assert parse_action("S3c1t2>0") == action
    assert parse_action("F0") == Action(Op.FORWARD, 0, 0, 0)
    assert parse_action("R1c5<4") == Action(Op.RECV, 1, 5, 0, peer=4)
    assert str(Action(Op.FORWARD, 0, 1)) == "F0c1"


@pytest.mark.parametrize("text", ["F0>1", "S0c1", "R0c1>0", "X0", "F-1", "S0c1<1"])
def test_parse_action_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError, match="action text"):
        parse_action(text)


def test_action_peer_required_exactly_for_messages() -> None:
    with pytest.raises(ValueError, match="peer"):
        Action(Op.SEND, 0, 1)
    with pytest.raises(ValueError, match="peer"):
        Action(Op.FORWARD, 0, 0, peer=1)


def test_chunks_of() -> None:
    sched = interleaved(3, 3, 2)
    assert sched.chunks_of(0) == [0, 3]
    assert sched.chunks_of(2) == [2, 5]
    assert sched.num_chunks == 6
    with pytest.raises(ValueError, match="stage=3"):
        sched.chunks_of(3)


# --------------------------------------------------------------------------- literal tables


def test_sequential_p3() -> None:
    sched = sequential(3)
    assert sched.actions == table(
        "F0c0 S0c1>1",
        "R0c1<0 F0c1 S0c2>2",
        "R0c2<1 F0c2",
    )
    assert (sched.num_microbatches, sched.virtual, sched.steps) == (1, 1, 1)


def test_gpipe_p2_m3() -> None:
    assert gpipe(2, 3).actions == table(
        "F0c0 S0c1>1 F1c0 S1c1>1 F2c0 S2c1>1",
        "R0c1<0 F0c1 R1c1<0 F1c1 R2c1<0 F2c1",
    )


def test_interleaved_p2_m2_v2() -> None:
    assert interleaved(2, 2, 2).actions == table(
        "F0c0 S0c1>1 F1c0 S1c1>1 R0c2<1 F0c2 S0c3>1 R1c2<1 F1c2 S1c3>1",
        "R0c1<0 F0c1 S0c2>0 R1c1<0 F1c1 S1c2>0 R0c3<0 F0c3 R1c3<0 F1c3",
    )


def test_interleaved_p2_m4_v2() -> None:
    assert interleaved(2, 4, 2).actions == table(
        "F0c0 S0c1>1 F1c0 S1c1>1 R0c2<1 F0c2 S0c3>1 R1c2<1 F1c2 S1c3>1 "
        "F2c0 S2c1>1 F3c0 S3c1>1 R2c2<1 F2c2 S2c3>1 R3c2<1 F3c2 S3c3>1",
        "R0c1<0 F0c1 S0c2>0 R1c1<0 F1c1 S1c2>0 R0c3<0 F0c3 R1c3<0 F1c3 "
        "R2c1<0 F2c1 S2c2>0 R3c1<0 F3c1 S3c2>0 R2c3<0 F2c3 R3c3<0 F3c3",
    )


def test_interleaved_m_not_multiple_of_p_uses_balanced_rounds() -> None:
    # P=2, M=3 -> one round of 3 microbatches (as ScheduleInterleaved1F1B), not rounds [2, 1].
    stage0 = [a for a in interleaved(2, 3, 2).actions[0] if a.op is Op.FORWARD]
    assert stage0 == parse_actions("F0c0 F1c0 F2c0 F0c2 F1c2 F2c2")
    # P=2, M=5 -> rounds of sizes [3, 2].
    stage1 = [a for a in interleaved(2, 5, 2).actions[1] if a.op is Op.FORWARD]
    assert stage1 == parse_actions("F0c1 F1c1 F2c1 F0c3 F1c3 F2c3 F3c1 F4c1 F3c3 F4c3")


def test_decode_p2_g2_steps2() -> None:
    sched = decode(2, 2, 2)
    assert sched.actions == table(
        "F0c0 S0c1>1 F1c0 S1c1>1 R0c0t1<1 F0c0t1 S0c1t1>1 R1c0t1<1 F1c0t1 S1c1t1>1",
        "R0c1<0 F0c1 S0c0t1>0 R1c1<0 F1c1 S1c0t1>0 R0c1t1<0 F0c1t1 R1c1t1<0 F1c1t1",
    )
    assert (sched.num_microbatches, sched.steps) == (2, 2)


def test_decode_p1_has_no_messages() -> None:
    assert decode(1, 2, 3).actions == table("F0c0 F1c0 F0c0t1 F1c0t1 F0c0t2 F1c0t2")


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
@pytest.mark.parametrize("micro", [1, 2, 3, 5, 8, 9])
@pytest.mark.parametrize("virtual", [2, 3])
def test_interleaved_valid_for_any_m(stages: int, micro: int, virtual: int) -> None:
    sched = interleaved(stages, micro, virtual)  # validate() runs inside and proves no deadlock
    forwards = [a for acts in sched.actions for a in acts if a.op is Op.FORWARD]
    assert len(forwards) == stages * micro * virtual
    for stage, acts in enumerate(sched.actions):
        assert {a.chunk for a in acts if a.op is Op.FORWARD} == set(sched.chunks_of(stage))


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
@pytest.mark.parametrize("groups", [1, 2, 5])
@pytest.mark.parametrize("steps", [1, 3])
def test_decode_valid(stages: int, groups: int, steps: int) -> None:
    sched = decode(stages, groups, steps)
    sends = [a for acts in sched.actions for a in acts if a.op is Op.SEND]
    # (P-1) forward hops per step plus (steps-1) feedback hops, per group; none when P == 1.
    expected = 0 if stages == 1 else groups * (steps * (stages - 1) + steps - 1)
    assert len(sends) == expected


# --------------------------------------------------------------------------- validate()


def _broken(sched: Schedule, *rows: str) -> Schedule:
    return dataclasses.replace(sched, actions=table(*rows))


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        (("F0c0 S0c1>1 F1c0 S1c1>1", "F0c1 R1c1<0 F1c1"), "SEND without matching RECV"),
        (("F0c0 F1c0 S1c1>1", "R0c1<0 F0c1 R1c1<0 F1c1"), "RECV without matching SEND"),
        (("F0c0 S0c1>1 F1c0 S1c1>1", "R0c1<0 F0c1 F1c1 R1c1<0"), "not received before use"),
        (("S0c1>1 F0c0 F1c0 S1c1>1", "R0c1<0 F0c1 R1c1<0 F1c1"), "sent before its producer"),
        (("F0c0 S0c1>1 F0c0 S1c1>1", "R0c1<0 F0c1 R1c1<0 F1c1"), "computed twice"),
        (("F0c0 S0c1>1", "R0c1<0 F0c1"), r"never computed .*\(1, 0, 0\)"),
        (("F0c0 S0c1>1 F1c1", "R0c1<0 F0c1 F1c0"), "misplaced"),
        (("F0c0 S0c1>1 F1c0 S1c1>1", "R0c1<0 F0c1 R1c1<0 F1c1 F2c1"), "mb=2"),
    ],
)
def test_validate_rejects_broken(rows: tuple[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _broken(gpipe(2, 2), *rows).validate()


def test_validate_detects_deadlock_from_swapped_order() -> None:
    # Stage 0 waits for chunk 2 of mb 0 before sending mb 1; stage 1 waits for mb 1 before
    # sending chunk 2 of mb 0. Every dependency is locally fine; only the cycle is wrong.
    sched = _broken(
        interleaved(2, 2, 2),
        "F0c0 S0c1>1 R0c2<1 F0c2 S0c3>1 F1c0 S1c1>1 R1c2<1 F1c2 S1c3>1",
        "R0c1<0 F0c1 R1c1<0 F1c1 S0c2>0 S1c2>0 R0c3<0 F0c3 R1c3<0 F1c3",
    )
    with pytest.raises(ValueError, match=r"deadlock.*stage 0 at R0c2<1.*stage 1 at R1c1<0"):
        sched.validate()


def test_validate_rejects_wrong_stage_count() -> None:
    with pytest.raises(ValueError, match="num_stages=2"):
        dataclasses.replace(gpipe(2, 1), actions=table("F0c0")).validate()


# --------------------------------------------------------------------------- build()


def test_build_dispatches() -> None:
    assert SCHEDULES == ("sequential", "gpipe", "interleaved", "decode")
    assert build("sequential", 3) == sequential(3)
    assert build("gpipe", 2, microbatches=3) == gpipe(2, 3)
    assert build("interleaved", 2, microbatches=4, virtual=2) == interleaved(2, 4, 2)
    assert build("decode", 2, microbatches=2, steps=2) == decode(2, 2, 2)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("1f1b", 2), {}, r"name='1f1b'.*sequential, gpipe, interleaved, decode"),
        (("gpipe", 0), {}, "num_stages=0"),
        (("gpipe", 2.0), {}, "num_stages=2.0"),
        (("gpipe", 2), {"microbatches": 0}, "microbatches=0"),
        (("interleaved", 2), {"microbatches": 2, "virtual": 1}, r"virtual=1.*>= 2"),
        (("decode", 2), {"steps": 0}, "steps=0"),
        (("gpipe", 2), {"virtual": 2}, "virtual=2 is not used by schedule 'gpipe'"),
        (("gpipe", 2), {"steps": 4}, "steps=4 is not used"),
        (("sequential", 2), {"microbatches": 4}, "microbatches=4 is not used"),
    ],
)
def test_build_errors_name_parameter(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build(*args, **kwargs)


def test_direct_constructors_name_parameter() -> None:
    with pytest.raises(ValueError, match="num_microbatches=0"):
        gpipe(2, 0)
    with pytest.raises(ValueError, match="groups=0"):
        decode(2, 0, 1)
    with pytest.raises(ValueError, match="virtual=1"):
        interleaved(2, 2, 1)


# --------------------------------------------------------------------------- clock_table()


def test_clock_table_unit_costs() -> None:
    assert clock_table(gpipe(2, 2)) == (
        "t        0    1    2\n"
        "stage 0  F0c0 F1c0 .\n"
        "stage 1  .    F0c1 F1c1"
    )


def test_clock_table_per_chunk_costs() -> None:
    text = clock_table(gpipe(2, 2), [1.0, 2.0])
    assert text.splitlines()[0].split() == ["t", "0", "1", "2", "3"]
    assert text.splitlines()[1].split() == ["stage", "0", "F0c0", "F1c0", ".", "."]
    assert text.splitlines()[2].split() == ["stage", "1", ".", "F0c1", "F0c1", "F1c1"]
