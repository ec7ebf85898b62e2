"""Load test of the HTTP server: throughput, TTFT and TPOT percentiles per concurrency level.

    python -m benchmarks.serve_load url=http://127.0.0.1:8000 concurrency=1,4,16,64,256 requests=256 max_tokens=64
    python -m benchmarks.serve_load --quick      # starts a tiny 2-stage CPU server itself (concurrency 1,4,16)

Every request streams (SSE) with ignore_eos and return_token_ids, so each produces exactly max_tokens
tokens and every token arrives in its own chunk (a token whose text is still incomplete, or empty as with
random weights, would otherwise be held back). TTFT is the time from sending to the first token, TPOT the
mean time between a request's later tokens, throughput the generated tokens of a level divided by its
wall time. Each level sends max(requests, waves x concurrency) requests, so it is measured in steady
state rather than as one burst. Writes <out>.json (environment, config,
per-level figures, the server's /metrics) and <out>.png.

The load generator (`benchmarks/load_generator.py`) is `clients` processes (`auto`: a quarter of the cores,
1 to 8), each with its share of a level's concurrency and requests, started together: one Python HTTP client
process handles a few thousand streamed tokens a second, less than a GPU server produces. Each level records
the clients' CPU time and warns when a client process was busy more than 80 % of the level (it may then be the
limit).

The engine under the server is measured in the same run as the reference: `PipelineEngine.generate` on
the same model, devices, stages and step groups, one batch of `concurrency` prompts per level (greedy,
ignore_eos, max_tokens each; a warm-up batch of the same shape first), before the server starts so the
two never share the devices. Each level prints server / engine tokens/s and the server's TPOT p50 over
the engine's time per step. `reference=auto` (default) runs it when the script starts the server
itself; with `url=` pass `reference=on` and the server's model and engine options (`model`, `stages`,
`server_args`) to measure it there too, or `reference=off`. `reference=<file.json>` takes the engine figures of
an earlier serve_load JSON of the same model, stages, engine options, prompt length and max_tokens (several
server variants in one device session then share one engine measurement: `benchmarks/gpu_suite.sh` with
`SERVE_VARIANTS`).

When it starts the server, each level also records the CPU time per generated token of the engine process
(scheduler and step loop) and of the HTTP process(es), apart (`server_cpu_us_per_token`,
`http_cpu_us_per_token`): whether a host process, not the devices, limits the level.

`trace=on` starts the server with a step trace (`<out>_trace.json`) and adds to each level where the
stages' time went (`benchmarks/serve_trace.py`): busy fraction, forwards by kind (decode / prompt, CUDA
graph or eager, graph captures), padding, idle gaps, and what the scheduler issued.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from benchmarks.common import environment, parse_args, write_json
from benchmarks.host_cpu import CpuProbe
from benchmarks.load_generator import get_text, prompts_for, sweep
from eet_pipe.serving.process import ServerProcess

DEFAULTS = {"url": "", "concurrency": ["1", "4", "16", "64", "256"], "requests": 256, "waves": 4, "max_tokens": 64,
            "prompt_len": 64, "temperature": 0.0, "api_key": "", "model": "tiny", "stages": 2, "clients": "auto",
            "server_args": "", "reference": "auto", "trace": "off", "out": "bench_results/serve_load"}
QUICK = {"concurrency": ["1", "4", "16"], "requests": 16, "waves": 1, "max_tokens": 16, "prompt_len": 16}


def _engine_options(opts: dict) -> Any:
    """The server's engine options: model, stages, plan=even, and the key=value server arguments that are
    engine options (the server-only ones are skipped)."""
    import dataclasses

    from eet_pipe.options.parse import build_config
    from eet_pipe.options.typed import EngineOptions

    names = {f.name for f in dataclasses.fields(EngineOptions)}
    values = {"model": opts["model"], "stages": str(opts["stages"]), "plan": "even"}
    for arg in opts["server_args"].split():
        key, sep, value = arg.partition("=")
        if sep and key in names:
            values[key] = value
    return build_config(EngineOptions, values)


def engine_reference(opts: dict) -> dict[int, dict]:
    """`PipelineEngine.generate` per concurrency level: a batch of that many prompts, as the server's steps
    would hold them (same step groups), timed after a warm-up batch of the same shape."""
    from eet_pipe.runtime.engine import PipelineEngine

    eng = _engine_options(opts)
    stages = len(eng.devices) if eng.devices and eng.stages == 1 else eng.stages
    groups = eng.microbatches or 2 * stages
    prompts = prompts_for(opts["prompt_len"])
    sampling = {"max_new_tokens": opts["max_tokens"], "ignore_eos": True, "temperature": opts["temperature"]}
    out = {}
    # CPU workers get the server's thread count (cores / stages): more would oversubscribe the cores
    with PipelineEngine(eng.model, devices=eng.devices or None, stages=None if eng.devices and eng.stages == 1
                        else eng.stages, schedule=eng.schedule, plan=eng.plan, dtype=eng.dtype, virtual=eng.virtual,
                        weights=eng.weights, weights_seed=eng.weights_seed, timeout=eng.timeout, cuda_graphs=eng.cuda_graphs,
                        allow_duplicate_devices=eng.allow_duplicate_devices,
                        cpu_threads=max(1, (os.cpu_count() or 1) // stages)) as engine:
        for c in (int(x) for x in opts["concurrency"]):
            batch = [prompts[i % len(prompts)] for i in range(c)]
            engine.generate(batch, microbatches=min(groups, c), **sampling)
            began = time.perf_counter()
            results = engine.generate(batch, microbatches=min(groups, c), **sampling)
            wall = time.perf_counter() - began
            tokens = sum(len(r.token_ids) for r in results)
            out[c] = {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
                      "step_s": wall / opts["max_tokens"], "groups": min(groups, c)}
            print(f"engine      {c:>4}: {out[c]['tokens_per_s']:8.1f} tok/s, {out[c]['step_s'] * 1e3:6.2f} ms per step",
                  file=sys.stderr)
    return out


SAME_ENGINE = ("model", "stages", "prompt_len", "max_tokens", "temperature")
"""What an earlier run's engine reference must share with this run (besides the engine options in server_args)."""


def reference_from(path: Path, opts: dict) -> dict[int, dict]:
    """The engine figures per concurrency level of an earlier serve_load JSON; SystemExit if the file is not
    one, or was measured on another model, stage count, engine options, prompt length or max_tokens."""
    try:
        data = json.loads(path.read_text())
        config, results = data["config"], data["results"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"reference={path}: not a serve_load JSON ({err})") from None
    differ = [k for k in SAME_ENGINE if str(config.get(k)) != str(opts.get(k))]
    if vars(_engine_options(config)) != vars(_engine_options(opts)):
        differ.append("the engine options in server_args")
    if differ:
        raise SystemExit(f"reference={path} was measured with other {', '.join(differ)}: its engine figures "
                         "are not this run's reference")
    out = {r["concurrency"]: r["engine"] for r in results if "engine" in r}
    if not out:
        raise SystemExit(f"reference={path} has no engine figures (it ran with reference=off)")
    return out


def compare(levels: list[dict], reference: dict[int, dict]) -> None:
    """Add the engine's figures and the server / engine ratios to each level, and print them."""
    for level in levels:
        ref = reference.get(level["concurrency"])
        if ref is None:
            continue
        tpot = level["tpot_s"]["p50"]
        level["engine"] = ref
        level["server_over_engine"] = level["tokens_per_s"] / ref["tokens_per_s"]
        level["tpot_p50_over_engine_step"] = None if tpot is None else tpot / ref["step_s"]
        ratio = "" if tpot is None else f", TPOT p50 / engine step {level['tpot_p50_over_engine_step']:.2f}"
        print(f"concurrency {level['concurrency']:>4}: server / engine {level['server_over_engine']:.2f}{ratio}",
              file=sys.stderr)


def plot(levels: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [lv["concurrency"] for lv in levels]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    axes[0].plot(xs, [lv["tokens_per_s"] for lv in levels], marker="o", label="server")
    if any("engine" in lv for lv in levels):
        ref = [lv for lv in levels if "engine" in lv]
        axes[0].plot([lv["concurrency"] for lv in ref], [lv["engine"]["tokens_per_s"] for lv in ref], marker="s",
                     linestyle="--", label="PipelineEngine.generate")
        axes[0].legend()
    axes[0].set(title="throughput", xlabel="concurrency", ylabel="generated tokens / s")
    for ax, key, name in ((axes[1], "ttft_s", "time to first token"), (axes[2], "tpot_s", "time per output token")):
        for p in ("p50", "p90", "p99"):
            ax.plot(xs, [(lv[key][p] or 0) * 1000 for lv in levels], marker="o", label=p)
        ax.set(title=name, xlabel="concurrency", ylabel="ms")
        ax.legend()
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    opts = parse_args(DEFAULTS, QUICK)
    headers = {"Authorization": f"Bearer {opts['api_key']}"} if opts["api_key"] else {}
    server = None
    reference = {}
    if opts["reference"] not in ("auto", "on", "off"):
        reference = reference_from(Path(opts["reference"]), opts)
    elif opts["reference"] == "on" or (opts["reference"] == "auto" and not opts["url"]):
        reference = engine_reference(opts)  # before the server starts: the two never share the devices
    trace = None
    if opts["trace"] not in ("off", "on"):
        raise SystemExit(f"trace={opts['trace']!r} is invalid: must be on or off")
    if opts["trace"] == "on" and opts["url"]:
        raise SystemExit("trace=on needs the server this script starts (no url=): start yours with trace=<path> "
                         "and read it with python -m benchmarks.serve_trace")
    if not opts["url"]:
        if opts["trace"] == "on":
            trace = Path(opts["out"] + "_trace.json")
        args = ["--stages", str(opts["stages"]), f"model={opts['model']}", "plan=even", "log_level=warning",
                f"max_slots={max(int(c) for c in opts['concurrency'])}", *opts["server_args"].split(),
                *([f"trace={trace}"] if trace else [])]
        server = ServerProcess(args).start()
        server.wait_ready(300)
        opts["url"] = server.url
    levels = []
    try:
        probe = None
        if server is not None:
            probe = CpuProbe(psutil.Process(server.proc.pid), server.port)
        levels = sweep(opts["url"], headers, opts, probe)
        if probe is not None:
            probe.annotate(levels)
        compare(levels, reference)
        metrics = get_text(opts["url"] + "/metrics", headers)
    finally:
        if server is not None:
            server.stop()
            log_copy = Path(opts["out"] + "_server.log")
            log_copy.write_text(server.log_path.read_text(errors="replace"))
            print(f"server log: {log_copy}", file=sys.stderr)
    if trace is not None and levels:
        from benchmarks.serve_trace import trace_levels

        trace_levels(levels, trace)
    out = Path(opts["out"])
    config = {k: v for k, v in opts.items() if k != "api_key"}
    write_json(out.with_suffix(".json"), {"env": environment(), "config": config, "results": levels,
                                          "server_metrics": metrics})
    plot(levels, out.with_suffix(".png"), f"eet_pipe serve: {opts['model'] if server else opts['url']}, "
                                          f"max_tokens={opts['max_tokens']}")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}", file=sys.stderr)


if __name__ == "__main__":
    main()
