"""Chrome trace files written by the runtime read back as the same events."""

from __future__ import annotations

import pytest

from eet_pipe.runtime.trace import read_chrome_trace, write_chrome_trace


def test_a_written_trace_reads_back_relative_to_its_first_span(tmp_path):
    events = [{"stage": 0, "kind": "compute", "label": "mb0 embed..layers.1", "start": 10.0, "end": 10.5},
              {"stage": 0, "kind": "send", "label": "mb0 to stage 1", "start": 10.5, "end": 10.5},
              {"stage": 1, "kind": "recv", "label": "mb0 from stage 0", "start": 10.1, "end": 10.6},
              {"stage": 1, "kind": "compute", "label": "mb0 layers.2..head", "start": 10.6, "end": 11.0}]
    path = tmp_path / "t.json"
    bubble = write_chrome_trace(events, path, stages=2)
    back = read_chrome_trace(path)
    assert [(e["stage"], e["kind"], e["label"]) for e in back] == [(e["stage"], e["kind"], e["label"]) for e in events]
    for got, want in zip(back, events, strict=True):
        assert got["start"] == pytest.approx(want["start"] - 10.0)
        assert got["end"] == pytest.approx(want["end"] - 10.0)
    assert bubble == pytest.approx(1 - 0.9 / 2.0)
