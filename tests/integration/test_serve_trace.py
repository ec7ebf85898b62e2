"""`trace=` on the server: every chunk forward of every step on every stage, and the scheduler's
decisions, in one Chrome trace on one clock, complete once the server stops."""

from __future__ import annotations

import gzip
import json
import signal
import time

import httpx
import pytest

from eet_pipe.serve import main as serve_main
from eet_pipe.serving.process import ServerProcess
from eet_pipe.serving.serve_options import ServeOptions
from eet_pipe.serving.step_trace import SCHEDULER_TID, StepTrace, read_step_trace


@pytest.mark.timeout(180)
def test_trace_records_every_step_of_every_stage(tmp_path):
    path = tmp_path / "sub" / "steps.json"
    args = ["--stages", "2", "model=tiny", "plan=even", "timeout=30", "log_level=warning", "max_slots=8",
            f"trace={path}"]
    began = time.perf_counter()
    prompt_tokens = []
    with ServerProcess(args) as server:
        for prompt, n in (("hello", 5), ("a longer prompt here", 3)):
            r = httpx.post(server.url + "/v1/completions", json={"prompt": prompt, "max_tokens": n, "temperature": 0,
                                                                 "ignore_eos": True}, timeout=60)
            assert r.status_code == 200, r.text
            prompt_tokens.append(r.json()["usage"]["prompt_tokens"])
        assert server.stop(signal.SIGTERM) == 0, server.log()
    ended = time.perf_counter()
    assert path.read_text().rstrip().endswith("]")  # closed at the stop
    events = read_step_trace(path)
    spans = [e for e in events if e["ph"] == "X"]
    issued = [e["args"] for e in events if e["ph"] == "i" and e["name"] == "issue"]
    served = {a["step"] for a in issued}  # the requests' steps (warm-up steps have negative numbers)
    assert served and all(s > 0 for s in served)
    for stage in (0, 1):
        mine = [e for e in spans if e["tid"] == stage and e["args"]["step"] in served]
        assert {e["args"]["step"] for e in mine} == served, f"stage {stage} lacks steps"
        assert all(began * 1e6 <= e["ts"] and e["ts"] + e["dur"] <= ended * 1e6 for e in mine)
    prompts = [e["args"] for e in spans if e["args"]["kind"] == "prompt" and e["args"]["step"] in served]
    assert sorted(a["tokens"] for a in prompts if a["chunk"] == 0) == sorted(prompt_tokens)
    assert all(a["rows"] == 1 and a["padded_width"] >= a["width"] >= a["tokens"] for a in prompts)
    decode = [e["args"] for e in spans if e["args"]["kind"] == "decode" and e["args"]["step"] in served]
    assert decode and all(a["rows"] == 1 and a["width"] == 1 for a in decode)
    # 5 + 3 tokens: a prompt step and n - 1 decode steps each, on each stage
    assert len([a for a in decode if a["chunk"] == 0]) == (5 - 1) + (3 - 1)
    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {"scheduler", "stage 0", "stage 1"} <= names
    results = [e["args"] for e in events if e["ph"] == "i" and e["name"] == "result" and e["args"]["step"] in served]
    assert {a["step"] for a in results} == served
    assert any(e.get("tid") == SCHEDULER_TID and e["name"] == "inbox" and e["args"]["submits"] == 1 for e in events)
    submits = [e for e in events if e.get("tid") == SCHEDULER_TID and e["name"] == "submit"]
    assert [e["args"]["sequences"] for e in submits] == [1, 1]
    first_issue = min(e["ts"] for e in events if e["ph"] == "i" and e["name"] == "issue" and e["args"]["step"] > 0)
    assert submits[0]["ts"] <= first_issue


@pytest.mark.timeout(180)
def test_a_prompt_part_padding_would_waste_runs_as_row_buckets(tmp_path):
    """Stages padding as GPU ones do (EET_PIPE_PAD_DECODE=1): five 150-token prompts (192 wide once padded) would
    run as 8 rows; the scheduler cuts them to 4 + 1, the row buckets the stages run unpadded."""
    path = tmp_path / "steps.json"
    args = ["model=tiny", "timeout=30", "log_level=warning", "max_slots=8", "microbatches=1", f"trace={path}"]
    prompt = [(7 * i) % 50 + 3 for i in range(150)]
    with ServerProcess(args, env={"EET_PIPE_PAD_DECODE": "1"}) as server:
        r = httpx.post(server.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 2, "n": 5,
                                                             "temperature": 0, "ignore_eos": True}, timeout=60)
        assert r.status_code == 200, r.text
        texts = {c["text"] for c in r.json()["choices"]}
        assert server.stop(signal.SIGTERM) == 0, server.log()
    assert len(texts) == 1  # greedy: the five choices are equal, whichever part ran them
    events = read_step_trace(path)
    served = {e["args"]["step"] for e in events if e["ph"] == "i" and e["name"] == "issue" and e["args"]["step"] > 0}
    prompts = [e["args"] for e in events if e["ph"] == "X" and e["args"]["kind"] == "prompt"
               and e["args"]["step"] in served]
    assert [a["rows"] for a in prompts] == [4, 1]
    assert all(a["padded_rows"] == a["rows"] and a["width"] == 150 and a["padded_width"] == 192 for a in prompts)


def test_an_unclosed_trace_still_reads(tmp_path):
    trace = StepTrace(tmp_path / "t.json")
    trace.instant("issue", step=1, group=0, decode=0, new=1, waiting=0)
    trace.stage_spans(0, [(1.0, 1.5, {"kind": "decode", "rows": 3, "width": 1, "step": 1})])
    events = read_step_trace(tmp_path / "t.json")  # as a server that died leaves it
    assert [e["ph"] for e in events] == ["M", "M", "i", "M", "X"]
    span = events[-1]
    assert span["name"] == "decode 3" and span["ts"] == 1e6 and span["dur"] == 5e5 and span["tid"] == 0
    trace.close()
    trace.close()
    assert json.loads((tmp_path / "t.json").read_text()) == events
    (tmp_path / "t.json.gz").write_bytes(gzip.compress((tmp_path / "t.json").read_bytes()))  # as benchmarks keep it
    assert read_step_trace(tmp_path / "t.json.gz") == events


def test_an_unwritable_trace_path_is_refused_before_starting(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert serve_main(["model=tiny", f"trace={blocker}/steps.json"]) == 2
    err = capsys.readouterr().err
    assert "trace=" in err and "cannot be written" in err


def test_a_trace_that_cannot_be_written_stops_without_stopping_anything(tmp_path, caplog):
    trace = StepTrace(tmp_path / "t.json")

    class Full:
        def write(self, _):
            raise OSError(28, "No space left on device")

        def flush(self):
            pass

        def close(self):
            raise OSError(28, "No space left on device")

    trace._file = Full()
    trace.instant("issue", step=1, group=0, decode=0, new=1, waiting=0)  # no exception reaches the caller
    trace.stage_spans(0, [(1.0, 1.5, {"kind": "decode", "rows": 3, "width": 1, "step": 1})])
    trace.close()
    assert "tracing stops, serving goes on" in caplog.text and "No space left" in caplog.text


def test_a_trace_at_its_size_limit_is_closed_complete_and_stops(tmp_path, caplog):
    trace = StepTrace(tmp_path / "t.json", max_bytes=4096)
    span = {"kind": "decode", "rows": 3, "width": 1, "step": 1}
    for step in range(200):  # about 150 bytes each: far past the limit
        trace.stage_spans(0, [(step * 1e-3, step * 1e-3 + 5e-4, dict(span, step=step))])
    size = (tmp_path / "t.json").stat().st_size
    assert 3000 < size <= 4096
    events = json.loads((tmp_path / "t.json").read_text())  # closed: a complete JSON array as it stands
    steps = [e["args"]["step"] for e in events if e["ph"] == "X"]
    assert steps == list(range(len(steps))) and 10 < len(steps) < 200
    assert "reached its limit of 4096 bytes" in caplog.text and "serving goes on" in caplog.text
    trace.instant("issue", step=1, group=0, decode=0, new=1, waiting=0)  # later events are dropped quietly
    trace.close()
    assert (tmp_path / "t.json").stat().st_size == size


def test_the_trace_size_limit_is_an_option_with_a_range():
    with pytest.raises(ValueError, match="trace_max_mb"):
        ServeOptions(trace_max_mb=0)
    with pytest.raises(ValueError, match="max_bytes"):
        StepTrace("/nonexistent/never-created.json", max_bytes=10)
