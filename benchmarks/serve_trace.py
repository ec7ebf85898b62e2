"""Where a server's time went, from its step trace (`python -m eet_pipe.serve ... trace=steps.json`).

    python -m benchmarks.serve_trace steps.json            # the whole run (warm-up steps left out)

Per stage: busy fraction of the window, time by kind of forward (decode / prompt, replayed from a CUDA
graph or eager, and forwards that captured a graph), rows and padding, and the idle gaps between
forwards; per window: steps, what the scheduler issued, how long admitted requests waited for their step
(first in, first out), how long issued steps waited behind the ones queued before them, and how long a
step's result took from its end on the last stage to the scheduler. `benchmarks/serve_load.py trace=on` gives
this per concurrency level, and with its closed loop of C clients the refill time: from the k-th sequence that
finished in the level to the (k + C)-th that reached the scheduler, the next request its end made room for
(the HTTP process, the client and back; at most C sequences are in the server at once).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from eet_pipe.serving.step_trace import SCHEDULER_TID, read_step_trace

GAP_S = 2e-4
"""Idle time between two forwards of a stage that counts as a gap (shorter ones are launch latency)."""


def _kind(label: dict) -> str:
    if label.get("captured"):
        return "capture"
    return f"{label['kind']} {'graph' if label['graphed'] else 'eager'}"


def summarize(events: list[dict], start: float | None = None, end: float | None = None,
              clients: int | None = None) -> dict[str, Any]:
    """The figures of the window [start, end] (perf_counter seconds; default: from the first to the last
    forward of a served step, warm-up left out); `clients`: the closed loop's client count, for `refill_ms`."""
    spans = [e for e in events if e.get("ph") == "X" and e["args"].get("step", 0) > 0]
    if start is None:
        start = min((e["ts"] for e in spans), default=0.0) / 1e6
    if end is None:
        end = max((e["ts"] + e["dur"] for e in spans), default=0.0) / 1e6
    lo, hi = start * 1e6, end * 1e6
    window = max(hi - lo, 1e-9)
    stages: dict[str, Any] = {}
    for tid in sorted({e["tid"] for e in spans}):
        mine = sorted((e for e in spans if e["tid"] == tid and e["ts"] < hi and e["ts"] + e["dur"] > lo),
                      key=lambda e: e["ts"])
        kinds: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        busy = 0.0
        rows = padded_rows = prompt_tokens = prompt_padded = 0
        decodes = 0
        for e in mine:
            dur = min(e["ts"] + e["dur"], hi) - max(e["ts"], lo)
            busy += dur
            k = kinds[_kind(e["args"])]
            k[0] += 1
            k[1] += dur / 1e3
            a = e["args"]
            if a["kind"] == "decode":
                decodes += 1
                rows += a["rows"]
                padded_rows += a["padded_rows"]
            else:
                prompt_tokens += a["tokens"]
                prompt_padded += a["padded_rows"] * a["padded_width"]
        gaps = [b["ts"] - (a["ts"] + a["dur"]) for a, b in zip(mine, mine[1:], strict=False)]
        gaps = [g for g in gaps if g > GAP_S * 1e6]
        stages[str(tid)] = {
            "busy_fraction": busy / window, "forwards": len(mine),
            "by_kind": {k: {"count": int(v[0]), "ms": v[1]} for k, v in sorted(kinds.items())},
            "decode_rows_mean": rows / decodes if decodes else None,
            "decode_padding": 1 - rows / padded_rows if padded_rows else None,
            "prompt_tokens": prompt_tokens,
            "prompt_padding": 1 - prompt_tokens / prompt_padded if prompt_padded else None,
            "gaps": {"count": len(gaps), "ms": sum(gaps) / 1e3, "max_ms": max(gaps, default=0.0) / 1e3}}
    scheduler = sorted((e for e in events if e.get("ph") == "i" and e.get("tid") == SCHEDULER_TID),
                       key=lambda e: e["ts"])
    issue_events = [e for e in scheduler if e["name"] == "issue" and lo <= e["ts"] <= hi]
    issues = [e["args"] for e in issue_events]
    return {"window_s": window / 1e6, "steps": len({e["args"]["step"] for e in spans if lo <= e["ts"] <= hi}),
            "stages": stages,
            "issued": {"steps": len(issues), "decode_rows_mean": sum(a["decode"] for a in issues) / len(issues)
                       if issues else None, "admitted": sum(a["new"] for a in issues),
                       "with_prompts": sum(1 for a in issues if a["new"])},
            "admission_wait_ms": _admission_waits(scheduler, lo, hi),
            "issue_to_start_ms": _issue_to_start(issue_events, spans),
            "end_to_result_ms": _end_to_result(scheduler, spans, lo, hi),
            "refill_ms": _refill(scheduler, lo, hi, clients)}


def _quantiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "max": None}
    values = sorted(values)
    return {"p50": values[len(values) // 2], "p90": values[min(len(values) - 1, int(len(values) * 0.9))],
            "max": values[-1]}


def _admission_waits(scheduler: list[dict], lo: float, hi: float) -> dict[str, float | None]:
    """Milliseconds from a request reaching the scheduler to the step that admits it, for the admissions in
    [lo, hi] (µs), matching arrivals to admissions first in, first out (as the scheduler's queue is; a
    request of n choices counts as its first). `scheduler`: the scheduler's instants in time order."""
    arrivals: list[float] = []
    waits: list[float] = []
    taken = 0
    arrival = "submit" if any(e["name"] == "submit" for e in scheduler) else "inbox"  # older traces: the drain
    for e in scheduler:
        if e["name"] == arrival:
            arrivals += [e["ts"]] * e["args"].get("submits", 1)
        elif e["name"] == "issue" and e["args"]["new"]:
            admitted = arrivals[taken: taken + e["args"]["new"]]
            taken += len(admitted)
            if lo <= e["ts"] <= hi:
                waits += [(e["ts"] - t) / 1e3 for t in admitted]
    return _quantiles(waits)


def _refill(scheduler: list[dict], lo: float, hi: float, clients: int | None) -> dict[str, float | None]:
    """Milliseconds from the k-th sequence finishing in [lo, hi] (µs) to the (k + clients)-th sequence reaching
    the scheduler in it: in a closed loop of `clients` clients each end makes room for one next request, so
    this is how long a freed place stays empty before a new sequence takes it."""
    if not clients:
        return _quantiles([])
    inside = [e for e in scheduler if lo <= e["ts"] <= hi]
    finished = [e["ts"] for e in inside if e["name"] == "result" for _ in range(e["args"].get("finished", 0))]
    arrived = [e["ts"] for e in inside if e["name"] == "submit" for _ in range(e["args"].get("sequences", 1))]
    return _quantiles([(arrived[k + clients] - t) / 1e3 for k, t in enumerate(finished) if k + clients < len(arrived)])


def _end_to_result(scheduler: list[dict], spans: list[dict], lo: float, hi: float) -> dict[str, float | None]:
    """Milliseconds from the end of a step's last forward on the last stage to the scheduler reading its
    result (the tokens' copy to the host, the message, the wait for the scheduler thread)."""
    last = max((e["tid"] for e in spans), default=0)
    ends: dict[int, float] = {}
    for e in spans:
        if e["tid"] == last:
            step = e["args"]["step"]
            ends[step] = max(ends.get(step, 0.0), e["ts"] + e["dur"])
    return _quantiles([(e["ts"] - ends[e["args"]["step"]]) / 1e3 for e in scheduler
                       if e["name"] == "result" and lo <= e["ts"] <= hi and e["args"]["step"] in ends])


def _issue_to_start(issues: list[dict], spans: list[dict]) -> dict[str, float | None]:
    """Milliseconds from a step's issue to the start of its first forward on the first stage (its wait behind
    the steps queued before it)."""
    first: dict[int, float] = {}
    for e in spans:
        if e["tid"] == 0 and e["args"].get("chunk", 0) == 0:
            step = e["args"]["step"]
            first[step] = min(first.get(step, e["ts"]), e["ts"])
    return _quantiles([(first[e["args"]["step"]] - e["ts"]) / 1e3 for e in issues if e["args"]["step"] in first])


def describe(summary: dict[str, Any]) -> str:
    """A few lines for the console."""
    wait, queued = summary["admission_wait_ms"], summary["issue_to_start_ms"]
    lines = [f"{summary['window_s'] * 1e3:.0f} ms, {summary['steps']} steps; issued {summary['issued']['steps']} "
             f"({summary['issued']['with_prompts']} with prompts, {summary['issued']['admitted']} admitted)"
             + ("" if wait["p50"] is None else f"; admission wait p50 {wait['p50']:.1f} / p90 {wait['p90']:.1f} ms")
             + ("" if queued["p50"] is None else f"; issue to start p50 {queued['p50']:.1f} / p90 {queued['p90']:.1f} ms")
             + ("" if summary["end_to_result_ms"]["p50"] is None else
                f"; end to result p50 {summary['end_to_result_ms']['p50']:.1f} ms")
             + ("" if summary.get("refill_ms", {}).get("p50") is None else
                f"; refill p50 {summary['refill_ms']['p50']:.1f} / p90 {summary['refill_ms']['p90']:.1f} ms")]
    for tid, s in summary["stages"].items():
        kinds = ", ".join(f"{k} {v['count']} / {v['ms']:.1f} ms" for k, v in s["by_kind"].items())
        pad = "" if s["decode_padding"] is None else f", decode rows {s['decode_rows_mean']:.1f} " \
                                                     f"(padding {s['decode_padding']:.0%})"
        lines.append(f"  stage {tid}: busy {s['busy_fraction']:.0%}; {kinds}{pad}; gaps {s['gaps']['count']} "
                     f"= {s['gaps']['ms']:.1f} ms (max {s['gaps']['max_ms']:.1f})")
    return "\n".join(lines)


def trace_levels(levels: list[dict], trace: Path) -> None:
    """Add each level's figures from the server's step trace (`summarize`), and print them."""
    events = read_step_trace(trace)
    for level in levels:
        level["trace"] = summarize(events, level["began_s"], level["ended_s"], level["concurrency"])
        print(f"concurrency {level['concurrency']:>4}, trace: {describe(level['trace'])}", file=sys.stderr)


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        raise SystemExit(__doc__)
    summary = summarize(read_step_trace(sys.argv[1]))
    print(describe(summary))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
