"""Partition quality: an even split vs fairscale's `balance_by_time` vs our `auto_plan`, in one run on
the same devices.

    python -m benchmarks.partitions model=gpt2-xl weights=random dtype=fp16 devices=cuda:0,cuda:1 \
        batch=8 seq=512 microbatches=8
    python -m benchmarks.partitions --quick        # CPU smoke run: tiny preset on cpu,cpu (< 60 s)

`batch` is the whole batch; one microbatch is ceil(batch / microbatches) x seq tokens. For each method:
the plan; each stage's measured forward time (its units built on its device, timed on one microbatch);
slowest stage / ideal (ideal = sum of the measured stage times / P); our cost model's predicted compute
per stage (same profile for every method) and its error against the measurement; and end-to-end
tokens/s of `PipelineEngine(plan=...).forward(output="none")` with the gpipe schedule.
fairscale profiles every unit on the first device (the whole model must fit there); when it is not
installed its entry records the error and the run goes on. Writes <out>.json and <out>.png.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import environment, parse_args, progress, save_figure, time_it, write_json
from eet_pipe import PipelineEngine
from eet_pipe.loading.presets import ModelSpec, resolve_model
from eet_pipe.loading.units import load_units
from eet_pipe.models.dtypes import dtype_name, parse_dtype
from eet_pipe.models.meta import StepMeta, prefill_meta
from eet_pipe.ops.cuda_graphs import graphed
from eet_pipe.partition import Plan, PlanInputs, StagePlan, Workload
from eet_pipe.partition.auto import measure_inputs, plan_from_inputs

DEFAULTS = {"model": "gpt2-xl", "weights": "random", "dtype": "fp16", "devices": ["cuda:0", "cuda:1"], "batch": 8,
            "seq": 512, "microbatches": 8, "warmup": 2, "repeats": 5, "fairscale_timeout": 2.0,
            "out": "bench_results/partitions"}
QUICK = {"model": "tiny", "weights": "", "dtype": "fp32", "devices": ["cpu", "cpu"], "batch": 8, "seq": 64,
         "microbatches": 4, "warmup": 3, "repeats": 7, "fairscale_timeout": 0.5}


def _inputs(spec: ModelSpec, first_unit: str, workload: Workload, device: str,
            dtype: torch.dtype) -> tuple[torch.Tensor, StepMeta]:
    """One prefill microbatch for a slice starting at `first_unit`: token ids or hidden states."""
    gen = torch.Generator().manual_seed(0)
    shape = (workload.batch, workload.seq)
    if first_unit == "embed":
        x = torch.randint(0, spec.cfg.vocab_size, shape, generator=gen)
    else:
        x = torch.randn(*shape, spec.cfg.hidden_size, generator=gen).to(dtype)  # [B, S, H]
    return x.to(device), prefill_meta(torch.ones(shape, dtype=torch.bool)).to(device)


def _plan_from_counts(counts: list[int], units: list[str], devices: list[str], opts: dict) -> Plan:
    """A v = 1 plan giving stage s the next counts[s] units."""
    stages, start = [], 0
    for dev, n in zip(devices, counts, strict=True):
        part = units[start:start + n]
        stages.append(StagePlan(dev, [(part[0], part[-1])], part))
        start += n
    return Plan(opts["model"], dtype_name(parse_dtype(opts["dtype"])), "gpipe", opts["microbatches"], 1, stages)


class _UnitCall(nn.Module):
    """One unit as a single-argument module, as fairscale's profiler calls it."""

    def __init__(self, model: nn.Module, meta: StepMeta) -> None:
        super().__init__()
        self.model, self.meta = model, meta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x, self.meta)


def fairscale_plan(spec: ModelSpec, opts: dict, workload: Workload) -> tuple[Plan | None, dict]:
    """fairscale's balance_by_time on the first device, or (None, {'error': ...})."""
    try:
        from fairscale.nn.pipe.balance import balance_by_time
    except ImportError:
        return None, {"error": "fairscale not installed"}
    dev, dtype, units = opts["devices"][0], parse_dtype(opts["dtype"]), spec.cfg.unit_names()
    ids, meta = _inputs(spec, "embed", workload, dev, dtype)
    start = time.perf_counter()
    try:
        seq = nn.Sequential(*[_UnitCall(load_units(spec, [u], dtype, dev), meta) for u in units])
        counts = balance_by_time(len(opts["devices"]), seq, ids, timeout=opts["fairscale_timeout"],
                                 device=torch.device(dev))
    except (RuntimeError, TypeError, AttributeError, ValueError) as err:  # a peer's failure is a result
        return None, {"error": f"{type(err).__name__}: {err}"}
    finally:
        seq = None
        _free(dev)
    return _plan_from_counts(counts, units, opts["devices"], opts), {"counts": counts,
                                                                     "seconds": time.perf_counter() - start}


def _free(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def stage_times(spec: ModelSpec, plan: Plan, workload: Workload, opts: dict) -> list[float]:
    """Measured seconds of each stage's units on its device for one microbatch."""
    dtype, out = parse_dtype(opts["dtype"]), []
    for st in plan.stages:
        model = load_units(spec, st.units, dtype, st.device)
        x, meta = _inputs(spec, st.units[0], workload, st.device, dtype)

        def run(model: nn.Module = model, x: torch.Tensor = x, meta: StepMeta = meta) -> None:
            with torch.inference_mode():
                model(x, meta)

        run()  # warm-up, then time it as the runtime runs it (a CUDA graph replay on GPU)
        out.append(time_it(graphed(run, st.device), [st.device], opts["warmup"], opts["repeats"]))
        model = None
        _free(st.device)
    return out


def predicted_times(inputs: PlanInputs, plan: Plan) -> list[float]:
    """Our cost model's compute seconds per stage: profiled unit times / the device's speed."""
    cost = {u.name: u.time_s for u in inputs.units}
    speed = {d.name: d.speed for d in inputs.devices}
    return [sum(cost[u] for u in st.units) / speed[st.device] for st in plan.stages]


def throughput(opts: dict, plan: Plan, ids: torch.Tensor) -> float:
    """Seconds of one batch through PipelineEngine(plan=plan) with gpipe and `microbatches`."""
    with PipelineEngine(opts["model"], weights=opts["weights"] or None, dtype=opts["dtype"], devices=opts["devices"],
                        schedule="gpipe", microbatches=opts["microbatches"], plan=plan, timeout=600) as engine:
        return time_it(lambda: engine.forward(ids, output="none"), [], opts["warmup"], opts["repeats"])


def evaluate(name: str, plan: Plan, ctx: dict, bar) -> dict:
    """Every figure of one method."""
    measured = stage_times(ctx["timed"], plan, ctx["workload"], ctx["opts"])
    bar.update()
    predicted = predicted_times(ctx["inputs"], plan)
    ideal = sum(measured) / len(measured)
    seconds = throughput(ctx["opts"], plan, ctx["ids"])
    bar.update()
    return {"method": name, "units_per_stage": [len(st.units) for st in plan.stages],
            "stages": [f"{st.chunks[0][0]}..{st.chunks[0][1]}" for st in plan.stages], "plan": plan.to_dict(),
            "stage_ms_measured": [t * 1e3 for t in measured], "stage_ms_predicted": [t * 1e3 for t in predicted],
            "prediction_error": [(p - m) / m for p, m in zip(predicted, measured, strict=True)],
            "ideal_ms": ideal * 1e3, "slowest_over_ideal": max(measured) / ideal, "seconds": seconds,
            "tokens_per_s": ctx["ids"].numel() / seconds}


def plot(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["results"] if "stage_ms_measured" in r]
    p = len(data["config"]["devices"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.8 / max(len(rows), 1)
    for k, r in enumerate(rows):
        xs = [s + (k - (len(rows) - 1) / 2) * width for s in range(p)]
        ax.bar(xs, r["stage_ms_measured"], width,
               label=f"{r['method']}: {r['slowest_over_ideal']:.2f}x ideal, {r['tokens_per_s']:.0f} tok/s")
        ax.scatter(xs, r["stage_ms_predicted"], marker="_", s=300, color="black", zorder=3)
        for x, n, h in zip(xs, r["units_per_stage"], r["stage_ms_measured"], strict=True):
            ax.annotate(f"{n} units", (x, h), textcoords="offset points", xytext=(0, 2), ha="center", fontsize=7)
    ax.set_xticks(range(p), [f"stage {s}" for s in range(p)])
    ax.set_ylabel("forward ms per microbatch")
    ax.set_xlabel("bars: measured (units on top), black dashes: our cost model's prediction", fontsize=8)
    cfg = data["config"]
    ax.set_title(f"{cfg['model']} {cfg['dtype']}, microbatch {data['microbatch']}, "
                 f"{p} x {data['env']['gpus'][0] if data['env']['gpus'] else 'CPU'}", fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _setup(opts: dict) -> dict:
    spec = resolve_model(opts["model"], opts["weights"] or None)
    mb = math.ceil(opts["batch"] / opts["microbatches"])
    workload = Workload("prefill", mb, opts["seq"])
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.cfg.vocab_size, (opts["batch"], opts["seq"]), generator=gen)
    timed = dataclasses.replace(spec, source="random", state=None)  # weights do not change timings
    start = time.perf_counter()
    inputs = measure_inputs(spec, opts["devices"], opts["dtype"], workload, refresh=True)
    return {"opts": opts, "spec": spec, "timed": timed, "workload": workload, "ids": ids, "inputs": inputs,
            "profile_seconds": time.perf_counter() - start}


def main() -> None:
    opts = parse_args(DEFAULTS, QUICK)
    bar = progress(8, "partitions")
    ctx = _setup(opts)
    bar.update()
    units = ctx["spec"].cfg.unit_names()
    plans = {"even": (Plan.even(units, opts["devices"], model=opts["model"], microbatches=opts["microbatches"]), {})}
    plans["fairscale balance_by_time"] = fairscale_plan(ctx["timed"], opts, ctx["workload"])
    bar.update()
    plans["eet_pipe auto"] = (plan_from_inputs(ctx["inputs"], ctx["spec"], opts["dtype"], "gpipe", 1,
                                               opts["microbatches"]), {})
    rows = []
    for name, (plan, info) in plans.items():
        if plan is None:
            rows.append({"method": name, **info})
            bar.update(2)
            continue
        rows.append({**evaluate(name, plan, ctx, bar), **info})
    bar.close()
    data = {"env": environment(), "config": opts, "microbatch": ctx["workload"].shape,
            "profile_key": ctx["inputs"].profile_key, "profile_seconds": ctx["profile_seconds"], "results": rows}
    write_json(Path(opts["out"] + ".json"), data)
    plot(data, opts["out"] + ".png")
    print(f"{'method':<28} {'units/stage':<14} {'stage ms (measured)':<28} {'pred err':<18} {'slow/ideal':>10} "
          f"{'tok/s':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['method']:<28} failed: {r['error'][-200:]}")
            continue
        ms = ", ".join(f"{t:.2f}" for t in r["stage_ms_measured"])
        err = ", ".join(f"{e:+.0%}" for e in r["prediction_error"])
        print(f"{r['method']:<28} {str(r['units_per_stage']):<14} {ms:<28} {err:<18} {r['slowest_over_ideal']:>10.3f} "
              f"{r['tokens_per_s']:>10.0f}")
    print(f"wrote {opts['out']}.json and {opts['out']}.png")


if __name__ == "__main__":
    main()
