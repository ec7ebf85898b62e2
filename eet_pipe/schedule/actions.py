"""Pipeline actions and schedules as plain data, plus their structural validation.

A schedule is one ordered list of :class:`Action` per stage (device). The runtime executes the
lists, the simulator replays them on costs, the tests compare them to literal tables.

Conventions
-----------
* ``chunk`` is the GLOBAL virtual-stage index ``0 .. P*v-1``; chunk ``c`` lives on stage ``c % P``.
* A message is keyed by the computation that CONSUMES it: ``SEND(mb, c, t)`` / ``RECV(mb, c, t)``
  carry the input of ``F(mb, c, t)``. Its payload is the output of :func:`producer_of` that key:
  ``F(mb, c-1, t)``, or for ``c == 0, t > 0`` (decode feedback) the tokens sampled from
  ``F(mb, P*v-1, t-1)``.
* ``peer`` is the stage on the other side (destination for SEND, source for RECV).
* SEND is asynchronous (never blocks); RECV blocks until the matching SEND has been issued.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

__all__ = [
    "Action",
    "Key",
    "Op",
    "Schedule",
    "parse_action",
    "parse_actions",
    "producer_of",
]

Key = tuple[int, int, int]
"""(mb, chunk, step) of one forward computation, also the key of the message that feeds it."""

_ACTION_RE = re.compile(r"^([FSR])(\d+)(?:c(\d+))?(?:t(\d+))?(?:([<>])(\d+))?$")


class Op(str, Enum):
    """Kind of pipeline action."""

    FORWARD = "F"
    SEND = "S"
    RECV = "R"


@dataclass(frozen=True)
class Action:
    """One step of a stage's program.

    Attributes:
        op: FORWARD, SEND or RECV.
        mb: microbatch index (decode: group index).
        chunk: global chunk (virtual stage) index; for SEND/RECV the chunk consuming the message.
        step: decode step (0 = prefill of the group); 0 for non-decode schedules.
        peer: other stage of a SEND (destination) / RECV (source); None for FORWARD.
    """

    op: Op
    mb: int
    chunk: int = 0
    step: int = 0
    peer: int | None = None

    def __post_init__(self) -> None:
        """Check that ``peer`` is present exactly for SEND and RECV."""
        has_peer = self.peer is not None
        if has_peer != (self.op is not Op.FORWARD):
            raise ValueError(
                f"peer={self.peer!r} invalid for op={self.op.value}: SEND/RECV need a peer stage, "
                "FORWARD must have peer=None"
            )

    @property
    def key(self) -> Key:
        """(mb, chunk, step) of the computation this action performs or feeds."""
        return (self.mb, self.chunk, self.step)

    def __str__(self) -> str:
        """Short form: ``F0c1``, ``S0c1>2``, ``R3c0t2<1`` (``t`` only when step > 0)."""
        text = f"{self.op.value}{self.mb}c{self.chunk}"
        if self.step:
            text += f"t{self.step}"
        if self.op is Op.SEND:
            text += f">{self.peer}"
        elif self.op is Op.RECV:
            text += f"<{self.peer}"
        return text


def parse_action(text: str) -> Action:
    """Parse the short form written by ``str(Action)``.

    Args:
        text: e.g. ``"F0"``, ``"F0c1"``, ``"S0c1>2"``, ``"R1c0t3<1"``; ``c`` and ``t`` default to 0.

    Returns:
        The action.
    """
    match = _ACTION_RE.match(text.strip())
    if match is None:
        raise ValueError(
            f"action text={text!r} is not of the form <F|S|R><mb>[c<chunk>][t<step>][>|<peer>]"
        )
    op_s, mb_s, chunk_s, step_s, arrow, peer_s = match.groups()
    op = Op(op_s)
    expected = {Op.FORWARD: None, Op.SEND: ">", Op.RECV: "<"}[op]
    if arrow != expected:
        raise ValueError(
            f"action text={text!r}: {op.name} takes "
            + ("no peer" if expected is None else f"'{expected}<peer>'")
        )
    return Action(
        op=op,
        mb=int(mb_s),
        chunk=int(chunk_s or 0),
        step=int(step_s or 0),
        peer=None if peer_s is None else int(peer_s),
    )


def parse_actions(text: str) -> list[Action]:
    """Parse a whitespace-separated sequence of short-form actions (one stage's program)."""
    return [parse_action(token) for token in text.split()]


def producer_of(key: Key, num_chunks: int) -> Key | None:
    """Key of the forward whose output is the input of ``key``; None for the very first chunk.

    ``(mb, c, t) <- (mb, c-1, t)`` for ``c > 0``; ``(mb, 0, t) <- (mb, num_chunks-1, t-1)`` for
    ``t > 0`` (decode feedback: tokens sampled from the last chunk of the previous step).
    """
    mb, chunk, step = key
    if chunk > 0:
        return (mb, chunk - 1, step)
    if step > 0:
        return (mb, num_chunks - 1, step - 1)
    return None


@dataclass(frozen=True)
class Schedule:
    """Per-stage action lists plus the shape parameters that produced them.

    Attributes:
        name: schedule name (one of ``schedules.SCHEDULES`` for built-in ones).
        num_stages: P, number of devices/stages.
        num_microbatches: M (decode: number of groups G in flight).
        virtual: v, chunks per stage (1 unless interleaved).
        steps: decode steps (1 for non-decode schedules).
        actions: one ordered list of actions per stage.
    """

    name: str
    num_stages: int
    num_microbatches: int
    virtual: int = 1
    steps: int = 1
    actions: list[list[Action]] = field(default_factory=list)

    @property
    def num_chunks(self) -> int:
        """Total number of chunks, P * v."""
        return self.num_stages * self.virtual

    def stage_of(self, chunk: int) -> int:
        """Stage holding global chunk ``chunk``."""
        return chunk % self.num_stages

    def chunks_of(self, stage: int) -> list[int]:
        """Global chunk indices held by ``stage``, ascending."""
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage={stage} out of range 0..{self.num_stages - 1}")
        return [stage + k * self.num_stages for k in range(self.virtual)]

    def format(self) -> str:
        """One line per stage: ``stage s: F0c0 S0c1>1 ...``."""
        return "\n".join(
            f"stage {s}: " + " ".join(str(a) for a in acts) for s, acts in enumerate(self.actions)
        )

    def validate(self) -> None:
        """Check structure, data dependencies and freedom from deadlock.

        Raises:
            ValueError: naming the stage and action at fault.
        """
        if len(self.actions) != self.num_stages:
            raise ValueError(
                f"actions has {len(self.actions)} stage lists, "
                f"expected num_stages={self.num_stages}"
            )
        _check_ranges(self)
        _check_forwards(self)
        _check_messages(self)
        _check_dependencies(self)
        _check_deadlock(self)


def _check_ranges(sched: Schedule) -> None:
    """Every index in range and every action on the stage its chunk/peer implies."""
    for stage, acts in enumerate(sched.actions):
        for act in acts:
            where = f"stage {stage} action {act}"
            if not 0 <= act.mb < sched.num_microbatches:
                raise ValueError(f"{where}: mb={act.mb} outside 0..{sched.num_microbatches - 1}")
            if not 0 <= act.chunk < sched.num_chunks:
                raise ValueError(f"{where}: chunk={act.chunk} outside 0..{sched.num_chunks - 1}")
            if not 0 <= act.step < sched.steps:
                raise ValueError(f"{where}: step={act.step} outside 0..{sched.steps - 1}")
            home = sched.stage_of(act.chunk)
            if act.op is Op.SEND:
                stage_ok, expect = act.peer == home and home != stage, f"peer={home} (!= own stage)"
            elif act.op is Op.RECV:
                stage_ok, expect = home == stage and act.peer != stage, "chunk on this stage"
            else:
                stage_ok, expect = home == stage, f"chunk on stage {home}"
            if not stage_ok:
                raise ValueError(f"{where}: misplaced, expected {expect}")
            if act.peer is not None and not 0 <= act.peer < sched.num_stages:
                raise ValueError(f"{where}: peer={act.peer} outside 0..{sched.num_stages - 1}")


def _check_forwards(sched: Schedule) -> None:
    """Each (mb, chunk, step) is computed exactly once, and all of them are."""
    seen: dict[Key, int] = {}
    for stage, acts in enumerate(sched.actions):
        for act in acts:
            if act.op is not Op.FORWARD:
                continue
            if act.key in seen:
                raise ValueError(f"stage {stage} action {act}: {act.key} computed twice")
            seen[act.key] = stage
    total = sched.num_microbatches * sched.num_chunks * sched.steps
    if len(seen) != total:
        missing = [
            (mb, c, t)
            for t in range(sched.steps)
            for mb in range(sched.num_microbatches)
            for c in range(sched.num_chunks)
            if (mb, c, t) not in seen
        ]
        raise ValueError(f"forwards never computed (mb, chunk, step): {missing[:8]}")


def _check_messages(sched: Schedule) -> None:
    """Every SEND has exactly one matching RECV (same key, swapped peers) and vice versa."""
    sends: dict[tuple[int, int, Key], Action] = {}
    recvs: dict[tuple[int, int, Key], Action] = {}
    for stage, acts in enumerate(sched.actions):
        for act in acts:
            if act.op is Op.FORWARD:
                continue
            assert act.peer is not None
            src, dst = (stage, act.peer) if act.op is Op.SEND else (act.peer, stage)
            table = sends if act.op is Op.SEND else recvs
            link = (src, dst, act.key)
            if link in table:
                raise ValueError(f"stage {stage} action {act}: duplicate message {link}")
            table[link] = act
    for (src, dst, _), act in sends.items():
        if (src, dst, act.key) not in recvs:
            raise ValueError(f"stage {src} action {act}: SEND without matching RECV on {dst}")
    for (src, dst, _), act in recvs.items():
        if (src, dst, act.key) not in sends:
            raise ValueError(f"stage {dst} action {act}: RECV without matching SEND on {src}")


def _check_dependencies(sched: Schedule) -> None:
    """Inputs exist before use: RECV before its F, producer F before its SEND or local consumer."""
    for stage, acts in enumerate(sched.actions):
        done: set[Key] = set()
        received: set[Key] = set()
        for act in acts:
            where = f"stage {stage} action {act}"
            source = producer_of(act.key, sched.num_chunks)
            if act.op is Op.SEND:
                if source is None or source not in done:
                    raise ValueError(f"{where}: sent before its producer F{source} ran here")
            elif act.op is Op.RECV:
                received.add(act.key)
            else:
                local = source is not None and sched.stage_of(source[1]) == stage
                if local and source not in done:
                    raise ValueError(f"{where}: runs before its local producer {source}")
                if source is not None and not local and act.key not in received:
                    raise ValueError(f"{where}: input from stage "
                                     f"{sched.stage_of(source[1])} not received before use")
                if local and act.key in received:
                    raise ValueError(f"{where}: input is local but was also received")
                done.add(act.key)


def _check_deadlock(sched: Schedule) -> None:
    """Symbolic execution: SEND never blocks, RECV blocks until its SEND was issued."""
    pos = [0] * sched.num_stages
    issued: set[tuple[int, int, Key]] = set()
    progress = True
    while progress:
        progress = False
        for stage, acts in enumerate(sched.actions):
            while pos[stage] < len(acts):
                act = acts[pos[stage]]
                if act.op is Op.RECV and (act.peer, stage, act.key) not in issued:
                    break
                if act.op is Op.SEND:
                    issued.add((stage, act.peer, act.key))
                pos[stage] += 1
                progress = True
    stuck = [
        f"stage {s} at {acts[pos[s]]} (#{pos[s]})"
        for s, acts in enumerate(sched.actions)
        if pos[s] < len(acts)
    ]
    if stuck:
        raise ValueError(f"schedule {sched.name!r} deadlocks: " + "; ".join(stuck))
