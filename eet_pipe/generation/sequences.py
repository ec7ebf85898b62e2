"""Generation shared by the single-device model and the pipeline: prompt batching (left padding),
sampling (greedy, temperature, top-k, top-p, seeded), stopping (EOS, stop strings, max tokens).

The loop itself only needs a step function ``(ids [B, T], StepMeta) -> logits [B, V]`` of the last
position, so the pipeline's decode schedule reuses `SamplingParams`, `Sampler`, `pad_prompts` and
`SequenceState` unchanged.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from eet_pipe.generation.sampling import SamplingTable
from eet_pipe.models.meta import StepMeta, decode_meta, prefill_meta

__all__ = ["SamplingParams", "SAMPLING_EPS", "SEED_MIN", "SEED_MAX",
           "Sampler", "SequenceState", "IncrementalDecoder", "GenerationResult", "HostCopy",
           "pad_prompts", "generate_loop", "check_prompts", "StepFn"]

StepFn = Callable[[torch.Tensor, StepMeta], torch.Tensor]


SAMPLING_EPS = 1e-5
"""Temperatures below this are greedy (dividing logits by a smaller one overflows to inf and NaN)."""
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
"""The seeds `torch.Generator.manual_seed` accepts."""


@dataclass
class SamplingParams:
    """How to pick the next tokens of one request."""

    max_new_tokens: int = 32
    """Tokens to generate at most (>= 1)."""
    temperature: float = 0.0
    """0 = greedy; > 0 samples from softmax(logits / temperature). Below `SAMPLING_EPS` (1e-5) is greedy."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = all)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set with cumulative probability >= top_p, in (0, 1]."""
    seed: int | None = None
    """Seed of this request's random generator (sampling only), in SEED_MIN..SEED_MAX."""
    stop: list[str] = field(default_factory=list)
    """Strings that end generation when they appear in the output (they are cut off)."""
    ignore_eos: bool = False
    """Keep generating after an end-of-sequence token."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field (no accepted value can fail in a stage)."""
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} is invalid: must be an integer >= 1")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature={self.temperature!r} is invalid: must be a finite number >= 0 "
                             f"(below {SAMPLING_EPS} = greedy)")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} is invalid: must be an integer >= 0 (0, or any value at least the "
                             "vocabulary size, = no limit)")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:  # NaN fails the comparison too
            raise ValueError(f"top_p={self.top_p!r} is invalid: must be a number in (0, 1]")
        if self.seed is not None and (not _is_int(self.seed) or not SEED_MIN <= self.seed <= SEED_MAX):
            raise ValueError(f"seed={self.seed!r} is invalid: must be an integer in {SEED_MIN}..{SEED_MAX}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop={self.stop!r} is invalid: must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, max_positions: int,
                  max_new_tokens: int = 0) -> None:
    """Raise ValueError for an empty prompt, an id outside the vocabulary or a too-long sequence."""
    if not prompts:
        raise ValueError("no prompts given")
    for n, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {n} is empty: every prompt needs at least one token")
        bad = [t for t in p if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"prompt {n} has token id {bad[0]} outside the vocabulary 0..{vocab_size - 1}")
        if len(p) + max_new_tokens > max_positions:
            raise ValueError(f"prompt {n} has {len(p)} tokens + max_new_tokens={max_new_tokens} = "
                             f"{len(p) + max_new_tokens} > the model's max positions {max_positions}")


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ids [B, T] int64 and mask [B, T] bool."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, p in enumerate(prompts):
        if len(p):
            ids[row, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            mask[row, width - len(p):] = True
    return ids, mask


class Sampler:
    """Picks next tokens for a batch whose rows may have different `SamplingParams`, on the logits' device
    (`eet_pipe.generation.sampling`): row n's k-th token depends only on its logits, its parameters, its seed and k,
    so the same seed gives the same tokens here, in the pipeline and in the server."""

    def __init__(self, params: Sequence[SamplingParams]) -> None:
        self.params = list(params)
        self.table: SamplingTable | None = None
        self._rows: dict[tuple, torch.Tensor] = {}

    def __call__(self, logits: torch.Tensor, rows: Sequence[int] | None = None) -> torch.Tensor:
        """logits [B, V] of the sequences `rows` (default 0..B-1) -> next tokens [B] int64 on the logits' device."""
        rows = list(range(logits.shape[0])) if rows is None else list(rows)
        if self.table is None or self.table.device != logits.device:
            self.table = SamplingTable(len(self.params), logits.device)
            self.table.set(range(len(self.params)), self.params)
        key = (rows[0], len(rows)) if rows == list(range(rows[0], rows[0] + len(rows))) else tuple(rows)
        index = self._rows.get(key)
        if index is None:
            index = self._rows[key] = torch.tensor(rows, dtype=torch.long).to(logits.device, non_blocking=True)
        return self.table.sample(logits, index, rows)


class IncrementalDecoder:
    """The text of a growing token list, decoding a short window per update instead of the whole list
    (which costs O(n) per token, O(n^2) per sequence).

    The window is the context (`context`: the tokens that produced the last text, whose own decode is
    `done`) plus the tokens not read yet; the window's text minus `done` is the new text. A window whose
    text ends in an incomplete UTF-8 sequence waits for more tokens. Tokens that add no text at all
    (special tokens a decoder skips, ids outside a byte vocabulary) are dropped from the window rather
    than kept in it, so a long run of them does not make every later decode longer; they change no text
    around them, so dropping them changes none. `text` is the final text so far: the full decode, less a
    trailing incomplete character.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.text = ""
        self.pending = ""
        """Complete characters decoded after `text` that wait for an incomplete one behind them."""
        self.context: list[int] = []
        self.done = ""
        self.read = 0
        """Tokens of the list taken into account so far."""

    def update(self, tokens: list[int]) -> str:
        """Take the tokens so far (the previous ones plus new ones); returns the text they added."""
        new = tokens[self.read:]
        window = self.decode(self.context + new)
        done = self.done
        self.pending = ""
        if window.endswith("\ufffd"):  # an incomplete UTF-8 sequence may still become a character
            head = window.rstrip("\ufffd")
            self.pending = head[len(done):] if head.startswith(done) else ""
            return ""
        before = len(self.text)
        if window == done:  # the new tokens add no text: leave them out of later windows
            self.read = len(tokens)
        elif window.startswith(done):
            self.text += window[len(done):]
            self.context, self.read = new, len(tokens)
            self.done = self.decode(new)
        else:  # the window's start decodes differently now: resynchronise
            full = self.decode(tokens)
            if full.startswith(self.text):
                self.text = full
            self.context, self.done, self.read = [], "", len(tokens)
        return self.text[before:]


@dataclass
class SequenceState:
    """Progress of one sequence: generated ids, finish reason, stop-string handling."""

    params: SamplingParams
    eos_ids: list[int]
    decode: Callable[[list[int]], str] | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    text: str | None = None
    _detok: IncrementalDecoder | None = field(default=None, init=False, repr=False)
    _searched: int = field(default=0, init=False, repr=False)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token: int) -> None:
        """Record a new token and decide whether the sequence is done."""
        if self.finished:
            return
        if token in self.eos_ids and not self.params.ignore_eos:
            self.finish_reason = "stop"
            return
        self.tokens.append(token)
        if self.params.stop and self.decode is not None:
            if self._detok is None:
                self._detok = IncrementalDecoder(self.decode)
            self._detok.update(self.tokens)
            text = self._detok.text + self._detok.pending
            if len(text) > self._searched:  # a stop string not found before can only end in the new text
                start = max(0, self._searched - max(len(s) for s in self.params.stop) + 1)
                self._searched = len(text)
                hits = [i for i in (text.find(s, start) for s in self.params.stop) if i >= 0]
                if hits:
                    self.text, self.finish_reason = text[: min(hits)], "stop"
                    return
        if len(self.tokens) >= self.params.max_new_tokens:
            self.finish_reason = "length"


@dataclass
class GenerationResult:
    """Output of one prompt."""

    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: str
    text: str | None = None


def results(prompts: Sequence[Sequence[int]], states: Sequence[SequenceState]) -> list[GenerationResult]:
    """Turn finished states into results (text decoded when a decoder was given)."""
    out = []
    for prompt, s in zip(prompts, states, strict=True):
        text = s.text if s.text is not None else (s.decode(s.tokens) if s.decode else None)
        out.append(GenerationResult(list(prompt), list(s.tokens), s.finish_reason or "length", text))
    return out


def generate_loop(step: StepFn, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
                  eos_ids: list[int], decode: Callable[[list[int]], str] | None = None,
                  pad_id: int = 0) -> list[GenerationResult]:
    """Prefill all prompts as one left-padded batch, then decode one token per step until all finish.

    `step` runs the model on cache slots 0..B-1 and returns last-position logits [B, V].
    """
    ids, mask = pad_prompts(prompts, pad_id)
    batch, width = ids.shape
    slots = torch.arange(batch)
    states = [SequenceState(p, eos_ids, decode) for p in params]
    lengths = mask.sum(-1)
    logits = step(ids, prefill_meta(mask, slots))
    if all(p.greedy for p in params):
        _greedy_steps(step, logits, states, slots, lengths, width, max(p.max_new_tokens for p in params))
        return results(prompts, states)
    sampler = Sampler(params)
    for n in range(max(p.max_new_tokens for p in params)):
        nxt = sampler(logits)
        for s, tok in zip(states, nxt.tolist(), strict=True):
            s.append(tok)
        if all(s.finished for s in states):
            break
        meta = decode_meta(slots, torch.full((batch,), width + n), lengths + n)
        logits = step(nxt.view(batch, 1), meta)
    return results(prompts, states)


class HostCopy:
    """A copy of a tensor to the host, started now and read later without making the device wait.

    On CUDA the copy is asynchronous (pinned memory) and an event on the tensor's device marks its
    end; `tolist` waits for that event only. On CPU it is a clone, since the tensor may live in a
    buffer that is reused before it is read.
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        self.event: torch.cuda.Event | None = None
        if tensor.is_cuda:
            self.tensor = tensor.to("cpu", non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(tensor.device))
        else:
            self.tensor = tensor.clone()

    def tolist(self) -> list:
        if self.event is not None:
            self.event.synchronize()
        return self.tensor.tolist()


def _greedy_steps(step: StepFn, logits: torch.Tensor, states: Sequence[SequenceState], slots: torch.Tensor,
                  lengths: torch.Tensor, width: int, steps: int) -> None:
    """Greedy decoding that never makes the device wait for the host.

    Each step's tokens are picked on the logits' device and fed straight into the next step; their
    copy to the host (to record them and test EOS / stop strings / lengths) is read one step later,
    while the device already runs the next step. A batch that finished therefore costs one extra
    step, whose tokens `SequenceState` ignores; the tokens are those of the step-by-step loop.

    A `step` with a `greedy` attribute (`DecodeGraphs.greedy`: ``greedy(ids, meta)`` -> an `advance()` giving
    each next step's tokens, or None) runs the decode steps through it: on a GPU, one graph replay per step
    that picks the tokens and feeds them on by itself.
    """
    device, batch = logits.device, logits.shape[0]
    slots_d, lengths_d = slots.to(device), lengths.to(device)
    valid = torch.ones(batch, 1, dtype=torch.bool, device=device)
    pending: list[HostCopy] = []

    def record(tokens: HostCopy) -> bool:
        """Append one step's tokens; True when every sequence has finished."""
        for state, tok in zip(states, tokens.tolist(), strict=True):
            state.append(tok)
        return all(s.finished for s in states)

    def meta(n: int) -> StepMeta:
        write = torch.full((batch,), width + n, dtype=torch.long, device=device)
        return decode_meta(slots_d, write, lengths_d + n, valid, kv_len=width + n + 1)

    nxt = logits.argmax(dim=-1)  # [B] on the device
    start = getattr(step, "greedy", None)
    advance = start(nxt.view(batch, 1), meta(0)) if start is not None and steps > 1 else None
    for n in range(steps):
        host = HostCopy(nxt)  # copied before the next step overwrites a graph's token buffer (stream order)
        if pending and record(pending.pop()):
            return
        if n == steps - 1:
            record(host)
            return
        pending.append(host)
        nxt = advance() if advance is not None else step(nxt.view(batch, 1), meta(n)).argmax(dim=-1)
    for tokens in pending:
        record(tokens)
