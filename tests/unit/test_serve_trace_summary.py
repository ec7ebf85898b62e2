"""`benchmarks/serve_trace.summarize`: busy time, kinds, padding and gaps of a window of a step trace."""

from __future__ import annotations

import pytest

from benchmarks.serve_trace import summarize
from eet_pipe.serving.step_trace import SCHEDULER_TID


def _span(tid: int, start_ms: float, dur_ms: float, **label) -> dict:
    args = {"step": 1, "group": 0, "chunk": 0, "kind": "decode", "rows": 3, "padded_rows": 4, "width": 1,
            "padded_width": 1, "tokens": 3, "graphed": True, "captured": 0, **label}
    return {"name": "x", "ph": "X", "pid": 1, "tid": tid, "ts": start_ms * 1e3, "dur": dur_ms * 1e3, "args": args}


def test_a_window_is_summarised_per_stage():
    events = [
        _span(0, 0.0, 2.0, step=-1),  # warm-up: left out
        _span(0, 10.0, 2.0, step=1),
        _span(0, 12.1, 2.0, step=2),  # 0.1 ms after: launch latency, no gap
        _span(0, 20.0, 4.0, step=3, kind="prompt", rows=2, padded_rows=2, width=5, padded_width=8, tokens=9,
              graphed=False),
        _span(0, 30.0, 5.0, step=4, captured=1),
        _span(1, 11.0, 1.0, step=1),
        {"name": "issue", "ph": "i", "pid": 1, "tid": SCHEDULER_TID, "ts": 9e3,
         "args": {"step": 1, "group": 0, "decode": 3, "new": 0, "waiting": 0}},
        {"name": "issue", "ph": "i", "pid": 1, "tid": SCHEDULER_TID, "ts": 19e3,
         "args": {"step": 3, "group": 0, "decode": 0, "new": 2, "waiting": 1}},
    ]
    s = summarize(events, 0.010, 0.040)  # 30 ms
    assert s["window_s"] == pytest.approx(0.030)
    assert s["steps"] == 4
    stage0 = s["stages"]["0"]
    assert stage0["busy_fraction"] == pytest.approx(13 / 30)
    assert stage0["by_kind"] == {"capture": {"count": 1, "ms": pytest.approx(5.0)},
                                 "decode graph": {"count": 2, "ms": pytest.approx(4.0)},
                                 "prompt eager": {"count": 1, "ms": pytest.approx(4.0)}}
    assert stage0["decode_rows_mean"] == 3 and stage0["decode_padding"] == pytest.approx(0.25)
    assert stage0["prompt_tokens"] == 9 and stage0["prompt_padding"] == pytest.approx(1 - 9 / 16)
    assert stage0["gaps"] == {"count": 2, "ms": pytest.approx(5.9 + 6.0), "max_ms": pytest.approx(6.0)}
    assert s["stages"]["1"]["busy_fraction"] == pytest.approx(1 / 30)
    assert s["issued"] == {"steps": 1, "decode_rows_mean": 0.0, "admitted": 2, "with_prompts": 1}  # 9 ms is outside


def test_spans_are_clipped_to_the_window():
    s = summarize([_span(0, 0.0, 10.0), _span(0, 10.0, 10.0)], 0.005, 0.015)
    assert s["stages"]["0"]["busy_fraction"] == pytest.approx(1.0)
    whole = summarize([_span(0, 0.0, 10.0), _span(0, 15.0, 5.0)])
    assert whole["window_s"] == pytest.approx(0.020) and whole["stages"]["0"]["busy_fraction"] == pytest.approx(0.75)


def _instant(name: str, ms: float, **args) -> dict:
    return {"name": name, "ph": "i", "pid": 1, "tid": SCHEDULER_TID, "ts": ms * 1e3, "args": args}


def test_waits_are_matched_first_in_first_out():
    events = [
        _instant("submit", 0.0, sequences=1), _instant("submit", 1.0, sequences=1), _instant("submit", 2.0, sequences=1),
        _instant("issue", 5.0, step=1, group=0, decode=0, new=2, waiting=1),  # the first two: 5 and 4 ms
        _instant("issue", 12.0, step=2, group=1, decode=0, new=1, waiting=0),  # the third: 10 ms
        _span(0, 6.0, 3.0, step=1, kind="prompt", rows=2, padded_rows=2, width=4, padded_width=4, tokens=8),
        _span(0, 13.0, 2.0, step=2, kind="prompt", rows=1, padded_rows=1, width=4, padded_width=4, tokens=4),
        _instant("result", 9.5, step=1, group=0, tokens=2, finished=0),
        _instant("result", 17.0, step=2, group=1, tokens=1, finished=0),
    ]
    s = summarize(events, 0.0, 0.020)
    assert s["admission_wait_ms"] == {"p50": pytest.approx(5.0), "p90": pytest.approx(10.0), "max": pytest.approx(10.0)}
    assert s["issue_to_start_ms"]["p50"] == pytest.approx(1.0) and s["issue_to_start_ms"]["max"] == pytest.approx(1.0)
    assert s["end_to_result_ms"]["p50"] == pytest.approx(2.0) and s["end_to_result_ms"]["max"] == pytest.approx(2.0)
    assert summarize(events, 0.010, 0.020)["admission_wait_ms"]["max"] == pytest.approx(10.0)  # only the second issue


def test_refill_pairs_each_end_with_the_request_it_made_room_for():
    """Two clients: the first two sequences are the opening requests; the k-th end makes room for the (k + 2)-th
    arrival. Ends at 10 (two at once) and 20 ms; arrivals after them at 13, 16 and 25 ms: refills 3, 6, 5 ms."""
    events = [
        _instant("submit", 0.0, sequences=1), _instant("submit", 0.5, sequences=1),
        _instant("result", 10.0, step=1, group=0, tokens=2, finished=2),
        _instant("submit", 13.0, sequences=1), _instant("submit", 16.0, sequences=1),
        _instant("result", 20.0, step=2, group=0, tokens=2, finished=1),
        _instant("submit", 25.0, sequences=1),
        _instant("result", 30.0, step=3, group=0, tokens=2, finished=2),  # the level's last: nothing follows them
    ]
    s = summarize(events, 0.0, 0.040, clients=2)
    assert s["refill_ms"] == {"p50": pytest.approx(5.0), "p90": pytest.approx(6.0), "max": pytest.approx(6.0)}
    assert summarize(events, 0.0, 0.040)["refill_ms"]["p50"] is None  # without the client count: not defined
    later = summarize(events, 0.005, 0.040, clients=2)  # a window that starts after the opening requests
    assert later["refill_ms"]["p50"] == pytest.approx(25.0 - 10.0)  # the 13 and 16 ms arrivals open it
