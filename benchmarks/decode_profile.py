"""Where one decode step's time goes: kernels per step, GPU busy time per step against the wall time per
step, and the kernels that take the most time (torch.profiler over a greedy `generate`, after warm-up).

    python -m benchmarks.decode_profile model=gpt2-xl weights=random dtype=fp16 device=cuda:0 batches=1,64
    python -m benchmarks.decode_profile --quick          # CPU smoke run (tiny model; CPU ops instead of kernels)

Writes <out>.json and <out>.png: per batch size, wall ms per step, device-busy ms per step, kernels per step and the top
kernels (name, calls per step, ms per step, and the exposed ms per step: the part of the busy time that the kernel
adds after the one before it has ended). A step whose busy time is far below its wall time is bound
by launches or the host; one whose busy time is near its wall time is bound by the kernels listed. Busy time is
the union of the kernels' spans: with programmatic dependent launch (the default on sm_90+) a kernel's span
also covers its wait for the one before, so the per-kernel times overlap and add up to more than the step
(`summed_kernel_ms_per_step`).
"""

from __future__ import annotations

import heapq
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import eet_pipe
from benchmarks.common import environment, parse_args, save_figure, sync, write_json

DEFAULTS = {"model": "gpt2-xl", "weights": "random", "dtype": "fp16", "device": "cuda:0", "batches": ["1", "64"],
            "prompt": 32, "new": 32, "top": 12, "out": "bench_results/decode_profile"}
QUICK = {"model": "tiny", "weights": "", "dtype": "fp32", "device": "cpu", "batches": ["1", "4"], "prompt": 8,
         "new": 8, "top": 5}


def union_length(spans: list[tuple[float, float]]) -> float:
    """Total length covered by the (start, end) spans, overlaps counted once."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def exposed_times(spans: list[tuple[str, float, float]]) -> dict[str, float]:
    """Per name, the busy time its kernels account for: each instant covered by kernel spans is charged to the
    covering kernel that ends first. With programmatic dependent launch a kernel starts early and waits for
    the one before it, so spans overlap; the one that ends first is the one running, the others are waiting
    on it. The charges add up to the busy time (`union_length`)."""
    charged: dict[str, float] = {}
    order = sorted(spans, key=lambda s: s[1])
    active: list[tuple[float, int, str]] = []  # (end, index, name): a heap, the first to end on top
    i, t = 0, float("-inf")
    while True:
        while active and active[0][0] <= t:
            heapq.heappop(active)
        if not active:
            if i == len(order):
                break
            t = max(t, order[i][1])
        while i < len(order) and order[i][1] <= t:
            heapq.heappush(active, (order[i][2], i, order[i][0]))
            i += 1
        if active[0][0] <= t:  # a span of zero length
            continue
        until = min(active[0][0], order[i][1] if i < len(order) else float("inf"))
        charged[active[0][2]] = charged.get(active[0][2], 0.0) + until - t
        t = until
    return charged


def profile_batch(lm, batch: int, opts: dict) -> dict:
    """Profile one greedy generate of `new` tokens at `batch` rows (after one identical warm-up)."""
    gen = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, min(lm.cfg.vocab_size, 250), (batch, opts["prompt"]), generator=gen).tolist()
    devices = [opts["device"]]

    def run() -> None:
        lm.generate(prompts, max_new_tokens=opts["new"], ignore_eos=True)

    run()  # warm-up: caches, CUDA graphs and GEMM choices are then the ones profiled
    sync(devices)
    start = time.perf_counter()
    run()
    sync(devices)
    wall = time.perf_counter() - start
    cuda = opts["device"].startswith("cuda")
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        run()
        sync(devices)
    steps = opts["new"]
    kernels = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
               if e.device_type == DeviceType.CUDA] if cuda else []
    exposed = exposed_times(kernels)
    rows = []
    for e in prof.key_averages():
        total = e.device_time_total if cuda else e.self_cpu_time_total  # microseconds
        if total > 0 and e.count > 0:
            rows.append({"name": e.key[:120], "calls_per_step": e.count / steps, "ms_per_step": total / 1e3 / steps,
                         "exposed_ms_per_step": exposed.get(e.key, total if not cuda else 0.0) / 1e3 / steps})
    rows.sort(key=lambda r: -r["exposed_ms_per_step"])
    summed = sum(r["ms_per_step"] for r in rows)
    # Kernels launched with programmatic dependent launch overlap (each starts while the one before drains and
    # its span includes its wait), so the device's busy time is the union of the kernel spans, not their sum.
    busy = union_length([(start, end) for _, start, end in kernels]) / 1e3 / steps if cuda else summed
    return {"batch": batch, "wall_ms_per_step": wall / steps * 1e3, "busy_ms_per_step": busy,
            "summed_kernel_ms_per_step": summed,
            "busy_fraction": busy / (wall / steps * 1e3), "kernels_per_step": sum(r["calls_per_step"] for r in rows),
            "top": rows[: opts["top"]]}


def plot(results: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [f"batch {r['batch']}" for r in results]
    xs = range(len(results))
    ax.bar([x - 0.2 for x in xs], [r["wall_ms_per_step"] for r in results], 0.4, label="wall")
    ax.bar([x + 0.2 for x in xs], [r["busy_ms_per_step"] for r in results], 0.4, label="device busy")
    ax.set_xticks(list(xs), labels)
    ax.set(ylabel="ms per step", title=title)
    ax.legend()
    save_figure(fig, path)


def main() -> None:
    opts = parse_args(DEFAULTS, QUICK)
    lm = eet_pipe.from_pretrained(opts["model"], weights=opts["weights"] or None, dtype=opts["dtype"],
                                  device=opts["device"])
    results = [profile_batch(lm, int(b), opts) for b in opts["batches"]]
    write_json(Path(opts["out"] + ".json"), {"env": environment(), "config": opts, "results": results})
    plot(results, opts["out"] + ".png", f"{opts['model']} {opts['dtype']} decode on {opts['device']}")
    for r in results:
        print(f"batch {r['batch']:>3}: wall {r['wall_ms_per_step']:.3f} ms/step (includes the prefill), busy "
              f"{r['busy_ms_per_step']:.3f} ms/step ({r['busy_fraction']:.0%}), {r['kernels_per_step']:.0f} "
              "kernels/step", file=sys.stderr)
        for k in r["top"]:
            print(f"    {k['ms_per_step']:7.3f} ms  exposed {k['exposed_ms_per_step']:7.3f} ms  "
                  f"{k['calls_per_step']:6.1f}x  {k['name']}", file=sys.stderr)
    print(f"wrote {opts['out']}.json and {opts['out']}.png", file=sys.stderr)


if __name__ == "__main__":
    main()
