"""Serving under torchrun: every rank is a stage; rank 0 also runs the HTTP server and the scheduler.

Rank 0 broadcasts each step command over a gloo command group (a receiver thread on every other
rank queues them, so commands of several groups queue up on each stage, as with spawned workers),
runs its own stage on an executor thread, and gets the last stage's results over a 2-rank gloo
result group on a receiver thread. With more than two ranks, the middle ranks send their busy time
over a third gloo group (fixed-size messages, read by a thread on rank 0). Hidden states travel on
the usual per-link groups. The control groups have a long timeout: an idle server waits for requests
indefinitely; a dead peer shows up as a connection error, a hung one as no result within `timeout`
seconds.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
import traceback
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from eet_pipe.runtime.commands import Shutdown
from eet_pipe.runtime.context import StageContext, init_distributed
from eet_pipe.runtime.step import next_command, serve_command
from eet_pipe.runtime.step_parts import ServeInit, StepCommand
from eet_pipe.runtime.supervisor import WorkerError, WorkerTimeoutError
from eet_pipe.serving.driver import PipelineSetup, StepDriver, all_gpus, resolve_setup

__all__ = ["TorchrunDriver", "follower_main", "torchrun_rank"]

log = logging.getLogger("eet_pipe.serve")

IDLE_TIMEOUT = timedelta(days=365)
"""Timeout of the command and result groups (waiting for the next request is not an error)."""


def torchrun_rank() -> int:
    return int(os.environ["RANK"])


def _local_device(opts: Any, rank: int, world: int) -> str:
    if opts.devices:
        if len(opts.devices) != world:
            raise ValueError(f"devices={opts.devices} lists {len(opts.devices)} devices but torchrun started {world} "
                             "processes: give one device per rank, or none (each rank then uses cuda:LOCAL_RANK or cpu)")
        return opts.devices[rank]
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return f"cuda:{local}" if torch.cuda.is_available() and local < torch.cuda.device_count() else "cpu"


class _Joined:
    """This rank's part of the pipeline: context, setup, stage and the two control groups."""

    def __init__(self, opts: Any) -> None:
        from eet_pipe.runtime.stage import Stage

        self.rank, self.world = torchrun_rank(), int(os.environ["WORLD_SIZE"])
        if opts.stages not in (1, self.world):
            raise ValueError(f"--stages {opts.stages} but torchrun started {self.world} processes: use "
                             "--nproc-per-node/--nnodes so that the world size equals --stages")
        device = _local_device(opts, self.rank, self.world)
        if device == "cpu":  # oversubscribed CPU ranks spin and slow down many times over
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            torch.set_num_threads(opts.threads or max(1, (os.cpu_count() or 1) // local_world))
        self.ctx: StageContext = init_distributed(self.rank, self.world, torch.device(device), "env://")
        ranks = list(range(self.world))
        self.commands = dist.new_group(ranks, backend="gloo", timeout=IDLE_TIMEOUT) if self.world > 1 else None
        self.results = dist.new_group(sorted({0, self.world - 1}), backend="gloo", timeout=IDLE_TIMEOUT) \
            if self.world > 1 else None
        self.stats = dist.new_group(ranks, backend="gloo", timeout=IDLE_TIMEOUT) if self.world > 2 else None
        self.setup = self._setup(opts, device)
        self.stage = Stage(self.ctx, self.setup.spec, self.setup.plan.chunks(), self.setup.dtype)
        if self.world > 1:
            dist.barrier(group=self.ctx.control)
        log.info("rank %d/%d on %s: chunks %s ready", self.rank, self.world, device, sorted(self.stage.chunks))

    def _setup(self, opts: Any, device: str) -> PipelineSetup:
        """Rank 0 makes the plan; every rank then resolves the same setup from it."""
        devices: list[Any] = [device]
        if self.world > 1:
            devices = [None] * self.world
            dist.all_gather_object(devices, device, group=self.ctx.control)
        box: list[Any] = [None]
        if self.rank == 0:
            try:
                box[0] = resolve_setup(opts, devices).plan
            except (ValueError, OSError) as err:
                box[0] = f"{type(err).__name__}: {err}"
        if self.world > 1:
            dist.broadcast_object_list(box, src=0, group=self.ctx.control)
        if isinstance(box[0], str):
            raise ValueError(f"rank 0 could not set up the pipeline: {box[0]}")
        if box[0].devices != devices:
            raise ValueError(f"the plan orders the devices {box[0].devices} but torchrun ranks hold {devices}; "
                             "under torchrun use plan=even or a plan file in rank order")
        return resolve_setup(opts, devices, plan=box[0])


class TorchrunDriver(StepDriver):
    """Rank 0 of a torchrun-launched serving pipeline (see the module docstring)."""

    def __init__(self, opts: Any) -> None:
        super().__init__()
        self.opts = opts
        self.setup: PipelineSetup | None = None  # type: ignore[assignment]
        self.local: queue.Queue = queue.Queue()
        self.inbox: queue.Queue = queue.Queue()
        self.closed = False
        self.threads: list[threading.Thread] = []

    def on_gpus(self) -> bool:
        """Before the rendezvous: whether the ranks' devices are GPUs (rank 0's stands for every rank's; a mixed
        `devices` list is not all GPUs)."""
        if self.opts.devices:
            return all_gpus(self.opts.devices)
        return _local_device(self.opts, 0, int(os.environ.get("WORLD_SIZE", "1"))).startswith("cuda")

    def start(self) -> None:
        self.joined = _Joined(self.opts)
        self.setup = self.joined.setup
        self._thread(self._execute, "eet_pipe-stage0")
        if self.joined.world > 1:
            self._thread(self._receive, "eet_pipe-results")
        if self.joined.stats is not None:
            self._thread(self._receive_stats, "eet_pipe-stats")
        self.init_serving()

    def _thread(self, target: Any, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self.threads.append(t)

    def _execute(self) -> None:
        """Rank 0's own stage: run queued commands in order."""
        state = None

        def emit(msg: tuple) -> None:
            (self.inbox.put(msg) if msg[0] == "result" else self._on_stats(0, msg[2]))

        try:
            while not isinstance(cmd := next_command(self.local.get, self.local.get_nowait, state, emit), Shutdown):
                state, messages = serve_command(self.joined.stage, state, cmd)
                for msg in messages:
                    emit(msg)
        except Exception:  # noqa: BLE001 - reported to the scheduler, which fails every request
            self.inbox.put(("error", 0, traceback.format_exc()))

    def _receive(self) -> None:
        """Results (and stats) of the last stage, until it says goodbye (None)."""
        last = self.joined.world - 1
        try:
            while True:
                box: list[Any] = [None]
                dist.recv_object_list(box, src=last, group=self.joined.results)
                if box[0] is None:
                    break
                msg = box[0]
                (self.inbox.put(msg) if msg[0] != "stats" else self._on_stats(last, msg[2]))
        except Exception:  # noqa: BLE001 - a dead peer shows up here as a connection error
            if not self.closed:
                self.inbox.put(("error", last, traceback.format_exc()))

    def _receive_stats(self) -> None:
        """Busy time of the middle ranks ([rank, busy, elapsed]; elapsed < 0 says goodbye)."""
        left = self.joined.world - 2
        buf = torch.zeros(3, dtype=torch.float64)
        try:
            while left:
                dist.recv(buf, group=self.joined.stats)
                rank, busy, elapsed = buf.tolist()
                if elapsed < 0:
                    left -= 1
                else:
                    self._on_stats(int(rank), {"busy": busy, "elapsed": elapsed})
        except Exception as err:  # noqa: BLE001 - a dead middle rank also fails the pipeline; results report it
            if not self.closed:
                log.warning("busy-time reports of the middle ranks stopped: %s", err)

    def send(self, cmd: StepCommand | ServeInit) -> None:
        if self.closed:
            raise WorkerError("the pipeline is closed (a stage failed or the server is stopping)")
        self.local.put(cmd)
        if self.joined.world > 1:
            try:
                dist.broadcast_object_list([cmd], src=0, group=self.joined.commands)
            except RuntimeError as err:
                self.close()
                raise WorkerError(f"could not send step {getattr(cmd, 'step', '?')} to the other ranks: {err}") from err

    def collect(self) -> dict:
        deadline = time.monotonic() + self.opts.timeout
        while True:
            try:
                msg = self.inbox.get(timeout=0.1)
            except queue.Empty:
                if time.monotonic() > deadline:
                    self.close()
                    raise WorkerTimeoutError(f"no result from the pipeline for {self.opts.timeout:.0f} s: a hung "
                                             "rank or a deadlock") from None
                continue
            if msg[0] == "error":
                self.close()
                raise WorkerError(f"rank {msg[1]} failed:\n{msg[2]}")
            return msg[2]

    def check_alive(self) -> None:
        try:
            msg = self.inbox.get_nowait()
        except queue.Empty:
            return
        if msg[0] == "error":
            self.close()
            raise WorkerError(f"rank {msg[1]} failed while idle:\n{msg[2]}")
        raise WorkerError(f"unexpected message from rank {msg[1]} while no step was in flight: {msg[0]}")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.local.put(Shutdown())
        joined = getattr(self, "joined", None)
        if joined is not None and joined.world > 1:
            try:
                dist.broadcast_object_list([Shutdown()], src=0, group=joined.commands)
            except RuntimeError as err:
                log.warning("could not tell the other ranks to stop (%s); torchrun stops them when rank 0 exits", err)
        for t in self.threads:
            t.join(timeout=10.0)
        if dist.is_initialized() and not any(t.is_alive() for t in self.threads):
            dist.destroy_process_group()


def follower_main(opts: Any) -> int:
    """Ranks > 0: execute rank 0's commands until it sends Shutdown. Returns the exit status."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # rank 0 drains the server and then stops every rank
        signal.signal(sig, lambda s, _f: log.warning("signal %d: waiting for rank 0 to stop the pipeline", s))
    joined = _Joined(opts)
    commands: queue.Queue = queue.Queue()

    def receive() -> None:
        try:
            while True:
                box: list[Any] = [None]
                dist.broadcast_object_list(box, src=0, group=joined.commands)
                commands.put(box[0])
                if isinstance(box[0], Shutdown):
                    return
        except Exception as err:  # noqa: BLE001 - rank 0 is gone; the main loop raises it
            commands.put(err)

    threading.Thread(target=receive, name="eet_pipe-commands", daemon=True).start()
    last = joined.ctx.is_last
    state = None

    def emit(msg: tuple) -> None:
        if last:
            dist.send_object_list([msg], dst=0, group=joined.results)
        elif msg[0] == "stats":  # a middle rank
            info = msg[2]
            dist.send(torch.tensor([joined.rank, info["busy"], info["elapsed"]], dtype=torch.float64), dst=0,
                      group=joined.stats)

    try:
        while not isinstance(cmd := next_command(commands.get, commands.get_nowait, state, emit), Shutdown):
            if isinstance(cmd, BaseException):
                raise WorkerError(f"rank {joined.rank}: lost the command stream from rank 0: {cmd}")
            state, messages = serve_command(joined.stage, state, cmd)
            for msg in messages:
                emit(msg)
        if last:
            dist.send_object_list([None], dst=0, group=joined.results)
        elif joined.stats is not None:
            dist.send(torch.tensor([joined.rank, 0.0, -1.0], dtype=torch.float64), dst=0, group=joined.stats)
    except Exception:
        if last:
            try:
                dist.send_object_list([("error", joined.rank, traceback.format_exc())], dst=0, group=joined.results)
            except RuntimeError:
                pass
        raise
    dist.destroy_process_group()
    return 0
