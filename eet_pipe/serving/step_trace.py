"""The server's step trace (`trace=<path>`): every chunk forward of every step on every stage, and the
scheduler's decisions, as Chrome / Perfetto trace JSON written while the server runs.

Stages time their forwards (CUDA events on GPUs) and send the labelled spans with their busy-time
reports (`BusyClock`), about once a second and whenever they fall idle; the engine process writes them
here. Times are the host's `time.perf_counter` clock (CLOCK_MONOTONIC: the same in every process of a
machine), in microseconds, so the spans of all stages and the scheduler's instants share one timeline.
Under torchrun the middle ranks report busy time only: their spans are missing.

The file is a JSON array written one event per line and closed when the server stops; a server that
dies leaves it without its closing bracket, which Perfetto and chrome://tracing accept. A busy server
writes about 250 bytes per stage span and 150 per scheduler instant (one stage at a thousand steps a second:
about 2 GB an hour): the file is closed when it reaches `max_bytes` (the server's `trace_max_mb`), and serving
goes on untraced.
"""

from __future__ import annotations

import gzip
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["StepTrace", "SCHEDULER_TID", "read_step_trace"]

log = logging.getLogger("eet_pipe.serve")

SCHEDULER_TID = 1000
"""Track of the scheduler's instants (stages use their rank)."""


class StepTrace:
    """Thread-safe writer of the step trace (see the module docstring)."""

    def __init__(self, path: str | Path, max_bytes: int = 1 << 30) -> None:
        if max_bytes < 1024:
            raise ValueError(f"StepTrace: max_bytes must be >= 1024, got {max_bytes}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: Any = self.path.open("w")
        self._lock = threading.Lock()
        self._named: set[int] = set()
        self._first = True
        self._file.write("[\n")
        self._size = 2
        self._write([{"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "eet_pipe serve"}},
                     self._thread_name(SCHEDULER_TID, "scheduler")])

    def _thread_name(self, tid: int, name: str) -> dict:
        self._named.add(tid)
        return {"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": name}}

    def _write(self, events: list[dict]) -> None:
        if self._file is None or not events:
            return
        text = ",\n".join(json.dumps(e, separators=(",", ":")) for e in events)
        if not self._first:
            text = ",\n" + text
        if self._size + len(text) + 3 > self.max_bytes:  # 3: the closing "\n]\n"
            log.warning("step trace %s: reached its limit of %d bytes; the trace ends here, serving goes on",
                        self.path, self.max_bytes)
            self._close()
            return
        try:
            self._file.write(text)
            self._file.flush()
        except OSError as err:  # a full disk must not stop the server: the trace ends here
            log.error("step trace %s: writing failed (%s); tracing stops, serving goes on", self.path, err)
            self._abandon()
            return
        self._first = False
        self._size += len(text)

    def _abandon(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass
        self._file = None

    def stage_spans(self, rank: int, spans: list[tuple[float, float, dict]]) -> None:
        """Spans (start s, end s, label) of stage `rank`, as `BusyClock.report` gives them."""
        events = []
        with self._lock:
            if rank not in self._named:
                events.append(self._thread_name(rank, f"stage {rank}"))
            for start, end, label in spans:
                name = (f"{label['kind']} {label['rows']}x{label['width']}" if label.get("kind") == "prompt"
                        else f"{label.get('kind', 'step')} {label.get('rows', '')}").strip()
                events.append({"name": name, "cat": "stage", "ph": "X", "pid": 1, "tid": rank,
                               "ts": round(start * 1e6, 1), "dur": round((end - start) * 1e6, 1), "args": label})
            self._write(events)

    def instant(self, name: str, **args: Any) -> None:
        """A scheduler event now (issue of a step, arrival of requests, a result)."""
        with self._lock:
            self._write([{"name": name, "cat": "scheduler", "ph": "i", "s": "t", "pid": 1, "tid": SCHEDULER_TID,
                          "ts": round(time.perf_counter() * 1e6, 1), "args": args}])

    def close(self) -> None:
        """Close the array and the file (idempotent)."""
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._file is not None:
            try:
                self._file.write("\n]\n")
                self._file.close()
            except OSError as err:
                log.error("step trace %s: closing failed (%s)", self.path, err)
            self._file = None


def read_step_trace(path: str | Path) -> list[dict]:
    """The events of a step trace (gzip-compressed if its name ends in .gz), also of one a dead server left
    unclosed."""
    path = Path(path)
    text = (gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()).rstrip()
    if not text.endswith("]"):
        text = text.rstrip(",") + "\n]"
    return json.loads(text)
