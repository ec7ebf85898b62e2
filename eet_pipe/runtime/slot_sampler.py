"""Per-slot sampling and stopping on the last stage of a serving pipeline.

Tokens are drawn on the logits' device (`eet_pipe.generation.sampling`: every parameter is a per-slot tensor);
`sample_async` returns them on the device (the pipeline feeds them back to stage 0 from there) and a
`PendingTokens` whose host copies are read one step later by `resolve`, which applies EOS, stop
strings and `max_tokens` (`SequenceState`) and fills the result payload. An error in one slot's host
work fails that slot alone: it is logged under an error id, which the payload carries in "errors".
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from eet_pipe.generation.sampling import SamplingTable, top_logprobs
from eet_pipe.generation.sequences import HostCopy, SequenceState

__all__ = ["SlotSampler", "PendingTokens", "new_payload"]

log = logging.getLogger("eet_pipe.runtime")


def new_payload(group: int, step: int) -> dict[str, Any]:
    """An empty result payload of one step (what the scheduler reads)."""
    return {"group": group, "step": step, "tokens": {}, "finished": {}, "text": {}, "logprobs": {}, "errors": {}}


@dataclass
class _Seq:
    state: SequenceState
    logprobs: int | None


@dataclass
class PendingTokens:
    """One step's sampled tokens on their way to the host."""

    rows: list[tuple[int, _Seq | None]]
    """(slot, sequence) of every sampled row, as they were when the step ran."""
    tokens: HostCopy
    logprobs: list[HostCopy] = field(default_factory=list)
    """Chosen log-probabilities [L], top ids [L, k] and their values [L, k] of the rows in `lp_rows`."""
    lp_rows: list[int] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)
    """Slots that failed while this step started them: error ids."""

    def ready(self) -> bool:
        """Whether reading the copies would not wait for the device: the last one (log-probabilities when a
        row asked for them, recorded after the tokens' copy on the same stream) has landed."""
        last = self.logprobs[-1] if self.logprobs else self.tokens
        return last.event is None or last.event.query()


class SlotSampler:
    """Per-slot sampling state on the last stage; slots outlive steps."""

    def __init__(self, decode: Callable[[list[int]], str] | None, device: torch.device | str = "cpu",
                 slots: int = 0, upload: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None) -> None:
        self.decode = decode
        self.table = SamplingTable(slots, device, upload)
        self.slots: dict[int, _Seq] = {}
        self.errors: dict[int, str] = {}

    def _fail(self, slot: int, errors: dict[int, str]) -> None:
        error_id = uuid.uuid4().hex[:12]
        log.exception("sequence in slot %d failed on this stage (error id %s)", slot, error_id)
        errors[slot] = error_id
        self.slots.pop(slot, None)

    def start(self, new: dict[int, Any]) -> None:
        """Begin the sequences of `new` ({slot: SeqInit}), replacing whatever held those slots."""
        started = {}
        for slot, init in new.items():
            try:
                self.slots[slot] = _Seq(SequenceState(init.params, list(init.eos_ids), self.decode), init.logprobs)
                started[slot] = init.params
            except Exception:  # noqa: BLE001 - one sequence's bad state fails that sequence only
                self._fail(slot, self.errors)
        try:
            self.table.set(list(started), list(started.values()))
        except Exception:  # noqa: BLE001 - find the slot(s) at fault, fail them only
            for slot, params in started.items():
                try:
                    self.table.set([slot], [params])
                except Exception:  # noqa: BLE001
                    self._fail(slot, self.errors)

    def drop(self, slots: list[int]) -> None:
        for s in slots:
            self.slots.pop(s, None)

    def sample_async(self, logits: torch.Tensor, slots: list[int],
                     slots_d: torch.Tensor | None = None) -> tuple[torch.Tensor, PendingTokens]:
        """Draw the next token of every row of logits [B, V] (rows = `slots`; `slots_d` the same on the
        device). Returns the tokens [B] on the device and their pending host copy."""
        if slots_d is None:
            slots_d = self.table.upload([torch.tensor(slots, dtype=torch.long)])[0]
        tokens = self.table.sample(logits, slots_d, slots)
        rows = [(s, self.slots.get(s)) for s in slots]
        pending = PendingTokens(rows, HostCopy(tokens))
        pending.lp_rows = [i for i, (_, q) in enumerate(rows) if q is not None and q.logprobs is not None]
        if pending.lp_rows:
            k = max(1, max(rows[i][1].logprobs for i in pending.lp_rows))
            idx = self.table.upload([torch.tensor(pending.lp_rows, dtype=torch.long)])[0]
            pending.logprobs = [HostCopy(t) for t in top_logprobs(logits[idx], tokens[idx], k)]
        pending.errors, self.errors = self.errors, {}
        return tokens, pending

    def resolve(self, pending: PendingTokens, out: dict[str, Any]) -> None:
        """Record a step's tokens (read from the host copies) into the sequences and the payload `out`."""
        tokens = pending.tokens.tolist()
        chosen, ids, values = (h.tolist() for h in pending.logprobs) if pending.logprobs else ([], [], [])
        lp_of = {row: n for n, row in enumerate(pending.lp_rows)}
        errors = out.setdefault("errors", {})
        errors.update(pending.errors)
        for i, (slot, seq) in enumerate(pending.rows):
            if seq is None or self.slots.get(slot) is not seq:  # finished, cancelled or replaced since
                continue
            try:
                lp = None
                if i in lp_of:
                    n = lp_of[i]
                    lp = (chosen[n], list(zip(ids[n], values[n], strict=True))[: seq.logprobs])
                self._record(slot, seq, tokens[i], lp, out)
            except Exception:  # noqa: BLE001 - one sequence's host work fails that sequence only
                self._fail(slot, errors)

    def _record(self, slot: int, seq: _Seq, token: int, lp: tuple | None, out: dict[str, Any]) -> None:
        state = seq.state
        before = len(state.tokens)
        state.append(token)
        if len(state.tokens) > before:
            out["tokens"][slot] = token
            if lp is not None:
                out["logprobs"][slot] = lp
        if state.finished:
            out["finished"][slot] = state.finish_reason
            if state.text is not None:
                out["text"][slot] = state.text
            del self.slots[slot]

    def sample(self, logits: torch.Tensor, slots: list[int], out: dict[str, Any]) -> torch.Tensor:
        """`sample_async` and `resolve` at once (waits for the copies); returns the tokens on the device."""
        tokens, pending = self.sample_async(logits, slots)
        self.resolve(pending, out)
        return tokens
