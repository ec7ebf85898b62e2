"""Capacity of the HTTP server's host side alone: the real app, scheduler, sampler bookkeeping and
SSE streaming in front of a pipeline that answers every step at once (no model runs).

    python -m benchmarks.serve_frontend concurrency=1,16,64,256 max_tokens=64
    python -m benchmarks.serve_frontend --quick
    python -m benchmarks.serve_frontend step_ms=2     # each step takes 2 ms, as a GPU decode step might

Besides tokens/s, each level records CPU time per generated token (user + system, all threads) of the
step-loop process (`server_cpu_us_per_token`: the scheduler and the step loop) and, where HTTP runs in a
process of its own, of that HTTP process (`http_cpu_us_per_token`): what the host side costs
independent of how fast the load generator on the same machine is (null for a level too short for the
process clock, under three ticks). Run it from an older checkout
(PYTHONPATH=<checkout>) for a before/after comparison in one shell command.
The tokens/s measured here is the ceiling that the host side puts on any real server with the same
options: a GPU pipeline faster than this leaves its GPUs waiting. Each step's tokens come from the real
`SlotSampler` (stopping, max tokens, finish reasons), fed logits whose argmax cycles over the vocabulary,
in a stage process of its own that commands and results cross to as they cross to real workers.
Writes <out>.json (per-level throughput, TTFT, TPOT, as serve_load.py) and <out>.png.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import sys
import time
from pathlib import Path

import httpx
import psutil
import torch

from benchmarks.common import environment, parse_args, write_json
from benchmarks.host_cpu import CpuProbe
from benchmarks.load_generator import sweep
from benchmarks.serve_load import plot
from eet_pipe.runtime import wire
from eet_pipe.runtime.channel import CommandChannel, CommandReader
from eet_pipe.runtime.slot_sampler import SlotSampler, new_payload
from eet_pipe.runtime.step_parts import ServeInit, StepCommand
from eet_pipe.runtime.supervisor import WorkerError, free_port
from eet_pipe.serving.driver import StepDriver, resolve_setup

DEFAULTS = {"concurrency": ["1", "16", "64", "256"], "requests": 64, "waves": 4, "max_tokens": 64, "prompt_len": 64,
            "temperature": 0.0, "model": "tiny", "groups": 2, "step_ms": 0.0, "clients": "auto", "api_servers": 1,
            "http_parser": "auto", "out": "bench_results/serve_frontend"}
QUICK = {"concurrency": ["1", "8"], "requests": 8, "waves": 1, "max_tokens": 32, "prompt_len": 16}


def _instant_stage(opts, step_s: float, commands: CommandReader, results: mp.Queue) -> None:
    """The pipeline's last stage: the real per-slot sampler on logits whose argmax cycles over the
    vocabulary, each answer `step_s` after the previous one at the earliest (sleeping, not spinning)."""
    setup = resolve_setup(opts, ["cpu"])
    sampler = SlotSampler(setup.tokenizer.decode)
    vocab, next_token, free_at = min(setup.cfg.vocab_size, 250), 0, 0.0
    while (cmd := wire.loads(commands.get())) is not None:
        sampler.drop([*cmd.free, *cmd.new])
        sampler.start(cmd.new)
        out = new_payload(cmd.group, cmd.step)
        for part in cmd.parts:
            rows = part.slots.numel()
            logits = torch.zeros(rows, vocab)
            logits[torch.arange(rows), (torch.arange(rows) + next_token) % vocab] = 1.0
            next_token += 1
            sampler.sample(logits, part.slots.tolist(), out)
        free_at = max(free_at, time.monotonic()) + step_s
        time.sleep(max(0.0, free_at - time.monotonic()))
        results.put(out)


class InstantDriver(StepDriver):
    """A one-stage pipeline whose stage process answers each step at once or (`step_ms`) that many
    milliseconds after the previous one, without using the CPU meanwhile. Commands and results cross
    process queues as with the real workers, so the step-loop process pays what it pays in front of a
    real pipeline (building and pickling commands, unpickling results) and nothing of the stage's work
    (sampling and stop checks run on the last stage)."""

    def __init__(self, opts, step_ms: float = 0.0) -> None:
        super().__init__()
        self.setup = resolve_setup(opts, ["cpu"])
        ctx = mp.get_context("spawn")
        self.commands, self.results = CommandChannel(ctx), ctx.Queue()  # as `Supervisor` has them
        self.stage = ctx.Process(target=_instant_stage, args=(opts, step_ms / 1e3, self.commands.reader,
                                                              self.results), daemon=True, name="instant-stage")
        self.stage.start()
        self.commands.started()

    def start(self) -> None:
        pass

    def send(self, cmd) -> None:
        if isinstance(cmd, ServeInit):
            return
        assert isinstance(cmd, StepCommand)
        self.commands.put(wire.dumps(cmd))  # as `Supervisor.broadcast` sends it

    def collect(self) -> dict:
        while True:
            try:
                return self.results.get(timeout=1.0)
            except queue.Empty:
                self.check_alive()

    def check_alive(self) -> None:
        if not self.stage.is_alive():
            raise WorkerError(f"the instant stage exited with status {self.stage.exitcode}")

    def close(self) -> None:
        if self.stage.is_alive():
            self.commands.put(wire.dumps(None))
            self.stage.join(5)
        self.commands.close()
        if self.stage.is_alive():
            self.stage.kill()


def _serve(opts_dict: dict, port: int, step_ms: float) -> None:
    from eet_pipe.options.parse import build_config
    from eet_pipe.serving.serve_options import ServeOptions
    from eet_pipe.serving.server import run_server

    opts = build_config(ServeOptions, {"port": port}, opts_dict)
    sys.exit(run_server(opts, InstantDriver(opts, step_ms)))


def main() -> None:
    opts = parse_args(DEFAULTS, QUICK)
    top = max(int(c) for c in opts["concurrency"])
    port = free_port()
    server_opts = {"model": opts["model"], "max_slots": str(top), "microbatches": str(opts["groups"]),
                   "log_level": "warning", "plan": "even", "api_servers": str(opts["api_servers"]),
                   "http_parser": str(opts["http_parser"])}
    # not a daemon: the server starts its HTTP process
    proc = mp.get_context("spawn").Process(target=_serve, args=(server_opts, port, float(opts["step_ms"])))
    proc.start()
    url = f"http://127.0.0.1:{port}"
    server = psutil.Process(proc.pid)
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if not proc.is_alive():
                raise SystemExit(f"the server exited with status {proc.exitcode}")
            time.sleep(0.2)
        else:
            raise SystemExit("the server did not become ready in 120 s")
        opts["url"] = url
        probe = CpuProbe(server, port)
        levels = sweep(url, {}, opts, probe)
        probe.annotate(levels)
    finally:
        proc.terminate()
        proc.join(30)
    out = Path(opts["out"])
    write_json(out.with_suffix(".json"), {"env": environment(), "config": opts, "results": levels})
    plot(levels, out.with_suffix(".png"), f"eet_pipe serve host side (instant pipeline), max_tokens={opts['max_tokens']}")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}", file=sys.stderr)


if __name__ == "__main__":
    main()
