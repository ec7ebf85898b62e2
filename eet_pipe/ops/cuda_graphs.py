"""CUDA graphs for decode steps: one captured graph per batch-size bucket.

A decode step (one new token per sequence) launches a few hundred small kernels; replaying a
captured CUDA graph removes their launch cost. Shapes must not change between replays, so:

* every input lives in a static buffer of the bucket's size (`StaticDecodeInputs`); a batch of B
  rows runs in the smallest bucket >= B, and rows B.. are padding that read and write only the
  cache's **spare slot** (the last one, which generation never assigns), so their results are
  ignored;
* attention reads the full-length cache: the step's `StepMeta.kv_len` is ``cache.max_len`` and
  ``lengths = write_index + 1`` bounds the work inside the decode-attention op.

Graphs are captured lazily (first use of a bucket) after a warm-up on a side stream, all into one
private memory pool; the logits are cloned out of the static output after each replay, so sharing
the pool between buckets is safe. On CPU (or a batch above the largest bucket) the step runs eagerly.

`GraphCache` is the general form the pipeline stages use (`Stage.run_chunk`): a graph per call signature.
Server steps also graph prompt parts, padded to row and width buckets (`eet_pipe/runtime/step_parts.py`); those
attend over the part's own columns (``kv_len`` = the padded width, part of the signature).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from eet_pipe.models.kv_cache import KVCache
from eet_pipe.models.meta import StepMeta
from eet_pipe.models.model import CanonicalModel

__all__ = ["DEFAULT_BUCKETS", "StaticDecodeInputs", "static_decode_step", "static_greedy_step", "DecodeGraphs",
           "GraphDecoder", "bucket_for", "GraphCache", "cache_length", "graphed"]

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Batch sizes that get a graph; a batch runs in the smallest bucket that holds it."""
CACHE_LEN_ROUND = 64
"""`GraphDecoder` rounds cache lengths up to a multiple of this so later calls can reuse the cache."""


def graphed(fn, device: torch.device | str):
    """`fn` (no arguments, already warmed up) as the replay of a CUDA graph, which is how the runtime
    runs stage forwards; `fn` itself on CPU or when it cannot be captured. For timing: the graph's
    replay measures GPU time, not the host's kernel-launch time."""
    device = torch.device(device)
    if device.type != "cuda":
        return fn
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.device(device):
            torch.cuda.synchronize(device)
            # a capture stream of this device: torch.cuda.graph's default one lives on the first device it was used on
            with torch.cuda.graph(graph, stream=torch.cuda.Stream(device), capture_error_mode="thread_local"):
                fn()
    except RuntimeError as err:  # e.g. a host synchronisation inside fn
        log.debug("timing eagerly, capture failed: %s", err)
        return fn
    return graph.replay


def cache_length(max_len: int, max_positions: int) -> int:
    """Cache columns for sequences of up to `max_len` tokens: rounded up to CACHE_LEN_ROUND (so later
    calls of similar length reuse the cache and its graphs), but not past the model's positions."""
    length = math.ceil(max_len / CACHE_LEN_ROUND) * CACHE_LEN_ROUND
    return min(length, max(max_len, max_positions))


class GraphCache:
    """CUDA graphs of one device's module calls, one per call signature, sharing a memory pool.

    ``run(key, fn, inputs)`` calls ``fn(*inputs)``. The first call of a signature (`key`, which must
    determine every shape, dtype and non-tensor argument) runs eagerly — it is the warm-up; the
    second captures a graph over static copies of the inputs; later calls copy the inputs into those
    buffers and replay. The returned tensor is the graph's static output: it stays valid until the
    next `run` on this cache, so a caller that keeps it (a send in flight, a later chunk) clones it.

    Memory: every graph keeps its static inputs and output. Signatures whose output is larger than
    `max_output_bytes` always run eagerly (their kernels are large, launch cost does not matter), and
    the least recently used graphs go once more than `max_graphs` are kept or their buffers exceed
    `max_bytes`. A signature whose capture fails runs eagerly from then on. Calls must come from one
    thread, on the device's current stream.
    """

    def __init__(self, device: torch.device, max_graphs: int = 128, max_bytes: int = 2 << 30,
                 max_output_bytes: int = 128 << 20) -> None:
        if device.type != "cuda":
            raise ValueError(f"GraphCache needs a CUDA device, got {device}")
        self.device, self.max_graphs = device, max_graphs
        self.max_bytes, self.max_output_bytes = max_bytes, max_output_bytes
        self.pool = torch.cuda.graph_pool_handle()
        self._graphs: dict[object, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...], torch.Tensor, int]] = {}
        self._seen: set[object] = set()
        self._eager: set[object] = set()
        self.captures = 0
        self.replays = 0
        self._stream: torch.cuda.Stream | None = None  # capture stream on this device

    def __len__(self) -> int:
        return len(self._graphs)

    @property
    def nbytes(self) -> int:
        """Bytes held by the kept graphs' static inputs and outputs."""
        return sum(entry[3] for entry in self._graphs.values())

    def clear(self) -> None:
        """Drop every graph (call when a buffer they read, e.g. a KV cache, is replaced)."""
        self._graphs.clear()
        self._seen.clear()
        self._eager.clear()
        self._renew_pool()

    def _renew_pool(self) -> None:
        # a pool is freed with its last graph, and a freed pool's handle cannot be captured into again
        self.pool = torch.cuda.graph_pool_handle()

    def run(self, key: object, fn, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        if key in self._eager:
            return fn(*inputs)
        entry = self._graphs.pop(key, None)
        if entry is None and key not in self._seen:
            self._seen.add(key)
            out = fn(*inputs)
            if out.numel() * out.element_size() > self.max_output_bytes:
                self._eager.add(key)
            return out
        if entry is None:
            try:
                entry = self._capture(fn, inputs)
            except RuntimeError as err:  # e.g. an operation that cannot be captured: stay eager
                log.warning("CUDA graph capture failed on %s, running eagerly from now on: %s", self.device, err)
                self._eager.add(key)
                if not self._graphs:
                    self._renew_pool()
                return fn(*inputs)
        else:
            for dst, src in zip(entry[1], inputs, strict=True):
                dst.copy_(src, non_blocking=True)
        self._graphs[key] = entry  # most recently used last
        while len(self._graphs) > 1 and (len(self._graphs) > self.max_graphs or self.nbytes > self.max_bytes):
            oldest = next(iter(self._graphs))
            del self._graphs[oldest]
            self._seen.discard(oldest)
        entry[0].replay()
        self.replays += 1
        return entry[2]

    def _capture(self, fn, inputs: Sequence[torch.Tensor]):
        """Capture `fn` on this cache's side stream, ordered after the current stream's work.

        Unlike `torch.cuda.graph`, nothing here waits for the device: a pipeline stage may have
        point-to-point operations in flight that complete only when a peer stage, possibly capturing
        at the same moment, gets further — a device-wide synchronisation could wait for each other.
        Stream order is enough: the capture stream waits for the current stream, and the current
        stream then waits for the capture stream. Thread-local capture mode lets the process group's
        watchdog thread keep querying its events meanwhile.
        """
        current = torch.cuda.current_stream(self.device)
        static = tuple(t.clone() for t in inputs)
        graph = torch.cuda.CUDAGraph()
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            try:
                out = fn(*static)
            except BaseException:
                try:
                    graph.capture_end()
                except RuntimeError:
                    pass  # the capture is invalid anyway; report the original error
                raise
            graph.capture_end()
        current.wait_stream(self._stream)
        self.captures += 1
        log.debug("captured a CUDA graph (%d on %s)", self.captures, self.device)
        size = sum(t.numel() * t.element_size() for t in (*static, out))
        return graph, static, out, size


def bucket_for(batch: int, buckets: Sequence[int]) -> int | None:
    """Smallest bucket >= batch, or None when the batch is larger than every bucket."""
    fits = [b for b in buckets if b >= batch]
    return min(fits) if fits else None


class StaticDecodeInputs:
    """Fixed-address inputs of one bucket: ids [b, 1], slots [b], write_index [b, 1], positions [b, 1],
    valid [b, 1]. Rows past the real batch point at `spare_slot`, column 0."""

    def __init__(self, batch: int, spare_slot: int, device: torch.device) -> None:
        self.batch, self.spare_slot = batch, spare_slot
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.slots = torch.full((batch,), spare_slot, dtype=torch.long, device=device)
        self.write_index = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.valid = torch.ones(batch, 1, dtype=torch.bool, device=device)

    def load(self, ids: torch.Tensor, meta: StepMeta) -> int:
        """Copy a decode step's inputs into rows 0..n-1 and reset the padding rows; returns n."""
        n = ids.shape[0]
        if n > self.batch or ids.shape[1] != 1:
            raise ValueError(f"StaticDecodeInputs: ids {tuple(ids.shape)} do not fit the bucket [{self.batch}, 1]")
        if meta.slots is None or meta.write_index is None:
            raise ValueError("StaticDecodeInputs.load needs StepMeta.slots and write_index (a cached decode step)")
        if meta.slots.device.type == "cpu" and n and int(meta.slots.max()) >= self.spare_slot:
            raise ValueError(f"slot {int(meta.slots.max())} collides with the spare slot {self.spare_slot}: "
                             f"allocate the cache with one slot more than the batch")
        for dst, src in ((self.ids, ids), (self.slots, meta.slots), (self.write_index, meta.write_index),
                         (self.positions, meta.positions), (self.valid, meta.valid)):
            dst[:n].copy_(src.view(dst[:n].shape), non_blocking=True)
        if n < self.batch:
            self.ids[n:].zero_()
            self.slots[n:].fill_(self.spare_slot)
            self.write_index[n:].zero_()
            self.positions[n:].zero_()
            self.valid[n:].fill_(True)
        return n

    def meta(self, cache_len: int) -> StepMeta:
        """StepMeta over the static buffers that attends over the whole cache (kv_len = cache_len)."""
        return StepMeta(positions=self.positions, valid=self.valid, slots=self.slots,
                        write_index=self.write_index, kv_len=cache_len)


def static_decode_step(model: CanonicalModel, cache: KVCache, inputs: StaticDecodeInputs) -> torch.Tensor:
    """One decode step over the static buffers and the full-length cache: logits [bucket, V]."""
    return model(inputs.ids, inputs.meta(cache.max_len), cache)[:, -1]


def static_greedy_step(model: CanonicalModel, cache: KVCache, inputs: StaticDecodeInputs) -> torch.Tensor:
    """`static_decode_step`, then the greedy tokens [bucket] written into the ids buffer and every row's position
    and cache column advanced by one: the next call is the next step, with nothing to copy in between."""
    tokens = static_decode_step(model, cache, inputs).argmax(dim=-1)
    inputs.ids.copy_(tokens.view(-1, 1))
    inputs.positions.add_(1)
    inputs.write_index.add_(1)
    return tokens


@dataclass
class _Captured:
    inputs: StaticDecodeInputs
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # static output of the graph: logits [bucket, V], or greedy tokens [bucket]


class DecodeGraphs:
    """Decode steps of `model` on `cache` through one CUDA graph per batch bucket (eager on CPU).

    The cache's last slot is the spare slot for padding rows: allocate it with one slot more than
    the largest batch. Call it as a step function: ``logits = graphs(ids [B, 1], meta)`` -> [B, V]; or,
    for greedy decoding, ``advance = graphs.greedy(ids, meta)``, then ``tokens = advance()`` per step.
    """

    def __init__(self, model: CanonicalModel, cache: KVCache, max_batch_buckets: Sequence[int] = DEFAULT_BUCKETS,
                 warmup_steps: int = 2) -> None:
        if cache.num_slots < 2:
            raise ValueError(f"DecodeGraphs needs a cache with a spare slot (num_slots >= 2), got {cache.num_slots}")
        if not max_batch_buckets or any(int(b) < 1 for b in max_batch_buckets):
            raise ValueError(f"max_batch_buckets={tuple(max_batch_buckets)!r} is invalid: positive batch sizes")
        self.model, self.cache = model, cache
        self.device = cache.valid.device
        self.spare_slot = cache.num_slots - 1
        self.buckets = tuple(sorted({int(b) for b in max_batch_buckets}))
        self.warmup_steps = warmup_steps
        self.graphs: dict[int, _Captured] = {}
        self.greedy_graphs: dict[int, _Captured] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.enabled else None

    @property
    def enabled(self) -> bool:
        """True when steps replay CUDA graphs (the cache is on a CUDA device)."""
        return self.device.type == "cuda"

    @torch.inference_mode()
    def capture(self, bucket: int, step=static_decode_step) -> _Captured:
        """Warm up on a side stream, then capture `step` (`static_decode_step`, or `static_greedy_step` for
        `greedy`) of batch `bucket` (rows on the spare slot; the inputs are loaded after, at each use)."""
        if not self.enabled:
            raise RuntimeError(f"DecodeGraphs.capture needs a CUDA cache, this one is on {self.device}")
        inputs = StaticDecodeInputs(bucket, self.spare_slot, self.device)
        with torch.cuda.device(self.device):
            current = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for _ in range(self.warmup_steps):
                    step(self.model, self.cache, inputs)
            current.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=side):
                out = step(self.model, self.cache, inputs)
        captured = _Captured(inputs, graph, out)
        (self.greedy_graphs if step is static_greedy_step else self.graphs)[bucket] = captured
        log.debug("captured decode graph for batch bucket %d", bucket)
        return captured

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, meta: StepMeta) -> torch.Tensor:
        """Logits [B, V] of one decode step; ids [B, 1], meta with slots / write_index / positions / valid."""
        bucket = bucket_for(ids.shape[0], self.buckets)
        if not self.enabled or bucket is None or ids.shape[1] != 1:
            return self.model(ids.to(self.device), meta.to(self.device), self.cache)[:, -1]
        captured = self.graphs.get(bucket) or self.capture(bucket)
        n = captured.inputs.load(ids, meta)
        captured.graph.replay()
        return captured.logits[:n].clone()

    @torch.inference_mode()
    def greedy(self, ids: torch.Tensor, meta: StepMeta) -> Callable[[], torch.Tensor] | None:
        """Greedy decoding from a first decode step's inputs (as for a call): returns `advance`, whose every call
        runs one step and returns its greedy tokens [B] (a view of the graph's output, valid until the next
        call), or None where steps do not replay graphs. A step is one replay: the graph itself feeds its
        tokens to the next step and advances the positions and cache columns (`static_greedy_step`), so no
        copy or small kernel runs between steps. The tokens equal argmax over the logits of the calls."""
        bucket = bucket_for(ids.shape[0], self.buckets)
        if not self.enabled or bucket is None or ids.shape[1] != 1:
            return None
        captured = self.greedy_graphs.get(bucket) or self.capture(bucket, static_greedy_step)
        n = captured.inputs.load(ids, meta)

        def advance() -> torch.Tensor:
            captured.graph.replay()
            return captured.logits[:n]

        return advance


class GraphDecoder:
    """A KV cache with a spare slot and its `DecodeGraphs`, kept across generate calls that fit in it."""

    def __init__(self, model: CanonicalModel, buckets: Sequence[int] = DEFAULT_BUCKETS) -> None:
        self.model, self.buckets = model, tuple(buckets)
        self.graphs: DecodeGraphs | None = None

    def prepare(self, batch: int, max_len: int) -> DecodeGraphs:
        """Graphs over a cleared cache with >= batch + 1 slots and >= max_len columns."""
        g = self.graphs
        if g is not None and g.spare_slot >= batch and g.cache.max_len >= max_len:
            g.cache.valid.zero_()
            return g
        self.graphs = None  # free the old cache and graphs before allocating new ones
        capacity = bucket_for(batch, self.buckets) or batch
        cache = self.model.new_cache(capacity + 1, cache_length(max_len, self.model.cfg.max_positions))
        self.graphs = DecodeGraphs(self.model, cache, self.buckets)
        return self.graphs
