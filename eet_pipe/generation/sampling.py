"""Token sampling on the logits' device, for a batch whose rows have their own parameters.

Every parameter is a per-row tensor (`SamplingTable`), so a step samples all its rows with a fixed
number of kernels and no copy to the host: temperature, top-k, top-p, and seeded randomness.

Randomness is counter-based: the uniform number for (row, vocabulary entry) of the n-th token of a
sequence is a hash of (seed, n, entry) (splitmix64's finaliser on int64 tensors, whose wrapping
arithmetic is exact on every device). The n-th token of a sequence with seed S is therefore the same
whichever batch, slot, step or process samples it: `PipelineEngine.generate`, the server and the
single-device loop give the same text for the same seed. A token is drawn by the exponential race
(argmax of z - log E, E ~ Exp(1)), equivalent to sampling from softmax(z).

Non-finite logits never raise: NaN counts as -inf, +inf as the largest float, and a row with no finite
candidate falls back to its argmax. Temperatures below `GREEDY_EPS` are greedy.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence

import torch

__all__ = ["GREEDY_EPS", "TOP_K_CAP", "LOGPROB_FLOOR", "SamplingTable", "sample", "uniform", "seed_key", "mix64",
           "top_logprobs"]

GREEDY_EPS = 1e-5
"""Rows with a temperature below this are greedy (dividing by a smaller one overflows float32)."""

TOP_K_CAP = 2**31 - 1
"""A top_k above this (any int is accepted: one above the vocabulary keeps every token) is stored as this."""

LOGPROB_FLOOR = -9999.0
"""Log-probabilities are reported no lower than this (-inf and NaN have no JSON form)."""

_U64 = (1 << 64) - 1


def _signed(x: int) -> int:
    """`x` modulo 2**64 as a signed int64 value."""
    x &= _U64
    return x - (1 << 64) if x >> 63 else x


_M1, _M2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)
_GOLDEN, _ENTRY = _signed(0x9E3779B97F4A7C15), _signed(0xD1B54A32D192ED03)


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 values."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on an int64 tensor (a bijection of 64-bit values)."""
    x = x ^ _shr(x, 30)
    x = x * _M1
    x = x ^ _shr(x, 27)
    x = x * _M2
    return x ^ _shr(x, 31)


def seed_key(seed: int) -> int:
    """The int64 key of a sampler seed (any int: it is taken modulo 2**64)."""
    return _signed(int(seed))


def uniform(keys: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, vocab] float64 uniforms in (0, 1) for rows with int64 `keys` [B] at `counters` [B]."""
    row = mix64(mix64(keys) + counters * _GOLDEN)  # [B]
    entries = torch.arange(vocab, device=keys.device, dtype=torch.long) * _ENTRY
    bits = _shr(mix64(row.view(-1, 1) + entries), 11)  # [B, V], 53 random bits
    return (bits.double() + 0.5) * 2.0 ** -53


def _scaled(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """float32 logits / temperature with NaN -> -inf and +inf -> the largest float32."""
    z = logits.float() / temperature.view(-1, 1)
    big = torch.finfo(torch.float32).max
    return torch.nan_to_num(z, nan=float("-inf"), posinf=big, neginf=float("-inf"))


def _filter(z: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """z with everything outside each row's top-k, then outside its top-p nucleus, set to -inf."""
    vocab = z.shape[-1]
    ranked, order = torch.sort(z, dim=-1, descending=True, stable=True)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    pos = torch.arange(vocab, device=z.device)
    ranked = ranked.masked_fill(pos >= k.view(-1, 1), float("-inf"))
    probs = ranked.softmax(-1)
    drop = (probs.cumsum(-1) - probs) >= top_p.view(-1, 1)  # keep the token that crosses top_p
    drop[:, 0] = False
    ranked = ranked.masked_fill(drop, float("-inf"))
    return torch.full_like(z, float("-inf")).scatter_(-1, order, ranked)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           keys: torch.Tensor, counters: torch.Tensor, greedy: torch.Tensor, filtered: bool = True) -> torch.Tensor:
    """Next tokens [B] int64 on the logits' device. logits [B, V]; the others are per-row tensors [B] on the
    same device (`greedy` bool). `filtered` False skips top-k / top-p (no row uses them)."""
    picks = logits.argmax(dim=-1)
    z = _scaled(logits, torch.where(greedy, 1.0, temperature))
    if filtered:
        z = _filter(z, top_k, top_p)
    race = z - torch.log(-torch.log(uniform(keys, counters, z.shape[-1]))).float()
    drawn = race.argmax(dim=-1)
    finite = z.amax(dim=-1) > float("-inf")
    return torch.where(greedy | ~finite, picks, drawn)


def top_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor]:
    """(log-probability of `tokens` [B], the k most likely ids [B, k] and their log-probabilities [B, k]),
    floored at LOGPROB_FLOOR. logits [B, V] (raw: before temperature)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    logp = torch.nan_to_num(logp, nan=LOGPROB_FLOOR, neginf=LOGPROB_FLOOR).clamp(min=LOGPROB_FLOOR)
    chosen = logp.gather(1, tokens.view(-1, 1)).view(-1)
    top = torch.topk(logp, min(k, logp.shape[-1]), dim=-1)
    return chosen, top.indices, top.values


class SamplingTable:
    """Sampling parameters and token counters of numbered rows (sequences or server slots), on a device.

    `set` fills rows from `SamplingParams` (one small copy to the device, through `upload` when given: a
    callable that moves a list of CPU tensors there); `sample` draws the next
    token of the rows given and advances their counters, on the device. The host keeps which rows
    sample and which filter, so a greedy-only step runs one argmax."""

    def __init__(self, rows: int, device: torch.device | str,
                 upload: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None) -> None:
        self.device = torch.device(device)
        self.upload = upload or self._copy
        self.rows = 0
        self.random: set[int] = set()
        self.filtering: set[int] = set()
        self._grow(rows)

    def _copy(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t.to(self.device, non_blocking=True) for t in tensors]

    def _grow(self, rows: int) -> None:
        if rows <= self.rows:
            return
        old = None if self.rows == 0 else (self.temperature, self.top_k, self.top_p, self.keys, self.counters,
                                          self.greedy)
        d = self.device
        self.temperature = torch.ones(rows, device=d)
        self.top_p = torch.ones(rows, device=d)
        self.top_k = torch.zeros(rows, dtype=torch.long, device=d)
        self.keys = torch.zeros(rows, dtype=torch.long, device=d)
        self.counters = torch.zeros(rows, dtype=torch.long, device=d)
        self.greedy = torch.ones(rows, dtype=torch.bool, device=d)
        if old is not None:
            for new, prev in zip((self.temperature, self.top_k, self.top_p, self.keys, self.counters, self.greedy),
                                 old, strict=True):
                new[: self.rows] = prev
        self.rows = rows

    def set(self, rows: Sequence[int], params: Sequence) -> None:
        """Start rows `rows` with `params` (SamplingParams; a seed of None draws a fresh one); counters at 0."""
        if not rows:
            return
        self._grow(max(rows) + 1)
        greedy = [p.temperature < GREEDY_EPS for p in params]
        keys = [seed_key(p.seed if p.seed is not None else secrets.randbits(64)) for p in params]
        for r, g, p in zip(rows, greedy, params, strict=True):
            (self.random.discard if g else self.random.add)(r)
            (self.filtering.add if not g and (p.top_k or p.top_p < 1) else self.filtering.discard)(r)
        idx, floats, ints = self.upload([
            torch.tensor(list(rows), dtype=torch.long),
            torch.tensor([[1.0 if g else p.temperature, p.top_p] for g, p in zip(greedy, params, strict=True)],
                         dtype=torch.float32),
            torch.tensor([[min(p.top_k, TOP_K_CAP), k, int(g)] for g, k, p in zip(greedy, keys, params, strict=True)],
                         dtype=torch.long)])
        self.temperature[idx], self.top_p[idx] = floats[:, 0], floats[:, 1]
        self.top_k[idx], self.keys[idx], self.greedy[idx] = ints[:, 0], ints[:, 1], ints[:, 2].bool()
        self.counters.index_fill_(0, idx, 0)  # (`counters[idx] = 0` would copy a host scalar: a stream wait)

    def sample(self, logits: torch.Tensor, rows: torch.Tensor, host_rows: Sequence[int]) -> torch.Tensor:
        """Next tokens [B] (on the device) of rows `rows` ([B] int64 on the device; `host_rows` the same
        values on the host) from logits [B, V]; advances those rows' counters."""
        if not any(r in self.random for r in host_rows):
            return logits.argmax(dim=-1)
        filtered = any(r in self.filtering for r in host_rows)
        counters = self.counters[rows]
        tokens = sample(logits, self.temperature[rows], self.top_k[rows], self.top_p[rows], self.keys[rows],
                        counters, self.greedy[rows], filtered)
        self.counters[rows] = counters + 1
        return tokens
