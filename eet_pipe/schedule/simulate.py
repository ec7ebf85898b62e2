"""Replay a :class:`Schedule` on costs: makespan, per-stage busy time, bubble, timeline.

Model: each stage runs its action list in order on one compute stream. F occupies the stage for
``compute(chunk, mb)``. SEND is issued at the stage's current time and takes no stage time
(communication overlaps on its own stream); the message arrives ``transfer(src, dst)`` later, plus
``sample`` for decode feedback (messages keyed ``chunk == 0, step > 0``). RECV waits until the
message has arrived. With P == 1 decode feedback is local: F(g, 0, t) waits ``sample`` after
F(g, last, t-1) ends. ``sample`` delays the feedback only; it is not counted as busy time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from eet_pipe.schedule.actions import Action, Key, Op, Schedule, producer_of

__all__ = [
    "ComputeCost",
    "SimResult",
    "TransferCost",
    "decode_utilisation",
    "gpipe_bubble",
    "interleaved_bubble",
    "simulate",
]

ComputeCost = float | Sequence[float] | Callable[[int, int], float]
"""Seconds of one F: a scalar, a per-chunk sequence of length P*v, or ``fn(chunk, mb)``."""
TransferCost = float | Callable[[int, int], float]
"""Seconds of one message: a scalar, or ``fn(src_stage, dst_stage)``."""

TimelineEntry = tuple[int, float, float, Action]


@dataclass(frozen=True)
class SimResult:
    """Outcome of :func:`simulate`.

    Attributes:
        makespan: time at which the last stage finishes its last action.
        busy: per stage, total time spent in F.
        bubble: 1 - sum(busy) / (P * makespan).
        timeline: (stage, start, end, action) for every action in execution order per stage.
            F: compute interval. RECV: from reaching the action to the data being available.
            SEND: from issue to arrival at the peer.
    """

    makespan: float
    busy: list[float]
    bubble: float
    timeline: list[TimelineEntry] = field(default_factory=list)

    @property
    def utilisation(self) -> list[float]:
        """Per stage, busy / makespan (0 when makespan is 0)."""
        return [b / self.makespan if self.makespan > 0 else 0.0 for b in self.busy]


def _compute_fn(compute: ComputeCost, num_chunks: int) -> Callable[[int, int], float]:
    """Normalise ``compute`` to ``fn(chunk, mb) -> seconds``."""
    if callable(compute):
        return compute
    if isinstance(compute, (int, float)):
        if compute < 0:
            raise ValueError(f"compute={compute!r} is invalid: must be >= 0")
        value = float(compute)
        return lambda chunk, mb: value
    costs = [float(c) for c in compute]
    if len(costs) != num_chunks or any(c < 0 for c in costs):
        raise ValueError(
            f"compute has {len(costs)} entries {costs[:4]}...: "
            f"need num_stages*virtual={num_chunks} values >= 0"
        )
    return lambda chunk, mb: costs[chunk]


def _transfer_fn(transfer: TransferCost) -> Callable[[int, int], float]:
    """Normalise ``transfer`` to ``fn(src, dst) -> seconds``."""
    if callable(transfer):
        return transfer
    if transfer < 0:
        raise ValueError(f"transfer={transfer!r} is invalid: must be >= 0")
    value = float(transfer)
    return lambda src, dst: value


def _is_feedback(key: Key) -> bool:
    """True for decode feedback: the input of chunk 0 at a step > 0."""
    return key[1] == 0 and key[2] > 0


@dataclass
class _State:
    """Mutable replay state shared by the per-action steps."""

    sched: Schedule
    compute: Callable[[int, int], float]
    transfer: Callable[[int, int], float]
    sample: float
    clock: list[float]
    pos: list[int]
    busy: list[float]
    arrivals: dict[tuple[int, int, Key], float] = field(default_factory=dict)
    f_end: dict[Key, float] = field(default_factory=dict)
    timeline: list[TimelineEntry] = field(default_factory=list)


def _forward(st: _State, stage: int, act: Action) -> None:
    """Run one F on ``stage``, honouring the sampling delay of local decode feedback."""
    start = st.clock[stage]
    source = producer_of(act.key, st.sched.num_chunks)
    local = source is not None and st.sched.stage_of(source[1]) == stage
    if local and _is_feedback(act.key) and source in st.f_end:
        start = max(start, st.f_end[source] + st.sample)  # P == 1: sample, then feed back
    end = start + st.compute(act.chunk, act.mb)
    st.busy[stage] += end - start
    st.f_end[act.key] = end
    st.timeline.append((stage, start, end, act))
    st.clock[stage] = end


def _execute(st: _State, stage: int, act: Action) -> bool:
    """Run ``act`` on ``stage`` if it can proceed; return False when a RECV must wait."""
    now = st.clock[stage]
    if act.op is Op.FORWARD:
        _forward(st, stage, act)
    elif act.op is Op.SEND:
        assert act.peer is not None
        delay = st.sample if _is_feedback(act.key) else 0.0
        arrival = now + delay + st.transfer(stage, act.peer)
        st.arrivals[(stage, act.peer, act.key)] = arrival
        st.timeline.append((stage, now, arrival, act))
    else:
        arrival = st.arrivals.get((act.peer, stage, act.key))
        if arrival is None:
            return False
        st.clock[stage] = max(now, arrival)
        st.timeline.append((stage, now, st.clock[stage], act))
    return True


def simulate(schedule: Schedule, compute: ComputeCost, transfer: TransferCost = 0.0,
             sample: float = 0.0) -> SimResult:
    """Replay ``schedule`` on the given costs.

    Args:
        schedule: the schedule to replay (need not have been validated).
        compute: time of one F (see :data:`ComputeCost`).
        transfer: time of one message over a link (see :data:`TransferCost`).
        sample: extra latency on the decode feedback path (sampling at the last stage).

    Returns:
        The :class:`SimResult`.

    Raises:
        ValueError: on bad costs, or on deadlock (naming the stuck stages and actions).
    """
    if sample < 0:
        raise ValueError(f"sample={sample!r} is invalid: must be >= 0")
    num = schedule.num_stages
    st = _State(schedule, _compute_fn(compute, schedule.num_chunks), _transfer_fn(transfer),
                float(sample), [0.0] * num, [0] * num, [0.0] * num)
    progress = True
    while progress:
        progress = False
        for stage, acts in enumerate(schedule.actions):
            while st.pos[stage] < len(acts) and _execute(st, stage, acts[st.pos[stage]]):
                st.pos[stage] += 1
                progress = True
    stuck = [f"stage {s} at {acts[st.pos[s]]}" for s, acts in enumerate(schedule.actions)
             if st.pos[s] < len(acts)]
    if stuck:
        raise ValueError(f"schedule {schedule.name!r} deadlocks in simulation: " + "; ".join(stuck))
    makespan = max(st.clock, default=0.0)
    bubble = 1.0 - sum(st.busy) / (num * makespan) if makespan > 0 else 0.0
    return SimResult(makespan, st.busy, bubble, st.timeline)


def _check_positive(**params: int) -> None:
    """Raise ValueError naming the first parameter that is not an integer >= 1."""
    for name, value in params.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid: must be an integer >= 1")


def gpipe_bubble(num_stages: int, num_microbatches: int) -> float:
    """Ideal GPipe forward bubble with equal stage costs: (P-1) / (M+P-1)."""
    _check_positive(num_stages=num_stages, num_microbatches=num_microbatches)
    return (num_stages - 1) / (num_microbatches + num_stages - 1)


def interleaved_bubble(num_stages: int, num_microbatches: int, virtual: int) -> float:
    """Ideal interleaved forward bubble, chunk cost 1/v, M % P == 0: (P-1) / (v*M+P-1)."""
    _check_positive(num_stages=num_stages, num_microbatches=num_microbatches, virtual=virtual)
    return (num_stages - 1) / (virtual * num_microbatches + num_stages - 1)


def decode_utilisation(num_stages: int, groups: int) -> float:
    """Steady-state busy fraction of each decode stage with equal costs: min(1, G/P)."""
    _check_positive(num_stages=num_stages, groups=groups)
    return min(1.0, groups / num_stages)
