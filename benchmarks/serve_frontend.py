"""Capacity of the HTTP server's host side alone: the real app, scheduler, sampler bookkeeping and
SSE streaming in front of a pipeline that answers every step at once (no model runs).

    python -m benchmarks.serve_frontend concurrency=1,16,64,256 max_tokens=64
    python -m benchmarks.serve_frontend --quick

Besides tokens/s, each level records the server process's CPU time per generated token (user + system,
all threads): what the host side costs independent of how fast the load generator on the same machine
is. The tokens/s measured here is the ceiling that the host side puts on any real server with the same
options: a GPU pipeline faster than this leaves its GPUs waiting. Each step's tokens come from the real
`SlotSampler` (stopping, max tokens, finish reasons), fed logits whose argmax cycles over the vocabulary.
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
from benchmarks.serve_load import plot, sweep
from eet_pipe.runtime.serving_engine import StepDriver, resolve_setup
from eet_pipe.runtime.step import ServeInit, SlotSampler, StepCommand
from eet_pipe.runtime.supervisor import free_port

DEFAULTS = {"concurrency": ["1", "16", "64", "256"], "requests": 64, "waves": 4, "max_tokens": 64, "prompt_len": 64,
            "temperature": 0.0, "model": "tiny", "groups": 2, "out": "bench_results/serve_frontend"}
QUICK = {"concurrency": ["1", "8"], "requests": 8, "waves": 1, "max_tokens": 16, "prompt_len": 16}


class InstantDriver(StepDriver):
    """A pipeline whose last stage answers each step at once with the real per-slot sampler."""

    def __init__(self, opts) -> None:
        super().__init__()
        self.setup = resolve_setup(opts, ["cpu"])
        self.sampler = SlotSampler(self.setup.tokenizer.decode)
        self.results: queue.Queue = queue.Queue()
        self.vocab = self.setup.cfg.vocab_size
        self.next_token = 0

    def start(self) -> None:
        pass

    def send(self, cmd) -> None:
        if isinstance(cmd, ServeInit):
            return
        assert isinstance(cmd, StepCommand)
        self.sampler.drop([*cmd.free, *cmd.new])
        self.sampler.start(cmd.new)
        out = {"group": cmd.group, "step": cmd.step, "tokens": {}, "finished": {}, "text": {}, "logprobs": {}}
        for part in cmd.parts:
            rows = part.slots.numel()
            logits = torch.zeros(rows, self.vocab)
            logits[torch.arange(rows), (torch.arange(rows) + self.next_token) % min(self.vocab, 250)] = 1.0
            self.next_token += 1
            self.sampler.sample(logits, part.slots.tolist(), out)
        self.results.put(out)

    def collect(self) -> dict:
        return self.results.get()

    def check_alive(self) -> None:
        pass

    def close(self) -> None:
        pass


def _serve(opts_dict: dict, port: int) -> None:
    from eet_pipe.config import build_config
    from eet_pipe.serving.options import ServeOptions
    from eet_pipe.serving.server import run_server

    opts = build_config(ServeOptions, {"port": port}, opts_dict)
    sys.exit(run_server(opts, InstantDriver(opts)))


def main() -> None:
    opts = parse_args(DEFAULTS, QUICK)
    top = max(int(c) for c in opts["concurrency"])
    port = free_port()
    server_opts = {"model": opts["model"], "max_slots": str(top), "microbatches": str(opts["groups"]),
                   "log_level": "warning", "plan": "even"}
    proc = mp.get_context("spawn").Process(target=_serve, args=(server_opts, port), daemon=True)
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
        levels = sweep(url, {}, opts, server)
    finally:
        proc.terminate()
        proc.join(30)
    out = Path(opts["out"])
    write_json(out.with_suffix(".json"), {"env": environment(), "config": opts, "results": levels})
    plot(levels, out.with_suffix(".png"), f"eet_pipe serve host side (instant pipeline), max_tokens={opts['max_tokens']}")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}", file=sys.stderr)


if __name__ == "__main__":
    main()
