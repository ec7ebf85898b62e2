"""Prefill throughput: our single GPU vs our gpipe / interleaved pipelines vs torch.distributed.pipelining,
all in one run on the same devices.

    python -m benchmarks.pipeline_prefill model=gpt2-xl weights=random dtype=fp16 devices=cuda:0,cuda:1 \
        batch=32 seq=512 microbatches=4,8,16,32
    python -m benchmarks.pipeline_prefill --quick        # CPU smoke run (tiny model, 2 gloo stages)

Our pipelines use `plan=auto` (profiled and balanced; `plan=even` splits layers evenly); the peer
splits layers evenly. "of bound" compares with our single device running the whole batch at once; "same-M bound" with our
single device running the same M microbatches one after another (graph-replayed), which separates the
pipeline's efficiency from the smaller microbatches' GEMM efficiency.
Writes <out>.json (environment, config, every figure) and <out>.png (tokens/s vs microbatches, with the
GPipe bound P·M/(M+P−1) × our single-device figure), and a trace timeline of our gpipe run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

import eet_pipe
from benchmarks.common import environment, parse_args, prefill_batch, progress, save_figure, time_it, write_json
from benchmarks.peers import torch_pipelining
from eet_pipe import PipelineEngine
from eet_pipe.models.meta import StepMeta, prefill_meta
from eet_pipe.ops.cuda_graphs import graphed
from eet_pipe.runtime.commands import split_rows

DEFAULTS = {"model": "gpt2-xl", "weights": "random", "dtype": "fp16", "devices": ["cuda:0", "cuda:1"], "batch": 32,
            "seq": 512, "microbatches": ["4", "8", "16", "32"], "warmup": 2, "repeats": 5, "peer": "yes", "plan": "auto",
            "out": "bench_results/pipeline_prefill"}
QUICK = {"model": "tiny", "weights": "", "dtype": "fp32", "devices": ["cpu", "cpu"], "batch": 8, "seq": 32,
         "microbatches": ["1", "2", "4"], "warmup": 1, "repeats": 2}


def single_device(opts: dict, ids: torch.Tensor, ms: Sequence[int] = (1,)) -> dict[int, float]:
    """Seconds of the batch on our single device, for each M run as M microbatches one after another.

    M = 1 is the whole batch in one forward (the baseline of the GPipe bound); for M > 1 each
    microbatch forward is replayed from a CUDA graph, as pipeline stages run theirs, so the ratio of a
    pipeline to this figure isolates the pipeline's own efficiency from microbatch size effects.
    """
    lm = eet_pipe.from_pretrained(opts["model"], weights=opts["weights"] or None, dtype=opts["dtype"],
                                  device=opts["devices"][0])
    out = {}
    for m in ms:
        calls = []
        for rows in split_rows(ids.shape[0], m):
            x = ids[rows].to(lm.device)
            meta = prefill_meta(torch.ones(x.shape, dtype=torch.bool)).to(lm.device)

            def run(x: torch.Tensor = x, meta: StepMeta = meta) -> None:
                with torch.inference_mode():
                    lm.model(x, meta)

            calls.append(run)
        if m > 1:
            for run in calls:
                run()  # warm-up, then capture
            calls = [graphed(run, lm.device) for run in calls]
        out[m] = time_it(lambda calls=calls: [run() for run in calls], opts["devices"][:1], opts["warmup"],
                         opts["repeats"])
        calls = None
    lm = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def ours(opts: dict, ids: torch.Tensor, schedule: str, ms: list[int], bar) -> list[dict]:
    rows = []
    with PipelineEngine(opts["model"], weights=opts["weights"] or None, dtype=opts["dtype"], devices=opts["devices"],
                        schedule=schedule, virtual=2, plan=opts["plan"], timeout=600, cpu_threads=1) as engine:
        chunks = engine.plan.chunk_labels()
        for m in ms:
            seconds = time_it(lambda: engine.forward(ids, output="none", microbatches=m), [], opts["warmup"],
                              opts["repeats"])
            rows.append({"system": f"eet_pipe {schedule}", "microbatches": m, "seconds": seconds, "chunks": chunks})
            bar.update()
        if schedule == "gpipe":
            engine.trace_path = opts["out"] + f"_trace_{schedule}_M{ms[len(ms) // 2]}.json"
            engine.forward(ids, output="none", microbatches=ms[len(ms) // 2])
            rows[-1]["trace_bubble"] = engine.last_bubble
    return rows


def plot(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    systems = sorted({r["system"] for r in data["results"] if r["microbatches"]})
    for name in systems:
        pts = sorted((r["microbatches"], r["tokens_per_s"]) for r in data["results"] if r["system"] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ms = sorted({r["microbatches"] for r in data["results"] if r["microbatches"]})
    p, single = len(data["config"]["devices"]), data["single_tokens_per_s"]
    ax.plot(ms, [single * p * m / (m + p - 1) for m in ms], "k--", label="GPipe bound (from our 1 device)")
    ax.axhline(single, color="gray", lw=0.8, label="our single device")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("microbatches M")
    ax.set_ylabel("prefill tokens/s")
    ax.set_title(f"{data['config']['model']} prefill {data['config']['batch']}x{data['config']['seq']}, "
                 f"{p} x {data['env']['gpus'][0] if data['env']['gpus'] else 'CPU'}", fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    opts = parse_args(DEFAULTS, QUICK)
    ms, ids = prefill_batch(opts)
    tokens = opts["batch"] * opts["seq"]
    bar = progress(1 + 2 * len(ms) + (1 if opts["peer"] == "yes" else 0), "pipeline_prefill")
    singles = single_device(opts, ids, [1, *ms])
    single = singles[1]
    bar.update()
    rows = [{"system": "eet_pipe single device", "microbatches": 1, "seconds": single}]
    rows += ours(opts, ids, "gpipe", ms, bar)
    rows += ours(opts, ids, "interleaved", ms, bar)
    peer = {"ok": False, "error": "skipped"}
    if opts["peer"] == "yes":
        for schedule in ("gpipe", "interleaved"):
            peer = torch_pipelining({**opts, "microbatches": ms, "schedule": schedule})
            rows += [{"system": f"torch.distributed.pipelining {schedule}", **r} for r in peer["results"]]
            if not peer["ok"]:
                rows.append({"system": f"torch.distributed.pipelining {schedule}", "microbatches": None,
                             "seconds": None, "error": peer["error"][-2000:]})
        bar.update()
    p = len(opts["devices"])
    for r in rows:
        if r.get("seconds"):
            r["tokens_per_s"] = tokens / r["seconds"]
            r["speedup_vs_single"] = single / r["seconds"]
            m = r["microbatches"]
            r["gpipe_bound"] = p * m / (m + p - 1)
            r["fraction_of_bound"] = r["speedup_vs_single"] / r["gpipe_bound"]
            # against one device running the same M microbatches: the pipeline's own efficiency
            r["single_same_microbatches_s"] = singles.get(m)
            r["fraction_of_bound_same_microbatches"] = singles[m] / r["seconds"] / r["gpipe_bound"] \
                if m in singles else None
    data = {"env": environment(), "config": {**opts, "microbatches": ms}, "single_tokens_per_s": tokens / single,
            "single_same_microbatches_s": {str(m): v for m, v in singles.items()}, "results": rows}
    write_json(Path(opts["out"] + ".json"), data)
    plot(data, opts["out"] + ".png")
    bar.close()
    print(f"{'system':<40} {'M':>4} {'tok/s':>12} {'x single':>9} {'of bound':>9} {'same-M bound':>12}")
    for r in rows:
        if r.get("seconds"):
            same = r.get("fraction_of_bound_same_microbatches")
            print(f"{r['system']:<40} {r['microbatches']:>4} {r['tokens_per_s']:>12.0f} {r['speedup_vs_single']:>9.2f} "
                  f"{r['fraction_of_bound']:>9.1%} {format(same, '12.1%') if same is not None else '-':>12}")
        else:
            print(f"{r['system']:<40} failed: {r.get('error', '')[-300:]}")


if __name__ == "__main__":
    main()
