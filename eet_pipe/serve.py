"""HTTP server: ``python -m eet_pipe.serve --stages 2 model=tiny`` (or under torchrun, one stage per rank).

OpenAI-compatible ``/v1/completions`` and ``/v1/chat/completions`` (streaming as SSE), ``/v1/models``,
``/health`` and ``/metrics``, over a pipeline that batches requests continuously (see
`eet_pipe.serving.scheduler`). This process runs the scheduler and the step loop; HTTP runs in a process
it spawns (`eet_pipe.serving.server`). ``--help`` lists every option; any option is also ``key=value``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from eet_pipe.options.parse import build_config, describe, parse_overrides
from eet_pipe.options.typed import EngineOptions
from eet_pipe.serving.serve_options import ServeOptions

if TYPE_CHECKING:
    from eet_pipe.serving.driver import StepDriver

__all__ = ["main", "make_driver"]

log = logging.getLogger("eet_pipe.serve")


def _help() -> str:
    engine = {f.name for f in dataclasses.fields(EngineOptions)}
    server = [line for line in describe(ServeOptions).splitlines() if line.split("=")[0].strip() not in engine]
    return ("engine options (key=value; `microbatches` = step groups in flight, 0 = 2 x stages):\n"
            + describe(EngineOptions) + "\n\nserver options (key=value):\n" + "\n".join(server))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eet_pipe.serve", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_help())
    parser.add_argument("--stages", type=int, help="pipeline stages (worker processes)")
    parser.add_argument("--devices", help="comma-separated devices, e.g. cuda:0,cuda:1")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="TCP port (default 8000)")
    parser.add_argument("--api-key", dest="api_key", help="require 'Authorization: Bearer <key>' on /v1/*")
    parser.add_argument("overrides", nargs="*", help="key=value options")
    return parser


def make_driver(opts: ServeOptions) -> StepDriver:
    """The pipeline driver: rank 0 of torchrun, or spawned workers (resolved here, started later)."""
    from eet_pipe.runtime.torchrun import under_torchrun
    from eet_pipe.serving.driver import ServingEngine, resolve_setup, stage_devices

    if under_torchrun():
        from eet_pipe.serving.torchrun_driver import TorchrunDriver

        driver: StepDriver = TorchrunDriver(opts)
    else:
        setup = resolve_setup(opts, stage_devices(opts.devices, opts.stages, opts.allow_duplicate_devices))
        driver = ServingEngine(setup, timeout=opts.timeout, startup_timeout=opts.startup_timeout, threads=opts.threads)
    if opts.trace:
        from eet_pipe.serving.step_trace import StepTrace

        try:
            driver.trace = StepTrace(opts.trace, max_bytes=opts.trace_max_mb << 20)
        except OSError as err:
            raise ValueError(f"trace={opts.trace!r} cannot be written: {err.strerror or err}") from None
    return driver


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad options)."""
    args = _parser().parse_intermixed_args(argv)
    flags = {k: getattr(args, k) for k in ("stages", "devices", "host", "port", "api_key")
             if getattr(args, k) is not None}
    try:
        opts = build_config(ServeOptions, flags, parse_overrides(args.overrides))
    except ValueError as err:
        print(f"eet_pipe.serve: error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=opts.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from eet_pipe.runtime.torchrun import under_torchrun

    if under_torchrun():
        from eet_pipe.serving.torchrun_driver import follower_main, torchrun_rank

        if torchrun_rank() != 0:
            return follower_main(opts)
    try:
        driver = make_driver(opts)
        opts = opts.resolve_api_servers(driver.on_gpus())
        if opts.api_servers > 1:
            from eet_pipe.serving.listener import check_port_free

            check_port_free(opts)
    except (ValueError, FileNotFoundError) as err:
        print(f"eet_pipe.serve: error: {err}", file=sys.stderr)
        return 2
    from eet_pipe.serving.server import run_server

    return run_server(opts, driver)


if __name__ == "__main__":
    sys.exit(main())
