"""Microbatched decode over the pipeline vs our single device, in one run.

    python -m benchmarks.pipeline_decode model=gpt2-xl weights=random dtype=fp16 devices=cuda:0,cuda:1 \
        prompt=32 new=128 batch=32
    python -m benchmarks.pipeline_decode --quick

Reports per-token latency at batch 1 (single device vs pipeline with one group) and aggregate
tokens/s with `len(devices)` groups of `batch` sequences in flight vs the single device at `batch`.
Writes <out>.json and <out>.png.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import eet_pipe
from benchmarks.common import environment, parse_args, progress, save_figure, sync, write_json
from eet_pipe import PipelineEngine

DEFAULTS = {"model": "gpt2-xl", "weights": "random", "dtype": "fp16", "devices": ["cuda:0", "cuda:1"], "prompt": 32,
            "new": 128, "batch": 32, "repeats": 3, "out": "bench_results/pipeline_decode"}
QUICK = {"model": "tiny", "weights": "", "dtype": "fp32", "devices": ["cpu", "cpu"], "prompt": 8, "new": 16,
         "batch": 4, "repeats": 1}


def prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, min(vocab, 250), (n, length), generator=gen).tolist()


def timed_generate(gen, batch: list[list[int]], new: int, repeats: int, devices: list[str], **kw) -> float:
    """Median seconds per generated token step (whole generate / new tokens)."""
    # warm-up with the timed shapes: caches, CUDA graphs and GEMM choices are then the ones timed
    gen(batch, max_new_tokens=new, ignore_eos=True, **kw)
    times = []
    for _ in range(repeats):
        sync(devices)
        start = time.perf_counter()
        gen(batch, max_new_tokens=new, ignore_eos=True, **kw)
        sync(devices)
        times.append((time.perf_counter() - start) / new)
    return sorted(times)[len(times) // 2]


def main() -> None:
    opts = parse_args(DEFAULTS, QUICK)
    weights = opts["weights"] or None
    p = len(opts["devices"])
    bar = progress(4, "pipeline_decode")
    lm = eet_pipe.from_pretrained(opts["model"], weights=weights, dtype=opts["dtype"], device=opts["devices"][0])
    data_prompts = prompts(opts["batch"] * p, opts["prompt"], lm.cfg.vocab_size)
    single_b1 = timed_generate(lm.generate, data_prompts[:1], opts["new"], opts["repeats"], opts["devices"][:1])
    bar.update()
    single_b = timed_generate(lm.generate, data_prompts[:opts["batch"]], opts["new"], opts["repeats"],
                              opts["devices"][:1])
    bar.update()
    lm = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with PipelineEngine(opts["model"], weights=weights, dtype=opts["dtype"], devices=opts["devices"], plan="even",
                        timeout=600, cpu_threads=1) as engine:
        pipe_b1 = timed_generate(engine.generate, data_prompts[:1], opts["new"], opts["repeats"], [], microbatches=1)
        bar.update()
        pipe_groups = timed_generate(engine.generate, data_prompts, opts["new"], opts["repeats"], [], microbatches=p)
        engine.trace_path = opts["out"] + f"_trace_{p}x{opts['batch']}.json"  # where the grouped decode spends time
        engine.generate(data_prompts, max_new_tokens=opts["new"], ignore_eos=True, microbatches=p)
        engine.trace_path = None
        bubble = engine.last_bubble
        bar.update()
    bar.close()
    rows = {
        "single_b1_ms_per_token": single_b1 * 1e3,
        "pipeline_b1_ms_per_token": pipe_b1 * 1e3,
        "b1_latency_ratio": pipe_b1 / single_b1,
        f"single_b{opts['batch']}_tokens_per_s": opts["batch"] / single_b,
        f"pipeline_{p}x{opts['batch']}_tokens_per_s": opts["batch"] * p / pipe_groups,
        "throughput_ratio": (opts["batch"] * p / pipe_groups) / (opts["batch"] / single_b),
        f"pipeline_{p}x{opts['batch']}_trace_bubble": bubble,
    }
    data = {"env": environment(), "config": opts, "results": rows}
    write_json(Path(opts["out"] + ".json"), data)
    _plot(rows, opts, opts["out"] + ".png")
    for k, v in rows.items():
        print(f"{k:<40} {v:10.3f}")


def _plot(rows: dict, opts: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.5))
    a.bar(["single", "pipeline"], [rows["single_b1_ms_per_token"], rows["pipeline_b1_ms_per_token"]])
    a.set_ylabel("ms / token (batch 1)")
    keys = [k for k in rows if k.endswith("tokens_per_s")]
    b.bar(["single", "pipeline"], [rows[k] for k in keys])
    b.set_ylabel("tokens/s")
    fig.suptitle(f"{opts['model']} decode, {len(opts['devices'])} devices", fontsize=9)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
