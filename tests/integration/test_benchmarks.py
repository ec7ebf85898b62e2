"""Every benchmark script runs with --quick on CPU and writes complete JSON and its plots."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.load_generator import client_processes

ROOT = Path(__file__).resolve().parents[2]

CASES = {  # script -> fields every result row (or the results dict) must have
    "pipeline_prefill.py": ["system", "microbatches", "seconds", "tokens_per_s", "speedup_vs_single", "gpipe_bound"],
    "decode_profile.py": ["batch", "wall_ms_per_step", "busy_ms_per_step", "kernels_per_step", "top"],
    "pipeline_decode.py": ["single_b1_ms_per_token", "pipeline_b1_ms_per_token", "throughput_ratio"],
    "schedules.py": ["system", "schedule", "microbatches", "tokens_per_s", "bubble_measured", "bubble_simulated",
                     "hop_latency_s", "simulated_over_timed"],
    "partitions.py": ["method", "stage_ms_measured"],
    "serve_load.py": ["concurrency", "http_busy", "http_processes"],
    "serve_frontend.py": ["concurrency", "tokens_per_s", "server_cpu_us_per_token", "http_busy"],
    "single_gpu.py": ["system", "compile_s", "logits"],
    "kernel_timings.py": ["op", "system", "rows", "us", "gb_per_s"],
}


EXTRA_ARGS = {"serve_frontend.py": ["clients=2"]}  # the load generator in several processes


def _quick(script: str, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"benchmarks.{Path(script).stem}", "--quick", f"out={out}",
                           *EXTRA_ARGS.get(script, [])], capture_output=True, text=True, timeout=230, cwd=ROOT)


@pytest.fixture(scope="module")
def schedules_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One `schedules.py --quick` run (every schedule, both peers), shared by the tests that read it."""
    out = tmp_path_factory.mktemp("schedules") / "result"
    return out, _quick("schedules.py", out)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("script", sorted(CASES))
def test_quick_run_writes_json_and_plot(script, tmp_path, request):
    if script == "schedules.py":
        out, proc = request.getfixturevalue("schedules_run")
    else:
        out = tmp_path / "result"
        proc = _quick(script, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(Path(f"{out}.json").read_text())
    assert {"env", "config", "results"} <= set(data)
    assert data["env"]["date"] and data["env"]["torch"]
    assert Path(f"{out}.png").stat().st_size > 1000
    results = data["results"]
    rows = results if isinstance(results, list) else [results]
    assert rows
    for field in CASES[script]:
        assert any(field in r and r[field] is not None for r in rows), field
    numbers = list(_numbers(results))
    assert numbers and all(math.isfinite(x) for x in numbers), "a figure is NaN or infinite"
    figures = [x for r in rows for k, v in r.items() if _is_figure(k) for x in _numbers(v)]
    assert all(x > 0 for x in figures), f"a timing or throughput figure is not positive: {figures}"
    if script in ("serve_load.py", "serve_frontend.py"):  # every request of every level answered in full
        max_tokens = data["config"]["max_tokens"]
        for r in rows:
            assert r["failed"] == 0 and r["tokens"] == r["requests"] * max_tokens, r
            assert r["client_processes"] == min(client_processes(data["config"]["clients"]), r["concurrency"])
    plotted = Path(f"{out}.plot.json")
    if plotted.exists():  # scripts that draw through common.save_figure record what they drew
        _check_plot_shows_json(json.loads(plotted.read_text()), numbers)


FIGURE_WORDS = ("tokens_per_s", "seconds", "_ms", "ms_per", "us", "gb_per_s")


def _is_figure(key: str) -> bool:
    """A measured time or throughput (must be > 0), as opposed to a ratio, bubble or count (may be 0)."""
    return any(key == w or key.endswith(w) or f"{w}_" in key for w in FIGURE_WORDS) and "error" not in key


def _numbers(value) -> list[float]:
    """Every number in a JSON value (bools excluded)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    items = value.values() if isinstance(value, dict) else value
    return [x for item in items for x in _numbers(item)]


def _check_plot_shows_json(series: list[dict], numbers: list[float]) -> None:
    """Each series drawn from measurements shows numbers of the JSON (in its unit or scaled by 1e3 / 1e-3 /
    1e6): lines and scatters with a legend label, and every bar group. Unlabelled lines (guides such as
    y = x) and lines labelled as bounds are drawn from a formula, not measured, and are not checked."""
    assert series, "the figure shows no data"
    checked = 0
    for s in series:
        assert not any(math.isinf(y) for y in s["y"]), f"infinite value plotted in {s}"  # NaN: a gap (None in the JSON)
        derived = s["kind"] != "bar" and (s["label"].startswith("_") or "bound" in s["label"].lower())
        if derived:
            continue
        for y in (v for v in s["y"] if not math.isnan(v)):
            assert any(math.isclose(y, x * f, rel_tol=1e-6, abs_tol=1e-9) for x in numbers
                       for f in (1.0, 1e3, 1e-3, 1e6)), f"{s['axes']!r} / {s['label']!r} plots {y}, not in the JSON"
            checked += 1
    assert checked, "no plotted value was checked against the JSON"


def _quick_schedules(out: Path, *args: str) -> list[dict]:
    """Run `schedules.py --quick` with `args`; its result rows."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.schedules", "--quick", *args, f"out={out}"],
                          capture_output=True, text=True, timeout=230, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(Path(f"{out}.json").read_text())["results"]


@pytest.mark.timeout(240)
def test_schedules_decode_workload_and_peers(tmp_path):
    out = tmp_path / "result"
    rows = _quick_schedules(out, "workload=decode", "microbatches=1,2")
    decode = [r for r in rows if r["schedule"] == "decode"]
    assert [r["microbatches"] for r in decode] == [1, 2]
    assert all(r["tokens_per_s"] > 0 and 0 <= r["bubble_simulated"] < 1 and r["simulated_over_measured"] > 0
               for r in decode)
    assert Path(f"{out}_decode_timeline.png").stat().st_size > 1000


@pytest.mark.timeout(240)
def test_schedules_prefill_records_the_single_device_peers(schedules_run):
    out, run = schedules_run
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(Path(f"{out}.json").read_text())["results"]
    # a finished run re-analysed from its JSON and traces
    proc = subprocess.run([sys.executable, "-m", "benchmarks.schedules", f"resimulate={out}.json"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads(Path(f"{out}_resimulated.json").read_text())["results"]
    ours = [r for r in again if r["system"] == "eet_pipe"]
    assert ours and all(r["simulated_over_timed"] > 0 and r["hop_latency_s"] >= 0 for r in ours)
    assert "gpipe" in proc.stdout
    systems = {r["system"] for r in rows}
    assert {"eet_pipe single device", "eet_pipe", "HF transformers (1 device)", "fairscale Pipe"} <= systems
    hf = next(r for r in rows if r["system"] == "HF transformers (1 device)")
    assert hf["tokens_per_s"] > 0
    fs = [r for r in rows if r["system"] == "fairscale Pipe"]  # measured, or its import error recorded
    assert all(r.get("tokens_per_s") or "fairscale" in (r.get("error") or "") for r in fs)


def test_hop_latency_takes_messages_whose_receiver_was_waiting():
    from benchmarks.schedules import hop_latency

    def ev(stage, kind, label, start, end):
        return {"stage": stage, "kind": kind, "label": label, "start": start, "end": end}

    events = [  # mb0 twice from 0 to 1 (interleaved: two rounds), mb1 once; the receiver waited for mb0 only
        ev(0, "send", "mb0 to stage 1", 1.0, 1.0), ev(1, "recv", "mb0 from stage 1", 0.5, 1.2),  # other link
        ev(1, "recv", "mb0 from stage 0", 0.9, 1.3),
        ev(0, "send", "mb1 to stage 1", 2.0, 2.0), ev(1, "recv", "mb1 from stage 0", 2.5, 2.6),  # not waiting
        ev(0, "send", "mb0 to stage 1", 3.0, 3.0), ev(1, "recv", "mb0 from stage 0", 2.9, 3.5),
        ev(0, "compute", "mb0 embed..layers.1", 0.0, 1.0),
    ]
    assert hop_latency(events) == pytest.approx(0.4)  # median of 0.3 and 0.5; mb1 (receiver late) ignored
    assert hop_latency([e for e in events if e["kind"] != "recv"]) == 0.0


def test_busy_time_counts_overlapping_kernel_spans_once():
    from benchmarks.decode_profile import union_length

    # a kernel launched early (PDL) spans its wait: [0, 3] and [2, 5] overlap on [2, 3]; [7, 8] stands alone,
    # [7.2, 7.5] lies inside it
    assert union_length([(2.0, 5.0), (0.0, 3.0), (7.0, 8.0), (7.2, 7.5)]) == pytest.approx(6.0)
    assert union_length([]) == 0.0


def test_exposed_time_charges_each_instant_to_the_running_kernel():
    from benchmarks.decode_profile import exposed_times, union_length

    # "norm" [0, 3] runs first; "gemv" launched early (PDL) spans [1, 5]: it runs from 3 to 5 except while
    # a kernel that ends earlier, "norm" [4.5, 4.8], covers the time; "attn" [7, 8] after a gap adds its span
    spans = [("gemv", 1.0, 5.0), ("norm", 0.0, 3.0), ("attn", 7.0, 8.0), ("norm", 4.5, 4.8)]
    charged = exposed_times(spans)
    assert charged == pytest.approx({"norm": 3.0 + 0.3, "gemv": 1.5 + 0.2, "attn": 1.0})
    assert sum(charged.values()) == pytest.approx(union_length([(s, e) for _, s, e in spans]))


@pytest.mark.timeout(180)
def test_load_generator_counts_refused_and_answered_requests_apart():
    """A level against a server that refuses (401: wrong key) records every request as failed with the status;
    the same level with the key gets every token of every request, with positive TTFT and TPOT."""
    from benchmarks.load_generator import run_level
    from eet_pipe.serving.process import ServerProcess

    opts = {"max_tokens": 4, "temperature": 0.0}
    with ServerProcess(["--stages", "1", "model=tiny", "api_key=K", "log_level=warning", "max_slots=4"]) as server:
        server.wait_ready(120)
        refused = run_level(server.url, {"Authorization": "Bearer wrong"}, 2, 3, ["hi"], opts)
        assert refused["failed"] == 3 and refused["tokens"] == 0
        assert refused["errors"] and refused["errors"][0].startswith("HTTP 401"), refused["errors"]
        served = run_level(server.url, {"Authorization": "Bearer K"}, 2, 3, ["hi"], opts)
    assert served["failed"] == 0 and served["tokens"] == 12, served["errors"]
    assert served["ttft_s"]["p50"] > 0 and served["tpot_s"]["p50"] > 0
