"""Worker process: one per device, self-spawned by `PipelineEngine` (spawn mode)."""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from eet_pipe.loading.presets import ModelSpec
from eet_pipe.runtime import wire
from eet_pipe.runtime.commands import Shutdown
from eet_pipe.runtime.context import NCCL_SAFE_ENV, init_distributed
from eet_pipe.runtime.step import ServeState, next_command, serve_command
from eet_pipe.runtime.step_parts import SERVE_COMMANDS

__all__ = ["WorkerArgs", "worker_main"]


@dataclass
class WorkerArgs:
    """Everything a spawned worker needs (picklable)."""

    rank: int
    world: int
    device: str
    init_method: str
    spec: ModelSpec
    chunk_units: list[list[str]]
    dtype: torch.dtype
    parent_pid: int
    threads: int = 1
    """Intra-op CPU threads (the caller's count by default, so CPU results match the caller's bit for bit)."""
    devices: tuple[str, ...] = ()
    """Every stage's device, by rank (stages that share a GPU are then joined through host memory)."""
    stack_file: str | None = None
    """Where the worker writes the Python stacks of all its threads on SIGUSR1 (the supervisor asks
    for them when the pipeline stalls, and puts them in the timeout error)."""


def _die_with_parent(parent_pid: int) -> None:
    """Exit when the parent process goes away, so no worker outlives its engine."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


FAULT_ENV = "EET_PIPE_FAULT_INJECT"
"""Testing hook: 'RANK:KIND:N' makes stage RANK raise / exit / hang (KIND) at its N-th action of a command."""


def _fault_hook(rank: int) -> Callable[[], None]:
    """The fault-injection debug switch (docs/ARCHITECTURE.md, "Debug switches"), read once at start-up:
    EET_PIPE_FAULT_INJECT=STAGE:KIND:N makes stage STAGE raise, exit or hang (KIND) at its N-th action.
    The fault tests use it to check that failures reach the caller; unset, it costs nothing."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return lambda: None
    parts = spec.split(":")
    if len(parts) != 3 or not parts[0].isdigit() or parts[1] not in ("raise", "exit", "hang") or not parts[2].isdigit():
        raise ValueError(f"{FAULT_ENV}={spec!r} is invalid: expected STAGE:KIND:N with KIND raise, exit or hang")
    target, kind, after = parts
    if int(target) != rank:
        return lambda: None
    count = [0]

    def hook() -> None:
        count[0] += 1
        if count[0] < int(after):
            return
        if kind == "raise":
            raise RuntimeError(f"injected fault at stage {rank}")
        if kind == "exit":
            os._exit(3)
        if kind == "hang":
            threading.Event().wait()

    return hook


def worker_main(args: WorkerArgs, commands, results, progress) -> None:
    """Worker entry: build the stage, then execute commands until Shutdown.

    Messages put on `results`: ("ready", rank, info), ("result", rank, payload, events),
    ("error", rank, text), and while serving ("stats", rank, info). `progress` is a shared double
    updated after every action. Serving commands (`eet_pipe.runtime.step`) share one persistent
    `ServeState` per worker (KV caches and per-slot samplers that outlive each step).
    """
    _die_with_parent(args.parent_pid)
    if args.stack_file:
        stack_out = open(args.stack_file, "w")  # noqa: SIM115 - open for the life of the process
        faulthandler.register(signal.SIGUSR1, file=stack_out, all_threads=True)
    for key, value in NCCL_SAFE_ENV.items():
        os.environ[key] = value
    if args.device.startswith("cuda"):
        # Load every kernel when the CUDA context is created: loading one lazily while an NCCL kernel
        # spins on the same GPU can wait on that kernel forever.
        os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")
    torch.set_num_threads(args.threads)

    fault = [lambda: None]

    def tick() -> None:
        progress.value = time.monotonic()
        fault[0]()

    try:
        from eet_pipe.runtime.stage import Stage

        ctx = init_distributed(args.rank, args.world, torch.device(args.device), args.init_method,
                               devices=list(args.devices) or None)
        tick()
        stage = Stage(ctx, args.spec, args.chunk_units, args.dtype, tick)
        results.put(("ready", args.rank, {"chunks": sorted(stage.chunks)}))
        fault[0] = _fault_hook(args.rank)
        serving: ServeState | None = None
        while True:
            cmd = next_command(commands.get, commands.get_nowait, serving, results.put)
            if isinstance(cmd, bytes):  # `Supervisor.broadcast` sends pickled commands
                cmd = wire.loads(cmd)
            if isinstance(cmd, Shutdown):
                break
            tick()
            if isinstance(cmd, SERVE_COMMANDS):
                serving, messages = serve_command(stage, serving, cmd)
                for msg in messages:
                    results.put(msg)
                continue
            out = stage.execute(cmd)
            events = stage.tracer.events() if getattr(cmd, "trace", False) else []
            if stage.ctx.is_last or events:
                results.put(("result", args.rank, out, events))
    except BaseException:  # noqa: BLE001 - reported to the engine with the traceback, then the worker exits
        results.put(("error", args.rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - best effort while exiting
                pass
