"""Per-stage timelines: compute / send / recv spans, written as Chrome (Perfetto) trace JSON and a PNG.

On GPU spans are timed with CUDA events on the compute stream and wrapped in NVTX ranges named by
canonical layer names, so ``nsys profile`` shows the same labels.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

__all__ = ["BusyClock", "Tracer", "write_chrome_trace", "read_chrome_trace", "plot_timeline", "bubble_fraction",
           "events_span"]


class BusyClock:
    """Time a stage spends computing: CUDA events around each chunk's forward (so waits for messages
    are not counted), host time on CPU. With `spans`, each timed forward that `end` labels is also kept
    as (start, end, label) on the host's `time.perf_counter` clock (GPU times mapped onto it through an
    event recorded when the clock was made) and handed out with the next report."""

    def __init__(self, device: torch.device, interval_s: float, spans: bool = False) -> None:
        self.device, self.interval_s = device, interval_s
        self.cuda = device.type == "cuda"
        self.pending: deque[tuple[Any, Any, dict | None]] = deque()
        self.busy, self.reported = 0.0, time.monotonic()
        self.keep_spans = spans
        self.spans: list[tuple[float, float, dict]] = []
        """Labelled spans resolved since the last report (with `spans`)."""
        self._base: Any = None
        self._base_s = 0.0
        if spans and self.cuda:
            self._base = torch.cuda.Event(enable_timing=True)
            self._base.record(torch.cuda.current_stream(device))
            self._base.synchronize()
            self._base_s = time.perf_counter()

    def begin(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def end(self, began: Any, label: dict | None = None) -> None:
        """Close the span opened by `begin`; `label` (kept only with `spans`) describes it."""
        label = label if self.keep_spans else None
        if not self.cuda:
            now = time.perf_counter()
            self.busy += now - began
            if label is not None:
                self.spans.append((began, now, label))
            return
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(self.device))
        self.pending.append((began, ev, label))

    def unreported(self) -> bool:
        """Whether labelled spans are waiting for a report."""
        return self.keep_spans and bool(self.pending or self.spans)

    def report(self, force: bool = False) -> dict | None:
        """Busy seconds since the last report (and, with `spans`, the labelled spans), at most every
        `interval_s` unless `force` (else None)."""
        while self.pending and self.pending[0][1].query():
            a, b, label = self.pending.popleft()
            seconds = a.elapsed_time(b) / 1e3
            self.busy += seconds
            if label is not None:
                start = self._base_s + self._base.elapsed_time(a) / 1e3
                self.spans.append((start, start + seconds, label))
        now = time.monotonic()
        if now - self.reported < self.interval_s and not force:
            return None
        report: dict = {"busy": self.busy, "elapsed": now - self.reported}
        if self.keep_spans:
            report["spans"], self.spans = self.spans, []
        self.busy, self.reported = 0.0, now
        return report


class Tracer:
    """Records spans of one stage while enabled; a no-op otherwise."""

    def __init__(self, device: torch.device, stage: int) -> None:
        self.device, self.stage = device, stage
        self.enabled = False
        self._spans: list[tuple[str, str, object, object]] = []
        self._origin_ns = 0
        self._origin_event: torch.cuda.Event | None = None

    def reset(self, enabled: bool) -> None:
        """Start a new recording (clears the previous one)."""
        self.enabled, self._spans = enabled, []
        if not enabled:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._origin_event = torch.cuda.Event(enable_timing=True)
            self._origin_event.record()
        self._origin_ns = time.monotonic_ns()

    def _mark(self) -> object:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.monotonic_ns()

    @contextmanager
    def span(self, kind: str, label: str) -> Iterator[None]:
        """Time the enclosed work as one span of `kind` ('compute', 'send', 'recv')."""
        if not self.enabled:
            yield
            return
        nvtx = self.device.type == "cuda"
        if nvtx:
            torch.cuda.nvtx.range_push(f"{kind} {label}")
        start = self._mark()
        try:
            yield
        finally:
            self._spans.append((kind, label, start, self._mark()))
            if nvtx:
                torch.cuda.nvtx.range_pop()

    def events(self) -> list[dict]:
        """The recorded spans as dicts with absolute start/end in seconds (monotonic clock)."""
        if self.device.type == "cuda" and self._spans:
            torch.cuda.synchronize(self.device)
        base = self._origin_ns / 1e9
        out = []
        for kind, label, start, end in self._spans:
            if isinstance(start, torch.cuda.Event):
                s = base + self._origin_event.elapsed_time(start) / 1e3
                e = base + self._origin_event.elapsed_time(end) / 1e3
            else:
                s, e = start / 1e9, end / 1e9
            out.append({"stage": self.stage, "kind": kind, "label": label, "start": s, "end": e})
        return out


def events_span(events: list[dict]) -> float:
    """Seconds from the first event's start to the last event's end (0 for no events)."""
    if not events:
        return 0.0
    return max(e["end"] for e in events) - min(e["start"] for e in events)


def bubble_fraction(events: list[dict], stages: int) -> float:
    """1 - (compute time summed over stages) / (stages x makespan)."""
    if not events:
        return 0.0
    busy = sum(e["end"] - e["start"] for e in events if e["kind"] == "compute")
    return max(0.0, 1.0 - busy / (stages * max(events_span(events), 1e-12)))


def write_chrome_trace(events: list[dict], path: str | Path, stages: int, meta: dict | None = None) -> float:
    """Write a Chrome/Perfetto trace (one track per stage); returns the bubble fraction."""
    t0 = min((e["start"] for e in events), default=0.0)
    trace = [{"name": "process_name", "ph": "M", "pid": 0, "tid": s, "args": {"name": f"stage {s}"}}
             for s in range(stages)]
    trace += [{"name": "thread_name", "ph": "M", "pid": 0, "tid": s, "args": {"name": f"stage {s}"}}
              for s in range(stages)]
    for e in events:
        trace.append({"name": f"{e['kind']} {e['label']}", "cat": e["kind"], "ph": "X", "pid": 0,
                      "tid": e["stage"], "ts": (e["start"] - t0) * 1e6, "dur": (e["end"] - e["start"]) * 1e6,
                      "args": {"label": e["label"]}})
    bubble = bubble_fraction(events, stages)
    Path(path).write_text(json.dumps({"traceEvents": trace, "metadata": {**(meta or {}), "bubble": bubble}}))
    return bubble


def read_chrome_trace(path: str | Path) -> list[dict]:
    """The events of a trace written by `write_chrome_trace` (start / end relative to its first span)."""
    data = json.loads(Path(path).read_text())
    return [{"stage": e["tid"], "kind": e["cat"], "label": e["args"]["label"], "start": e["ts"] / 1e6,
             "end": (e["ts"] + e["dur"]) / 1e6} for e in data["traceEvents"] if e.get("ph") == "X"]


def plot_timeline(events: list[dict], path: str | Path, stages: int, title: str = "") -> None:
    """A PNG timeline: one row per stage, compute in colour, communication in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = min((e["start"] for e in events), default=0.0)
    colors = {"compute": "tab:blue", "send": "tab:gray", "recv": "lightgray"}
    fig, ax = plt.subplots(figsize=(10, 0.6 * stages + 1.2))
    for e in events:
        ax.barh(e["stage"], (e["end"] - e["start"]) * 1e3, left=(e["start"] - t0) * 1e3,
                color=colors.get(e["kind"], "black"), edgecolor="white", linewidth=0.3)
    ax.set_yticks(range(stages), [f"stage {s}" for s in range(stages)])
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.set_title(f"{title}  bubble {bubble_fraction(events, stages):.1%}".strip())
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
