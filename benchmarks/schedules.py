"""Every schedule and microbatch count in one run: measured throughput, latency and bubble (from the
engine's trace) next to the simulator's prediction for the same schedule and the measured per-chunk
costs, plus the peers in the same run: our single device, HF transformers on one device,
torch.distributed.pipelining (GPipe and interleaved) and fairscale `Pipe` (when installed).

    python -m benchmarks.schedules model=gpt2-xl weights=random dtype=fp16 devices=cuda:0,cuda:1 \
        batch=32 seq=512 microbatches=1,2,4,8,16,32
    python -m benchmarks.schedules workload=decode batch=64 prompt=32 new=64 microbatches=1,2,4,8
    python -m benchmarks.schedules --quick          # CPU smoke run (tiny model, 2 gloo stages)
    python -m benchmarks.schedules resimulate=docs/perf/2026-11-26-late/h100x4/schedules/schedules.json   # re-analyse a run

Two warm-up calls by default: with CUDA graphs a new shape runs eager on its first call and is captured on
its second, so a single warm-up would leave a capture inside the timed calls.

workload=decode runs `generate` with M sequence groups in flight (the decode schedule) against our
single-device generate at the same batch; the simulator replays the decode schedule on the measured
per-chunk step times.

Two ratios per row: `simulated_over_measured` is the simulated makespan over the traced call's span (first to
last action, the schedule itself); `simulated_over_timed` is it over the untraced timed call, which also holds
the command's fixed host work (sending it to the workers, per-command setup, the reply) and is not slowed by
the trace's own events, which matters for host-bound cases (many short chunks).

Writes <out>.json (environment, config, one row per schedule x M), <out>.png (tokens/s vs M per
schedule, and simulated vs measured makespan) and one timeline PNG per schedule.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import torch

import eet_pipe
from benchmarks.common import environment, parse_args, prefill_batch, progress, save_figure, time_it, write_json
from benchmarks.peers import fairscale_pipe, hf_gpt2, torch_pipelining
from benchmarks.pipeline_prefill import single_device
from eet_pipe import PipelineEngine
from eet_pipe.loading import presets
from eet_pipe.runtime.trace import bubble_fraction, events_span, plot_timeline, read_chrome_trace
from eet_pipe.schedule import build, simulate

DEFAULTS = {"model": "gpt2-xl", "weights": "random", "dtype": "fp16", "devices": ["cuda:0", "cuda:1"], "batch": 32,
            "seq": 512, "microbatches": ["1", "2", "4", "8", "16", "32"], "schedules": ["sequential", "gpipe",
            "interleaved2", "interleaved4"], "warmup": 2, "repeats": 3, "peers": ["hf", "torch", "fairscale"],
            "workload": "prefill", "prompt": 32, "new": 64, "out": "bench_results/schedules", "resimulate": ""}
QUICK = {"model": "tiny", "weights": "", "dtype": "fp32", "devices": ["cpu", "cpu"], "batch": 8, "seq": 32,
         "microbatches": ["1", "2", "4"], "schedules": ["sequential", "gpipe", "interleaved2"], "warmup": 1,
         "repeats": 1, "peers": ["hf", "fairscale"], "new": 8, "prompt": 8}
PEERS = ("hf", "torch", "fairscale")
FIELDS = ("system", "schedule", "virtual", "microbatches", "seconds", "tokens_per_s", "latency_s", "bubble_measured",
          "bubble_simulated", "makespan_simulated_s", "simulated_over_measured", "simulated_over_timed",
          "hop_latency_s")


_MESSAGE = re.compile(r"(.+) (?:to|from) stage (\d+)$")


def hop_latency(events: list[dict]) -> float:
    """Measured time of one message: from the sender issuing it to the receiver holding the data, median over
    the messages whose receiver was already waiting (otherwise the receive only shows when it was reached).
    The i-th send of a microbatch from stage a to b is matched with the i-th receive of it at b from a."""
    sends: dict[tuple, list[dict]] = {}
    recvs: dict[tuple, list[dict]] = {}
    for e in sorted(events, key=lambda e: e["start"]):
        match = _MESSAGE.match(e["label"]) if e["kind"] in ("send", "recv") else None
        if match:
            what, peer = match.group(1), int(match.group(2))
            key = (what, e["stage"], peer) if e["kind"] == "send" else (what, peer, e["stage"])
            (sends if e["kind"] == "send" else recvs).setdefault(key, []).append(e)
    waited = [r["end"] - s["start"] for key, ss in sends.items()
              for s, r in zip(ss, recvs.get(key, []), strict=False)  # a traced call may end with sends only
              if r["start"] <= s["start"]]
    return statistics.median(waited) if waited else 0.0


def predicted(events: list[dict], labels: list[str], schedule: str, stages: int, m: int, v: int,
              steps: int = 1) -> tuple[float, float, float]:
    """Simulated makespan and bubble for the schedule, each chunk costing its own measured median compute
    time per microbatch and each message the measured hop latency (`hop_latency`, also returned); what the
    simulation misses is the host's own work per action and per command, which the ratio to the
    measurement shows."""
    by_chunk: dict[str, list[float]] = {}
    for e in events:
        if e["kind"] == "compute":
            by_chunk.setdefault(e["label"].rsplit(" ", 1)[1], []).append(e["end"] - e["start"])
    costs = [statistics.median(by_chunk[label]) if label in by_chunk else 0.0 for label in labels]
    if schedule == "decode":
        sched = build("decode", stages, m, v, steps)
    else:
        sched = build(schedule, stages, m if schedule != "sequential" else 1, v)
    hop = hop_latency(events)
    result = simulate(sched, costs, transfer=hop)
    return result.makespan, result.bubble, hop


def run_schedule(opts: dict, ids: torch.Tensor, name: str, ms: list[int], bar) -> list[dict]:
    schedule, v = ("interleaved", int(name[len("interleaved"):])) if name.startswith("interleaved") else (name, 1)
    rows = []
    out = Path(opts["out"])
    with PipelineEngine(opts["model"], weights=opts["weights"] or None, dtype=opts["dtype"], devices=opts["devices"],
                        schedule=schedule, virtual=max(v, 2), plan="even", timeout=600, cpu_threads=1) as engine:
        for m in ([1] if schedule == "sequential" else ms):
            seconds = time_it(lambda: engine.forward(ids, output="none", microbatches=m), [], opts["warmup"],
                              opts["repeats"])
            engine.trace_path = str(out.parent / f"{out.name}_{name}_M{m}_trace.json")
            engine.forward(ids, output="none", microbatches=m)
            engine.trace_path = None
            events = engine.last_trace
            sim_makespan, sim_bubble, hop = predicted(events, engine.plan.chunk_labels(), schedule,
                                                      len(opts["devices"]), m, v)
            measured = events_span(events)
            rows.append({"system": "eet_pipe", "schedule": schedule, "virtual": v, "microbatches": m,
                         "seconds": seconds, "tokens_per_s": ids.numel() / seconds, "latency_s": seconds,
                         "bubble_measured": bubble_fraction(events, len(opts["devices"])),
                         "bubble_simulated": sim_bubble, "makespan_simulated_s": sim_makespan,
                         "simulated_over_measured": sim_makespan / measured if measured else None,
                         "simulated_over_timed": sim_makespan / seconds, "hop_latency_s": hop})
            bar.update()
        plot_timeline(events, out.parent / f"{out.name}_{name}_timeline.png", len(opts["devices"]),
                      title=f"{name} M={rows[-1]['microbatches']}")
    return rows


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for key in sorted({(r["system"], r["schedule"], r["virtual"]) for r in rows}):
        pts = sorted((r["microbatches"], r["tokens_per_s"]) for r in rows
                     if (r["system"], r["schedule"], r["virtual"]) == key and r.get("tokens_per_s"))
        if pts:
            a.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{key[0]} {key[1]} v{key[2]}")
    a.set_xscale("log", base=2)
    a.set_xlabel("microbatches M")
    a.set_ylabel("tokens/s")
    a.legend(fontsize=7)
    ours = [r for r in rows if r.get("makespan_simulated_s")]
    b.scatter([r["seconds"] for r in ours], [r["makespan_simulated_s"] for r in ours], s=12)
    hi = max([r["seconds"] for r in ours] + [1e-9])
    b.plot([0, hi], [0, hi], "k--", lw=0.8)
    b.set_xlabel("measured s")
    b.set_ylabel("simulated makespan s")
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def hf_row(opts: dict, ids: torch.Tensor) -> dict:
    """HF transformers' forward of the whole batch on the first device."""
    device = opts["devices"][0]
    try:
        hf = hf_gpt2(opts["model"], opts["weights"] or None, device)
    except (ValueError, RuntimeError) as err:
        return {"system": "HF transformers (1 device)", "schedule": "none", "error": str(err)}
    x = ids.to(device)

    def run() -> None:
        with torch.inference_mode():
            hf(x, use_cache=False)

    seconds = time_it(run, [device], opts["warmup"], opts["repeats"])
    hf = None
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"system": "HF transformers (1 device)", "schedule": "none", "virtual": 1, "microbatches": 1,
            "seconds": seconds, "tokens_per_s": ids.numel() / seconds, "latency_s": seconds}


def peer_rows(opts: dict, ids: torch.Tensor, ms: list[int]) -> list[dict]:
    rows = []
    unknown = [p for p in opts["peers"] if p not in PEERS]
    if unknown:
        raise SystemExit(f"peers={','.join(unknown)} unknown; choose from {','.join(PEERS)}")
    if "hf" in opts["peers"]:
        rows.append(hf_row(opts, ids))
    runs = []
    if "torch" in opts["peers"]:
        runs += [("torch.distributed.pipelining", s, torch_pipelining({**opts, "microbatches": ms, "schedule": s}))
                 for s in ("gpipe", "interleaved")]
    if "fairscale" in opts["peers"]:
        runs.append(("fairscale Pipe", "gpipe", fairscale_pipe(opts, ms)))
    for system, schedule, peer in runs:
        rows += [{"system": system, "schedule": schedule, "virtual": 2 if schedule == "interleaved" else 1, **r,
                  "tokens_per_s": ids.numel() / r["seconds"], "latency_s": r["seconds"]} for r in peer["results"]]
        if not peer["ok"]:
            rows.append({"system": system, "schedule": schedule, "error": peer["error"][-2000:]})
    return rows


def decode_rows(opts: dict, ms: list[int], bar) -> list[dict]:
    """The decode schedule with M groups in flight vs our single device, same prompts and lengths."""
    cfg = presets.resolve_model(opts["model"], opts["weights"] or None).cfg
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, cfg.vocab_size, (opts["batch"], opts["prompt"]), generator=gen).tolist()
    new = opts["new"]
    tokens = opts["batch"] * new
    lm = eet_pipe.from_pretrained(opts["model"], weights=opts["weights"] or None, dtype=opts["dtype"],
                                  device=opts["devices"][0])
    single = time_it(lambda: lm.generate(prompts, max_new_tokens=new, ignore_eos=True), opts["devices"][:1],
                     max(opts["warmup"], 1), opts["repeats"])
    lm = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    rows = [{"system": "eet_pipe single device", "schedule": "none", "virtual": 1, "microbatches": 1,
             "seconds": single, "tokens_per_s": tokens / single, "latency_s": single / new}]
    bar.update()
    out = Path(opts["out"])
    p = len(opts["devices"])
    with PipelineEngine(opts["model"], weights=opts["weights"] or None, dtype=opts["dtype"], devices=opts["devices"],
                        timeout=600, cpu_threads=1) as engine:
        for m in [m for m in ms if m <= opts["batch"]]:
            def run(m: int = m) -> None:
                engine.generate(prompts, max_new_tokens=new, ignore_eos=True, microbatches=m)

            seconds = time_it(run, [], max(opts["warmup"], 1), opts["repeats"])
            engine.trace_path = str(out.parent / f"{out.name}_decode_M{m}_trace.json")
            run()
            engine.trace_path = None
            events = engine.last_trace
            # the first step is the prefill: simulate the decode steps only (steps >= 1)
            steps_events = [e for e in events if " t0 " not in e["label"]]
            sim_makespan, sim_bubble, hop = predicted(steps_events, engine.plan.chunk_labels(), "decode", p, m, 1,
                                                      new - 1)
            measured = events_span(steps_events)
            rows.append({"system": "eet_pipe", "schedule": "decode", "virtual": 1, "microbatches": m,
                         "seconds": seconds, "tokens_per_s": tokens / seconds, "latency_s": seconds / new,
                         "bubble_measured": bubble_fraction(steps_events, p), "bubble_simulated": sim_bubble,
                         "makespan_simulated_s": sim_makespan,
                         "simulated_over_measured": sim_makespan / measured if measured else None,
                         "hop_latency_s": hop})
            bar.update()
        plot_timeline(events, out.parent / f"{out.name}_decode_timeline.png", p, title=f"decode M={m}")
    return rows


def chunk_labels(events: list[dict], units: list[str]) -> list[str]:
    """Chunk labels of a trace (`unit_range`s) in pipeline order, by the position of their first unit."""
    labels = {e["label"].rsplit(" ", 1)[1] for e in events if e["kind"] == "compute"}
    return sorted(labels, key=lambda label: units.index(label.split("..")[0]))


def resimulate(path: str) -> None:
    """Recompute the simulator's columns of a finished prefill run from its JSON and the traces beside it
    (written next to the JSON as <name>_resimulated.json): for re-analysing a run after the model of the
    simulation changed, without the GPUs."""
    src = Path(path)
    data = json.loads(src.read_text())
    stages = len(data["config"]["devices"])
    units = presets.resolve_model(data["config"]["model"], data["config"]["weights"] or None).cfg.unit_names()
    stem = src.with_suffix("")
    print(f"{'schedule':<13} {'M':>3} {'hop us':>7} {'sim/traced':>10} {'sim/timed':>9}")
    for r in data["results"]:
        if r.get("system") != "eet_pipe" or r.get("schedule") not in ("sequential", "gpipe", "interleaved"):
            continue
        name = r["schedule"] + (str(r["virtual"]) if r["schedule"] == "interleaved" else "")
        trace = Path(f"{stem}_{name}_M{r['microbatches']}_trace.json")
        if not trace.exists():
            print(f"{name:<13} {r['microbatches']:>3} trace {trace.name} missing")
            continue
        events = read_chrome_trace(trace)
        makespan, bubble, hop = predicted(events, chunk_labels(events, units), r["schedule"], stages,
                                          r["microbatches"], r["virtual"])
        traced = events_span(events)
        r.update({"makespan_simulated_s": makespan, "bubble_simulated": bubble, "hop_latency_s": hop,
                  "simulated_over_measured": makespan / traced, "simulated_over_timed": makespan / r["seconds"]})
        print(f"{name:<13} {r['microbatches']:>3} {hop * 1e6:>7.1f} {makespan / traced:>10.3f} "
              f"{makespan / r['seconds']:>9.3f}")
    write_json(Path(f"{stem}_resimulated.json"), data)


def save(opts: dict, ms: list[int], rows: list[dict], partial: bool = False) -> None:
    for r in rows:
        for f in FIELDS:
            r.setdefault(f, None)
    data = {"env": environment(), "config": {**opts, "microbatches": ms}, "results": rows, "partial": partial}
    write_json(Path(opts["out"] + ".json"), data)


def main() -> None:
    opts = parse_args(DEFAULTS, QUICK)
    if opts["resimulate"]:
        resimulate(opts["resimulate"])
        return
    ms, ids = prefill_batch(opts)
    Path(opts["out"]).parent.mkdir(parents=True, exist_ok=True)
    if opts["workload"] not in ("prefill", "decode"):
        raise SystemExit(f"workload={opts['workload']!r} is invalid; allowed: prefill, decode")
    if opts["workload"] == "decode":
        bar = progress(1 + len(ms), "schedules (decode)")
        rows = decode_rows(opts, ms, bar)
    else:
        bar = progress(1 + sum(1 if s == "sequential" else len(ms) for s in opts["schedules"]), "schedules")
        single = single_device(opts, ids)[1]
        bar.update()
        rows = [{"system": "eet_pipe single device", "schedule": "none", "virtual": 1, "microbatches": 1,
                 "seconds": single, "tokens_per_s": ids.numel() / single, "latency_s": single}]
        for name in opts["schedules"]:
            rows += run_schedule(opts, ids, name, ms, bar)
            save(opts, ms, rows, partial=True)  # a run cut short by a time limit keeps what it measured
        rows += peer_rows(opts, ids, ms)
    bar.close()
    save(opts, ms, rows)
    shape = f"{opts['batch']}x{opts['seq']}" if opts["workload"] == "prefill" else \
        f"decode {opts['batch']} seqs, {opts['prompt']}+{opts['new']} tokens"
    plot(rows, opts["out"] + ".png", f"{opts['model']} {shape} on {len(opts['devices'])} devices")
    print(f"{'system':<30} {'schedule':<12} {'M':>3} {'tok/s':>10} {'bubble':>7} {'sim bubble':>10} {'sim/meas':>8} "
          f"{'sim/timed':>9}")
    for r in rows:
        if r.get("tokens_per_s"):
            fmt = lambda x, spec: format(x, spec) if x is not None else "-"  # noqa: E731
            print(f"{r['system']:<30} {r['schedule'] + ('' if r['virtual'] == 1 else str(r['virtual'])):<12} "
                  f"{r['microbatches']:>3} {r['tokens_per_s']:>10.0f} {fmt(r['bubble_measured'], '7.1%')} "
                  f"{fmt(r['bubble_simulated'], '10.1%')} {fmt(r['simulated_over_measured'], '8.2f')} "
                  f"{fmt(r['simulated_over_timed'], '9.2f')}")


if __name__ == "__main__":
    main()
