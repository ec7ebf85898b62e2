"""Continuous batching over a pipeline: G step groups of KV-cache slots, each scheduled one step ahead.

Slot s belongs to group s % G. A group keeps up to `AHEAD` steps in flight: its step N + 1 is issued
before step N's tokens reach the host. A step's `StepCommand` holds a decode part (the slots and
cache columns of the group's running sequences; their input tokens are the ones the last stage fed
back to stage 0 on the devices) plus a prefill part (waiting sequences admitted into the group's free
slots, up to an even share over the groups, within `max_prefill_tokens`; where the stages pad prompt
parts to CUDA-graph buckets, cut to a bucket's rows when padding would waste `SNAP_WASTE_TOKENS` or more).
Commands of different groups queue up on every stage, so with G >= P groups in flight the stages work on
different groups at once.

The host learns a step's tokens one step late, for streaming and stop checks only. A sequence that
ended (EOS, stop string, cancel) in step N has already been issued into step N + 1: that extra token
is discarded and its slot returns to the group when step N's result arrives (a slot is cleared on
every stage before reuse, and results are routed by the step they belong to, so a reused slot never
gets a stale token). `max_tokens` is known ahead: a sequence is never issued past it.

All of this runs on one thread (`run`); the HTTP side only calls `submit` and `cancel`.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from itertools import islice
from typing import Any

import torch

from eet_pipe.runtime.step_parts import SeqInit, StepCommand, StepPart
from eet_pipe.runtime.supervisor import WorkerError
from eet_pipe.serving.driver import StepDriver
from eet_pipe.serving.metrics import Metrics
from eet_pipe.serving.sequences import Event, GenRequest, Sequence

__all__ = ["Scheduler", "QueueFullError", "ServiceUnavailableError", "AHEAD"]

log = logging.getLogger("eet_pipe.serve")

AHEAD = 2
"""Steps a group keeps in flight: 2 = the next step is issued before the previous one's tokens are known."""

SNAP_WASTE_TOKENS = 512
"""A prompt part whose padding rows (padded rows - rows, times the padded width) would hold at least this many
tokens is cut to the largest row bucket it fills; the rest lead the next step's part. A prefill forward costs
about a fixed weight pass plus a time per (padded) token; on an H100 the fixed part is worth about 300 tokens
of GPT-2 XL work (a step trace at 256 clients: 32 rows x 64 tokens 16 ms, 35 rows run as 64: 31 ms), so
cutting pays above that."""

IDLE_CHECK_S = 0.1
"""With nothing in flight, the scheduler checks the pipeline's health this often until work arrives."""


class QueueFullError(RuntimeError):
    """Too many sequences are waiting for a slot (HTTP 429)."""


class ServiceUnavailableError(RuntimeError):
    """The pipeline failed or the server is stopping (HTTP 503)."""


class Scheduler:
    """Admission, slot assignment and step issuing for a `StepDriver`; see the module docstring."""

    def __init__(self, driver: StepDriver, max_queue: int, max_prefill_tokens: int, metrics: Metrics,
                 ahead: int = AHEAD, prefill_wait: float = 0.0,
                 prompt_padding: Callable[[int, int], tuple[int, int]] | None = None) -> None:
        setup = driver.setup
        self.driver, self.metrics, self.ahead = driver, metrics, max(1, ahead)
        self.max_queue, self.max_prefill_tokens = max_queue, max_prefill_tokens
        self.prefill_wait = prefill_wait
        """Seconds a partial admission may wait while other sequences keep the pipeline busy (see `_admit`)."""
        self.prompt_padding = prompt_padding
        """The stages' padded shape of a prompt part (`driver.prompt_padding`); None when they run it as it is."""
        self.groups, self.eos_ids = setup.groups, setup.eos_ids
        self.free_slots = [deque(range(g, setup.max_slots, self.groups)) for g in range(self.groups)]
        self.running: list[dict[int, Sequence]] = [{} for _ in range(self.groups)]
        self.inflight: list[deque[tuple[int, dict[int, Sequence]]]] = [deque() for _ in range(self.groups)]
        """Per group: (step, {slot: sequence}) of each step in flight, oldest first."""
        self.waiting: deque[Sequence] = deque()
        self.active: dict[int, GenRequest] = {}
        self.pending_free: list[int] = []
        self.lock = threading.Lock()
        self.inbox: deque[tuple[str, GenRequest]] = deque()
        self.wake = threading.Event()
        self.queued = 0
        """Sequences in the inbox or waiting for a slot (guarded by `lock`)."""
        self.free_total = setup.max_slots
        """Slots holding no sequence (guarded by `lock`)."""
        self.failure: str | None = None
        self.stopping, self.deadline = False, float("inf")
        self.on_failure = lambda message: None
        self.steps = 0
        self.trace = getattr(driver, "trace", None)
        """The step trace (`trace=`), which also records this thread's decisions; None when off."""
        self.thread = threading.Thread(target=self.run, name="eet_pipe-scheduler", daemon=True)

    # ---- called from the HTTP side (any thread) ----

    def submit(self, request: GenRequest) -> None:
        """Queue a request; raises QueueFullError (429) or ServiceUnavailableError (503)."""
        count = len(request.sequences)
        with self.lock:
            if self.failure is not None:
                raise ServiceUnavailableError(self.failure)
            if self.stopping:
                raise ServiceUnavailableError("the server is shutting down")
            if self.queued + count > self.max_queue + self.free_total:
                raise QueueFullError(f"{max(self.queued - self.free_total, 0)} sequences are already waiting for a "
                                     f"slot (max_queue={self.max_queue}); retry later")
            self.queued += count
            self.inbox.append(("submit", request))
            if self.trace is not None:
                self.trace.instant("submit", sequences=count)
            self.metrics.queue_depth.set(self.queued)  # visible now, even while the scheduler waits on a step
        self.wake.set()

    def cancel(self, request: GenRequest) -> None:
        """Stop a request whose client went away: no event reaches it from now on; its slots are freed at
        the next step boundary."""
        with self.lock:
            request.closed = True
            self.inbox.append(("cancel", request))
        self.wake.set()

    def stop(self, timeout: float) -> None:
        """Refuse new requests, let running ones finish for up to `timeout` s, then stop the pipeline."""
        with self.lock:
            self.stopping, self.deadline = True, time.monotonic() + timeout
        self.wake.set()
        if self.thread.is_alive():
            self.thread.join(timeout + 10.0)
        self.driver.close()

    # ---- the scheduler thread ----

    def run(self) -> None:
        """Issue steps and hand out results until stopped or the pipeline fails."""
        try:
            while True:
                self.wake.clear()
                self._drain_inbox()
                if self._finished():
                    break
                began = time.perf_counter()
                self._issue()
                self._update_gauges()
                if any(self.inflight):
                    host = time.perf_counter() - began
                    payload = self.driver.collect()
                    began = time.perf_counter()
                    self._on_result(payload)
                    self.metrics.step_host.observe(host + time.perf_counter() - began)
                else:
                    # before waiting: the server's driver sends what the last result produced here (the
                    # final tokens and ends of requests), which must not wait for the next request
                    self.driver.check_alive()
                    self.wake.wait(IDLE_CHECK_S)
        except WorkerError as err:
            self._fail(f"the pipeline failed: {err}")
        except Exception as err:  # noqa: BLE001 - any scheduler bug must fail every request, never hang them
            log.exception("scheduler error")
            self._fail(f"internal scheduler error: {type(err).__name__}: {err}")

    def _drain_inbox(self) -> None:
        with self.lock:
            items = list(self.inbox)
            self.inbox.clear()
        if self.trace is not None and items:
            self.trace.instant("inbox", submits=sum(kind == "submit" for kind, _ in items),
                               cancels=sum(kind == "cancel" for kind, _ in items))
        for kind, req in items:
            if kind == "cancel":
                self._cancel(req)
            else:
                self.active[req.id] = req
                self.waiting.extend(req.sequences)
                self.metrics.prompt_tokens.inc(req.prompt_tokens)

    def _finished(self) -> bool:
        if not self.stopping:
            return False
        busy = self.waiting or any(self.running) or any(self.inflight)
        if busy and time.monotonic() < self.deadline:
            return False
        for req in list(self.active.values()):
            self._error(req, 503, "the server is shutting down")
        return True

    def _issue(self) -> None:
        # with `prefill_wait`, partial admissions wait while some group still has tokens to issue
        # (not while stopping: the drain deadline would end the held-back requests)
        decoding = self.prefill_wait > 0 and not self.stopping and any(
            s.issued < s.params.max_new_tokens for running in self.running for s in running.values())
        for g in range(self.groups):
            while len(self.inflight[g]) < self.ahead:
                cmd = self._build(g, decoding)
                if cmd is None:
                    break
                self.driver.send(cmd)

    def _admission(self, g: int) -> tuple[int, bool]:
        """How many waiting sequences one prefill part of group g takes (within `max_prefill_tokens`, the
        group's free slots and its share, `_room`), and whether that part is full (no further prompt as wide
        could join it: a part cut by the share is not, since the share grows with the sequences waiting)."""
        count = width = 0
        free = len(self.free_slots[g])
        room = min(free, self._room(g))
        for seq in self.waiting:
            if count == room:
                return count, count == free
            width = max(width, len(seq.prompt))
            if count and (count + 1) * width > self.max_prefill_tokens:
                return count, True
            count += 1
        return count, count == free or (count + 1) * width > self.max_prefill_tokens

    def _room(self, g: int) -> int:
        """How many waiting sequences group g may take: up to an even share (rounded up) of all running and
        waiting ones. Groups of even size pad their decode parts least (a part runs as the next row bucket: 33
        rows as 64) and keep the pipeline's microbatches alike; a sequence left to another group joins it at
        that group's next step. When there are more sequences than slots the share is at least a group's
        capacity, so the share never leaves a slot empty that a waiting sequence could take."""
        share = -(-(sum(len(r) for r in self.running) + len(self.waiting)) // self.groups)
        return max(share - len(self.running[g]), 0)

    def _snapped(self, count: int) -> int:
        """`count` waiting prompts, or fewer: the largest count the stages run unpadded (a row bucket) when
        padding `count` rows would add at least SNAP_WASTE_TOKENS padded tokens."""
        if self.prompt_padding is None or count < 2:
            return count
        widths = []  # widths[n - 1]: the part's width with the first n prompts
        for seq in islice(self.waiting, count):
            widths.append(max(len(seq.prompt), widths[-1] if widths else 0))
        rows, width = self.prompt_padding(count, widths[-1])
        if (rows - count) * width < SNAP_WASTE_TOKENS:
            return count
        for n in range(count - 1, 0, -1):
            if self.prompt_padding(n, widths[n - 1])[0] == n:
                return n
        return count

    def _admit(self, g: int, decoding: bool) -> list[Sequence]:
        """Waiting sequences admitted into group g's free slots, as one prefill part. While `decoding` (some
        group still has tokens to issue), a part that is not full waits until its oldest sequence has
        waited `prefill_wait` seconds: each prefill part is a full pass over the weights, so many small
        ones cost more than one full one, and sequences admitted together finish together, so the next
        admissions come together too. An idle pipeline admits at once."""
        count, full = self._admission(g)
        if (count and decoding and not full
                and time.monotonic() - self.waiting[0].request.arrival < self.prefill_wait):
            return []
        count = self._snapped(count)  # what goes now, cut to a row bucket where padding would waste
        new: list[Sequence] = []
        for _ in range(count):
            seq = self.waiting.popleft()
            seq.slot = self.free_slots[g].popleft()
            self.running[g][seq.slot] = seq
            new.append(seq)
        with self.lock:
            self.queued -= len(new)
            self.free_total -= len(new)
        return new

    def _build(self, g: int, decoding: bool) -> StepCommand | None:
        decode = [s for s in self.running[g].values() if s.issued < s.params.max_new_tokens]
        new = self._admit(g, decoding)
        parts = []
        if decode:
            parts.append(StepPart(slots=torch.tensor([s.slot for s in decode]), tokens=None,
                                  lengths=torch.ones(len(decode), dtype=torch.long),
                                  start=torch.tensor([s.next_column for s in decode])))
        if new:
            width = max(len(s.prompt) for s in new)
            tokens = torch.zeros(len(new), width, dtype=torch.long)
            for row, s in enumerate(new):
                tokens[row, : len(s.prompt)] = torch.tensor(s.prompt)
            parts.append(StepPart(slots=torch.tensor([s.slot for s in new]), tokens=tokens,
                                  lengths=torch.tensor([len(s.prompt) for s in new]),
                                  start=torch.zeros(len(new), dtype=torch.long)))
        if not parts:
            return None
        for s in [*decode, *new]:
            s.issued += 1
        reused = {s.slot for s in new}
        free, self.pending_free = [s for s in self.pending_free if s not in reused], []
        self.steps += 1
        self.inflight[g].append((self.steps, {s.slot: s for s in [*decode, *new]}))
        inits = {s.slot: SeqInit(s.params, self.eos_ids, s.request.logprobs) for s in new}
        if self.trace is not None:
            self.trace.instant("issue", step=self.steps, group=g, decode=len(decode), new=len(new),
                               waiting=len(self.waiting))
        return StepCommand(group=g, parts=parts, new=inits, free=free, step=self.steps)

    def _on_result(self, payload: dict) -> None:
        g = payload["group"]
        step, members = self.inflight[g].popleft()
        if step != payload["step"]:
            raise RuntimeError(f"group {g}: result of step {payload['step']} arrived while step {step} was the "
                               "oldest in flight")
        self.metrics.steps.inc()
        if self.trace is not None:
            self.trace.instant("result", step=step, group=g, tokens=len(payload["tokens"]),
                               finished=len(payload["finished"]))
        live = {slot: seq for slot, seq in members.items() if not seq.finished and not seq.request.cancelled}
        self.metrics.generation_tokens.inc(len(payload["tokens"]))
        for slot, token in payload["tokens"].items():
            seq = live.get(slot)
            if seq is not None:
                self._guarded(seq, self._on_token, token, payload["logprobs"].get(slot), slot in payload["finished"])
        for slot, reason in payload["finished"].items():
            seq = live.get(slot)
            if seq is not None and not seq.finished:
                self._release(seq, clear=False)
                self._guarded(seq, self._finish, reason, payload["text"].get(slot))
        for slot, error_id in payload.get("errors", {}).items():
            seq = live.get(slot)
            if seq is not None and not seq.finished:
                self._sequence_failed(seq, error_id)

    def _on_token(self, seq: Sequence, token: int, logprob: tuple | None, last: bool) -> None:
        seq.request.emit(seq.on_token(token, logprob, last))
        if len(seq.tokens) == 1:
            self.metrics.ttft.observe(seq.first_at - seq.request.arrival)

    def _guarded(self, seq: Sequence, work: Any, *args: Any) -> None:
        """Host work of one sequence; an error in it fails that sequence's request only."""
        try:
            work(seq, *args)
        except Exception:  # noqa: BLE001 - one sequence's bad state must not stop the server
            error_id = uuid.uuid4().hex[:12]
            log.exception("request %d: sequence %d failed in the scheduler (error id %s)", seq.request.id,
                          seq.index, error_id)
            self._sequence_failed(seq, error_id)

    def _sequence_failed(self, seq: Sequence, error_id: str) -> None:
        """One sequence failed (its traceback is logged under `error_id`): its request ends with a 500 and
        its other sequences are cancelled; every other request goes on."""
        req = seq.request
        log.error("request %d: sequence %d failed (error id %s)", req.id, seq.index, error_id)
        self._error(req, 500, f"internal error while generating (error id {error_id})", error_id)
        self._cancel(req)

    def _finish(self, seq: Sequence, reason: str, text: str | None) -> None:
        req = seq.request
        req.emit(seq.on_finish(reason, text))
        if seq.tpot is not None:
            self.metrics.tpot.observe(seq.tpot)
        if all(s.finished for s in req.sequences):
            self.metrics.latency.observe(time.monotonic() - req.arrival)
            req.emit(Event("done", usage=req.usage()))
            self.active.pop(req.id, None)

    def _release(self, seq: Sequence, clear: bool) -> None:
        """Give the slot of `seq` back to its group. Steps still in flight that hold the slot are harmless:
        their tokens are routed to `seq` (and dropped), and every stage clears the slot before it is reused."""
        g = seq.slot % self.groups
        del self.running[g][seq.slot]
        self.free_slots[g].append(seq.slot)
        with self.lock:
            self.free_total += 1
        if clear:
            self.pending_free.append(seq.slot)
        seq.finished = True

    def _cancel(self, req: GenRequest) -> None:
        req.cancelled = True
        req.closed = True
        self.active.pop(req.id, None)
        for seq in req.sequences:
            if seq.finished:
                continue
            if seq.slot is None:
                self.waiting.remove(seq)
                with self.lock:
                    self.queued -= 1
                seq.finished = True
            else:
                self._release(seq, clear=True)

    def _error(self, req: GenRequest, status: int, message: str, error_id: str | None = None) -> None:
        req.emit(Event("error", status=status, message=message, error_id=error_id))
        self.active.pop(req.id, None)

    def _fail(self, message: str) -> None:
        with self.lock:
            self.failure = message
            items = [req for kind, req in self.inbox if kind == "submit"]
            self.inbox.clear()
        for req in [*self.active.values(), *items]:
            self._error(req, 503, message)
        self.driver.close()
        self.on_failure(message)

    def _update_gauges(self) -> None:
        self.metrics.queue_depth.set(self.queued)
        self.metrics.running.set(sum(len(r) for r in self.running))
        for rank, frac in self.driver.stage_busy.items():
            self.metrics.busy.set(frac, stage=str(rank))
