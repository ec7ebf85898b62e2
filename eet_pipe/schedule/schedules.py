"""Built-in pipeline schedules: pure functions from shape parameters to a :class:`Schedule`.

All schedules are forward-only (inference). RECV is placed immediately before the F that consumes
it and SEND immediately after the F that produces it. See ``actions.py`` for message keys.
"""

from __future__ import annotations

import functools

from eet_pipe.schedule.actions import Action, Op, Schedule
from eet_pipe.schedule.simulate import ComputeCost, simulate

__all__ = [
    "SCHEDULES",
    "build",
    "clock_table",
    "decode",
    "gpipe",
    "interleaved",
    "sequential",
]

SCHEDULES: tuple[str, ...] = ("sequential", "gpipe", "interleaved", "decode")
"""Names accepted by :func:`build`."""


def _check_int(name: str, value: object, minimum: int) -> None:
    """Raise ValueError unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid: must be an integer >= {minimum}")


def _forward_with_comm(mb: int, chunk: int, num_stages: int, num_chunks: int) -> list[Action]:
    """[RECV], F, [SEND] for ``chunk`` of a chain ``0 .. num_chunks-1`` placed round-robin."""
    acts: list[Action] = []
    if chunk > 0 and num_stages > 1:
        acts.append(Action(Op.RECV, mb, chunk, peer=(chunk - 1) % num_stages))
    acts.append(Action(Op.FORWARD, mb, chunk))
    if chunk < num_chunks - 1 and num_stages > 1:
        acts.append(Action(Op.SEND, mb, chunk + 1, peer=(chunk + 1) % num_stages))
    return acts


def sequential(num_stages: int) -> Schedule:
    """One microbatch (the whole batch) passed down the pipe: stage s does [R], F, [S].

    Args:
        num_stages: P >= 1.

    Returns:
        The validated schedule.
    """
    _check_int("num_stages", num_stages, 1)
    actions = [_forward_with_comm(0, s, num_stages, num_stages) for s in range(num_stages)]
    sched = Schedule("sequential", num_stages, 1, 1, 1, actions)
    sched.validate()
    return sched


def gpipe(num_stages: int, num_microbatches: int) -> Schedule:
    """GPipe forward: every stage does [R(mb)], F(mb), [S(mb)] for mb = 0 .. M-1.

    Args:
        num_stages: P >= 1.
        num_microbatches: M >= 1.

    Returns:
        The validated schedule.
    """
    _check_int("num_stages", num_stages, 1)
    _check_int("num_microbatches", num_microbatches, 1)
    actions = [
        [a for mb in range(num_microbatches)
         for a in _forward_with_comm(mb, s, num_stages, num_stages)]
        for s in range(num_stages)
    ]
    sched = Schedule("gpipe", num_stages, num_microbatches, 1, 1, actions)
    sched.validate()
    return sched


def _rounds(num_stages: int, num_microbatches: int) -> list[list[int]]:
    """Split microbatches 0..M-1 into max(1, M // P) consecutive rounds of near-equal size.

    As ``ScheduleInterleaved1F1B``: every round holds >= P microbatches when M >= P (so device 0
    never waits for the wrap-around), sizes differ by at most one, larger rounds first. Equals
    rounds of exactly P when P divides M; a single round of M when M < P.
    """
    count = max(1, num_microbatches // num_stages)
    base, extra = divmod(num_microbatches, count)
    rounds: list[list[int]] = []
    start = 0
    for r in range(count):
        size = base + (1 if r < extra else 0)
        rounds.append(list(range(start, start + size)))
        start += size
    return rounds


def interleaved(num_stages: int, num_microbatches: int, virtual: int) -> Schedule:
    """Interleaved (virtual-stage) forward, depth-first as Megatron / ``ScheduleInterleaved1F1B``.

    Chunk c lives on device c % P. Microbatches go in consecutive rounds (see :func:`_rounds`:
    rounds of P when P divides M); device d runs, per round, its chunks ``d + k*P`` for
    k = 0 .. v-1, each over the round's microbatches. With chunk cost 1/v the bubble is exactly
    (P-1) / (v*M + P-1) for every M >= P.

    Args:
        num_stages: P >= 1.
        num_microbatches: M >= 1.
        virtual: v >= 2 chunks per device.

    Returns:
        The validated schedule.
    """
    _check_int("num_stages", num_stages, 1)
    _check_int("num_microbatches", num_microbatches, 1)
    _check_int("virtual", virtual, 2)
    num_chunks = num_stages * virtual
    rounds = _rounds(num_stages, num_microbatches)
    actions = [
        [a for mbs in rounds for k in range(virtual) for mb in mbs
         for a in _forward_with_comm(mb, d + k * num_stages, num_stages, num_chunks)]
        for d in range(num_stages)
    ]
    sched = Schedule("interleaved", num_stages, num_microbatches, virtual, 1, actions)
    sched.validate()
    return sched


def _decode_stage(stage: int, num_stages: int, groups: int, steps: int, virtual: int = 1) -> list[Action]:
    """Program of one stage of :func:`decode`: for t, for local chunk k, for g."""
    num_chunks = num_stages * virtual
    last = num_chunks - 1
    multi = num_stages > 1
    acts: list[Action] = []
    for t in range(steps):
        for k in range(virtual):
            chunk = stage + k * num_stages
            for g in range(groups):
                if multi and (chunk > 0 or t > 0):
                    acts.append(Action(Op.RECV, g, chunk, t, peer=(stage - 1) % num_stages))
                acts.append(Action(Op.FORWARD, g, chunk, t))
                if multi and chunk < last:
                    acts.append(Action(Op.SEND, g, chunk + 1, t, peer=(stage + 1) % num_stages))
                elif multi and t < steps - 1:
                    acts.append(Action(Op.SEND, g, 0, t + 1, peer=0))
    return acts


def decode(num_stages: int, groups: int, steps: int, virtual: int = 1) -> Schedule:
    """Microbatched autoregressive decoding with ``groups`` groups in flight.

    Step t of group g runs through all chunks; the stage of the last chunk samples the next tokens and
    sends them back to stage 0 as message ``(g, chunk=0, step=t+1)``. Order on every stage: for t,
    for local chunk, for g. With P == 1 there are no messages; the feedback is local. With
    ``virtual`` > 1 each device holds chunks d, d+P, … as in the interleaved schedule.

    Args:
        num_stages: P >= 1.
        groups: G >= 1 (G >= P keeps every stage busy).
        steps: decode steps >= 1 (step 0 is the prefill of each group).
        virtual: chunks per device (1 = contiguous stages).

    Returns:
        The validated schedule.
    """
    _check_int("num_stages", num_stages, 1)
    _check_int("groups", groups, 1)
    _check_int("steps", steps, 1)
    _check_int("virtual", virtual, 1)
    actions = [_decode_stage(s, num_stages, groups, steps, virtual) for s in range(num_stages)]
    sched = Schedule("decode", num_stages, groups, virtual, steps, actions)
    sched.validate()
    return sched


def _require_default(name: str, value: object, default: int, schedule: str) -> None:
    """Reject a parameter the chosen schedule does not use unless it has its default."""
    if value != default:
        raise ValueError(
            f"{name}={value!r} is not used by schedule {schedule!r}: must be {default}"
        )


def build(name: str, num_stages: int, microbatches: int = 1, virtual: int = 1,
          steps: int = 1) -> Schedule:
    """Build a schedule by name. Forward schedules are validated once and cached (callers share the
    result and must not modify it: building and validating an interleaved schedule of 4 stages x 32
    microbatches takes milliseconds, which every forward command would otherwise spend before its first
    action); decode schedules grow with the number of steps and are built per call.

    Args:
        name: one of :data:`SCHEDULES`.
        num_stages: P >= 1.
        microbatches: M >= 1 (decode: groups in flight; sequential: must be 1).
        virtual: chunks per stage; >= 2 for "interleaved", else 1.
        steps: decode steps >= 1; 1 for the other schedules.

    Returns:
        The validated schedule.
    """
    check_args(name, num_stages, microbatches, virtual, steps)  # before the cache: 2.0 == 2 there
    if name == "decode":
        return _build(name, num_stages, microbatches, virtual, steps)
    return _build_cached(name, num_stages, microbatches, virtual, steps)


def check_args(name: str, num_stages: int, microbatches: int = 1, virtual: int = 1, steps: int = 1) -> None:
    """Raise ValueError, naming the parameter, unless `build` accepts these arguments. Callers that start
    processes check here first, so a bad combination fails before anything is spawned."""
    if name not in SCHEDULES:
        raise ValueError(f"name={name!r} is not a known schedule: allowed {', '.join(SCHEDULES)}")
    _check_int("num_stages", num_stages, 1)
    _check_int("microbatches", microbatches, 1)
    _check_int("virtual", virtual, 2 if name == "interleaved" else 1)
    _check_int("steps", steps, 1)
    if name not in ("interleaved", "decode"):
        _require_default("virtual", virtual, 1, name)
    if name != "decode":
        _require_default("steps", steps, 1, name)
    if name == "sequential":
        _require_default("microbatches", microbatches, 1, name)


def _build(name: str, num_stages: int, microbatches: int, virtual: int, steps: int) -> Schedule:
    if name == "sequential":
        return sequential(num_stages)
    if name == "gpipe":
        return gpipe(num_stages, microbatches)
    if name == "interleaved":
        return interleaved(num_stages, microbatches, virtual)
    return decode(num_stages, microbatches, steps, virtual)


_build_cached = functools.lru_cache(maxsize=64)(_build)


def clock_table(schedule: Schedule, costs: ComputeCost | None = None) -> str:
    """Render the per-stage forward timeline as a text table.

    Columns are the intervals between consecutive start/end times of any forward (simulated with
    ``costs``, default 1.0 per chunk, zero transfer); a cell shows the forward running there or '.'.

    Args:
        schedule: the schedule to render.
        costs: forward cost as accepted by ``simulate(compute=...)``.

    Returns:
        Text, one header line with column start times then one line per stage.
    """
    result = simulate(schedule, 1.0 if costs is None else costs)
    forwards = [(s, a, b, act) for s, a, b, act in result.timeline if act.op is Op.FORWARD]
    edges = sorted({round(t, 9) for _, a, b, _ in forwards for t in (a, b)})
    width = max([len(str(f[3])) for f in forwards] + [len(f"{t:g}") for t in edges] + [1])
    cells = [["." for _ in edges[:-1]] for _ in range(schedule.num_stages)]
    for stage, start, end, act in forwards:
        for col, t in enumerate(edges[:-1]):
            if round(start, 9) <= t < round(end, 9):
                cells[stage][col] = str(act)
    head = "t".ljust(9) + " ".join(f"{t:g}".ljust(width) for t in edges[:-1])
    rows = [f"stage {s}".ljust(9) + " ".join(c.ljust(width) for c in row)
            for s, row in enumerate(cells)]
    return "\n".join([head.rstrip()] + [r.rstrip() for r in rows])

