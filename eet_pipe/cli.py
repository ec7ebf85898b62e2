"""`eet-pipe` command line: generate, plan, predict, models.

Every command takes ``--flags`` for common options and ``key=value`` for any option field;
``eet-pipe <command> --help`` lists all fields.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

from eet_pipe.options.parse import build_config, describe, parse_overrides
from eet_pipe.options.typed import GenerateOptions
from eet_pipe.partition.plan_options import PlanOptions
from eet_pipe.partition.predict import PredictOptions

__all__ = ["main"]

log = logging.getLogger("eet_pipe")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eet-pipe", description="Pipeline-parallel transformer inference.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text", formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog="options (key=value):\n" + describe(GenerateOptions))
    gen.add_argument("--stages", type=int, help="pipeline stages (worker processes)")
    gen.add_argument("--devices", help="comma-separated devices, e.g. cuda:0,cuda:1")
    gen.add_argument("overrides", nargs="*", help="key=value options")
    plan = sub.add_parser("plan", help="profile the model on the devices and print (or write) a balanced plan",
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          epilog="options (key=value):\n" + describe(PlanOptions))
    plan.add_argument("--stages", type=int, help="pipeline stages (when devices are not given)")
    plan.add_argument("--devices", help="comma-separated devices, e.g. cuda:0,cuda:1")
    plan.add_argument("--out", help="write the plan JSON to this file")
    plan.add_argument("overrides", nargs="*", help="key=value options")
    pred = sub.add_parser("predict", help="extrapolate a measured profile to pipelines of more GPUs (simulator)",
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          epilog="options (key=value):\n" + describe(PredictOptions))
    pred.add_argument("overrides", nargs="*", help="key=value options")
    sub.add_parser("models", help="list the presets")
    return parser


def _generate(args: argparse.Namespace) -> int:
    from eet_pipe.runtime.engine import PipelineEngine

    flags = {k: v for k, v in (("stages", args.stages), ("devices", args.devices)) if v is not None}
    opts = build_config(GenerateOptions, flags, parse_overrides(args.overrides))
    sampling = vars(opts.sampling())
    start = time.perf_counter()
    with PipelineEngine.from_options(opts) as engine:
        if not engine.is_driver:  # torchrun ranks > 0 execute what rank 0 sends
            engine.serve_forever()
            return 0
        loaded = time.perf_counter()
        results = engine.generate(opts.prompt, **sampling)
        done = time.perf_counter()
        for prompt, res in zip(opts.prompt, results, strict=True):
            print(f"{prompt}{res.text if res.text is not None else res.token_ids}")
        print(engine.summary(), file=sys.stderr)
    tokens = sum(len(r.token_ids) for r in results)
    print(f"load {loaded - start:.2f} s, generate {done - loaded:.2f} s, {tokens} tokens "
          f"({tokens / max(done - loaded, 1e-9):.1f} tok/s)", file=sys.stderr)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from eet_pipe.loading.presets import resolve_model
    from eet_pipe.partition.auto import describe_inputs, measure_inputs, plan_from_inputs

    flags = {k: v for k, v in (("stages", args.stages), ("devices", args.devices), ("out", args.out))
             if v is not None}
    opts = build_config(PlanOptions, flags, parse_overrides(args.overrides))
    spec = resolve_model(opts.model, opts.weights)
    workload = opts.make_workload(spec.cfg)
    budget = opts.budget(spec.cfg)  # bad KV-cache options fail before anything is measured
    inputs = measure_inputs(spec, opts.device_list(), opts.dtype, workload, measure_links=opts.measure_links,
                            profiles=opts.profile, cache_dir=opts.cache_dir, refresh=opts.refresh, costs=opts.costs,
                            mem_caps=opts.mem_caps())
    plan = plan_from_inputs(inputs, spec, opts.dtype, opts.schedule, opts.chunks_per_device, opts.microbatches,
                            budget=budget)
    print(plan.table())
    print(describe_inputs(inputs, plan))
    if opts.out:
        plan.to_json(opts.out)
        print(f"wrote {opts.out}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from eet_pipe.partition.predict import run_predict

    print(run_predict(build_config(PredictOptions, parse_overrides(args.overrides))))
    return 0


def _count(n: int) -> str:
    """A parameter count as model cards write it: 8.03B, 124.4M, 249.4K."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.{2 if suffix == 'B' else 1}f}{suffix}"
    return str(n)


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f}" if nbytes >= 1e7 else "<0.01"


def _models(_: argparse.Namespace) -> int:
    from eet_pipe.loading.presets import list_presets, load_preset
    from eet_pipe.models.config import ArchConfig
    from eet_pipe.partition.sizes import PRECISIONS, param_count, weight_bytes

    rows = [("preset", "params", *(f"{p} GB" for p in PRECISIONS), "description")]
    for name in list_presets():
        data = load_preset(name)
        cfg = ArchConfig.from_dict(data["arch"])
        rows.append((name, _count(param_count(cfg)), *(_gb(weight_bytes(cfg, p)) for p in PRECISIONS),
                     data.get("description", "")))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [row[0].ljust(widths[0]), *(v.rjust(w) for v, w in zip(row[1:-1], widths[1:], strict=True))]
        print("  ".join([*cells, row[-1]]))
    print("GB = 10^9 bytes of weights; int8 = int8 weight-only layers, embeddings, head and scales in fp16")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `eet-pipe` console script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    handlers = {"generate": _generate, "plan": _plan, "predict": _predict, "models": _models}
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError, TimeoutError, RuntimeError) as err:
        print(f"eet-pipe {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
