"""Server metrics in the Prometheus text exposition format (version 0.0.4), without dependencies.

Counters, gauges and histograms are updated from the scheduler thread and read by the HTTP thread,
so every update and the rendering hold one lock.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence

__all__ = ["Metrics", "Counter", "Gauge", "Histogram", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

HOST_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1)
"""Buckets of the step loop's host time per step (tens of microseconds to a tenth of a second)."""

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(x: float) -> str:
    return repr(float(x)) if x != int(x) or abs(x) >= 1e15 else str(int(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labels: Sequence[str], lock: threading.Lock) -> None:
        self.name, self.help, self.label_names, self.lock = name, help_text, tuple(labels), lock

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.label_names):
            raise ValueError(f"metric {self.name} takes labels {self.label_names}, got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    """A monotonically increasing total."""

    kind = "counter"

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self.lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def render(self) -> list[str]:
        rows = self.values or ({} if self.label_names else {(): 0.0})
        return [f"{self.name}{_labels(self.label_names, k)} {_num(v)}" for k, v in sorted(rows.items())]


class Gauge(Counter):
    """A value that goes up and down."""

    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self.lock:
            self.values[key] = float(value)


class Histogram(_Metric):
    """Observations counted into cumulative buckets, plus their sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, labels: Sequence[str], lock: threading.Lock,
                 buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        super().__init__(name, help_text, labels, lock)
        self.buckets = tuple(sorted(buckets))
        self.counts: dict[tuple[str, ...], list[int]] = {}
        self.sums: dict[tuple[str, ...], float] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self.lock:
            counts = self.counts.setdefault(key, [0] * (len(self.buckets) + 1))
            counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sums[key] = self.sums.get(key, 0.0) + value

    def render(self) -> list[str]:
        lines = []
        keys = sorted(self.counts) or ([()] if not self.label_names else [])
        for key in keys:
            counts = self.counts.get(key, [0] * (len(self.buckets) + 1))
            total = 0
            for bound, c in zip([*self.buckets, float("inf")], counts, strict=True):
                total += c
                le = 'le="' + ("+Inf" if bound == float("inf") else repr(bound)) + '"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {total}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {_num(self.sums.get(key, 0.0))}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {total}")
        return lines


class Metrics:
    """The server's metrics; `render()` gives the /metrics body."""

    def __init__(self, prefix: str = "eet_pipe") -> None:
        self.lock = threading.Lock()
        self._all: list[_Metric] = []
        p = prefix
        self.requests = self._add(Counter, f"{p}_requests_total", "Finished HTTP generation requests by status code",
                                  ("status",))
        self.prompt_tokens = self._add(Counter, f"{p}_prompt_tokens_total", "Prompt tokens admitted", ())
        self.generation_tokens = self._add(Counter, f"{p}_generation_tokens_total", "Tokens generated", ())
        self.steps = self._add(Counter, f"{p}_steps_total", "Pipeline steps completed", ())
        self.queue_depth = self._add(Gauge, f"{p}_queue_depth", "Sequences waiting for a slot", ())
        self.running = self._add(Gauge, f"{p}_running_sequences", "Sequences holding a KV-cache slot", ())
        self.busy = self._add(Gauge, f"{p}_stage_busy_fraction",
                              "Fraction of its last report interval a stage spent computing", ("stage",))
        self.ttft = self._add(Histogram, f"{p}_time_to_first_token_seconds", "Arrival to first token", ())
        self.tpot = self._add(Histogram, f"{p}_time_per_output_token_seconds",
                              "Mean time between output tokens of a sequence", ())
        self.latency = self._add(Histogram, f"{p}_request_latency_seconds", "Arrival to last token", ())
        self.step_host = self._add(Histogram, f"{p}_step_host_seconds",
                                   "Host time of the step loop per pipeline step (admission, command building, "
                                   "result handling; not the wait for the pipeline)", (), buckets=HOST_BUCKETS)

    def _add(self, cls: type, name: str, help_text: str, labels: Sequence[str], **extra: object) -> _Metric:
        metric = cls(name, help_text, labels, self.lock, **extra)
        self._all.append(metric)
        return metric

    def render(self) -> str:
        """All metrics in the Prometheus text format."""
        with self.lock:
            lines = []
            for m in self._all:
                lines += m.header() + m.render()  # type: ignore[attr-defined]
        return "\n".join(lines) + "\n"
