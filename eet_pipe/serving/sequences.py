"""Requests and sequences as the scheduler sees them, and the events they send to the HTTP side.

A `GenRequest` holds one `Sequence` per choice (prompts x n). The scheduler thread reports progress
through the request's `sink` (thread-safe; the HTTP side turns events into SSE chunks or a response).
`TextStream` turns a growing token list into text deltas that never show a stop string or half of
a multi-byte character.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from eet_pipe.generation.sequences import IncrementalDecoder, SamplingParams

__all__ = ["Event", "GenRequest", "Sequence", "TextStream", "Logprob"]

Logprob = tuple[int, float, list[tuple[int, float]]]
"""(sampled token, its log-probability, [(alternative token, log-probability), ...])."""

_ids = itertools.count()


@dataclass
class Event:
    """Something that happened to a request: 'token' (a text delta), 'finish' (a choice ended),
    'done' (every choice ended; carries usage) or 'error' (HTTP status and message; `error_id` names
    the server log entry of an internal error)."""

    kind: str
    index: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprob] = field(default_factory=list)
    finish_reason: str | None = None
    status: int = 200
    message: str = ""
    usage: dict | None = None
    error_id: str | None = None


class TextStream:
    """Incremental detokenization for a stream: `update` gives the new, final part of the text only,
    holding back what could still become a stop string (`IncrementalDecoder` decodes a short window of
    tokens per update, not the whole output)."""

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str]) -> None:
        self.detok = IncrementalDecoder(decode)
        self.hold = max((len(s) for s in stop), default=1) - 1  # a stop string may be forming at the end
        self.emitted = ""

    def update(self, tokens: list[int]) -> str:
        self.detok.update(tokens)
        text = self.detok.text
        safe = text[: len(text) - self.hold] if self.hold else text
        if len(safe) <= len(self.emitted) or not safe.startswith(self.emitted):
            return ""
        delta, self.emitted = safe[len(self.emitted):], safe
        return delta

    def finish(self, final: str) -> str:
        delta = final[len(self.emitted):] if final.startswith(self.emitted) else ""
        self.emitted = final
        return delta


class Sequence:
    """One choice of a request: its prompt, sampling parameters, slot and output so far."""

    def __init__(self, request: GenRequest, index: int, prompt: list[int], params: SamplingParams,
                 decode: Callable[[list[int]], str]) -> None:
        self.request, self.index, self.prompt, self.params = request, index, prompt, params
        self.decode = decode
        self.slot: int | None = None
        self.tokens: list[int] = []
        self.issued = 0
        """Tokens asked of the pipeline so far (steps issued for this sequence; ahead of `tokens`)."""
        self.stream = TextStream(decode, params.stop)
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.finished = False

    @property
    def next_column(self) -> int:
        """Cache column (= position) of the token fed in the next decode step (issued before the host
        knows the tokens of the steps in flight)."""
        return len(self.prompt) + self.issued - 1

    def on_token(self, token: int, logprob: tuple[float, list[tuple[int, float]]] | None, last: bool) -> Event:
        """Record a sampled token (`logprob`: its log-probability and the alternatives, if requested).
        The `last` token's text comes with `on_finish` (it may complete a stop string)."""
        now = time.monotonic()
        self.first_at = self.first_at or now
        self.last_at = now
        self.tokens.append(token)
        delta = "" if last else self.stream.update(self.tokens)
        return Event("token", self.index, delta, [token], [] if logprob is None else [(token, *logprob)])

    def on_finish(self, reason: str, text: str | None) -> Event:
        self.finished = True
        final = text if text is not None else self.decode(self.tokens)
        return Event("finish", self.index, self.stream.finish(final), finish_reason=reason)

    @property
    def tpot(self) -> float | None:
        """Mean seconds between output tokens (None with fewer than two)."""
        if len(self.tokens) < 2 or self.first_at is None or self.last_at is None:
            return None
        return (self.last_at - self.first_at) / (len(self.tokens) - 1)


class GenRequest:
    """An HTTP generation request: prompts x n choices, each a `Sequence`."""

    def __init__(self, prompts: list[list[int]], params: list[SamplingParams], n: int,
                 decode: Callable[[list[int]], str], sink: Callable[[Event], None],
                 logprobs: int | None = None) -> None:
        """`params[k]` belongs to choice k = prompt_index * n + i (so each choice may have its own seed)."""
        self.id = next(_ids)
        self.arrival = time.monotonic()
        self.sink, self.logprobs = sink, logprobs
        self.sequences = [Sequence(self, k, prompts[k // n], params[k], decode) for k in range(len(params))]
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.cancelled = False
        self.closed = False

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.sequences)

    def usage(self) -> dict:
        done = self.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done, "total_tokens": self.prompt_tokens + done}

    def emit(self, event: Event) -> None:
        """Deliver `event` unless the request already ended."""
        if not self.closed:
            if event.kind in ("done", "error"):
                self.closed = True
            self.sink(event)
