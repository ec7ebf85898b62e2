"""Start, watch and stop the worker processes of a self-spawned pipeline.

Every wait checks that the workers are alive and making progress, so a crashed, killed or hung
worker becomes an error in the caller within the timeout, and no process is left behind.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import signal
import socket
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch.multiprocessing as mp

from eet_pipe.runtime import wire
from eet_pipe.runtime.channel import CommandChannel
from eet_pipe.runtime.commands import Shutdown
from eet_pipe.runtime.worker import WorkerArgs, worker_main

__all__ = ["Supervisor", "WorkerError", "WorkerDiedError", "WorkerTimeoutError", "PipelineClosedError", "free_port"]

log = logging.getLogger("eet_pipe.runtime")


class WorkerError(RuntimeError):
    """A worker raised; the message names the stage, its device and the worker's traceback."""


class WorkerDiedError(WorkerError):
    """A worker process exited unexpectedly (killed, out of memory, crashed)."""


class WorkerTimeoutError(WorkerError, TimeoutError):
    """No worker made progress within the timeout (a hung peer)."""


class PipelineClosedError(WorkerError):
    """`shutdown` was called (e.g. by a signal handler on another thread) while this call waited: the
    workers stopped because they were asked to, not because one failed."""


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _without_main_module() -> Iterator[None]:
    """Spawned workers need nothing from the caller's __main__ (which may be stdin, a notebook or a
    script with side effects), so hide it from multiprocessing's preparation while starting them."""
    main = sys.modules.get("__main__")
    saved = {k: getattr(main, k) for k in ("__file__", "__spec__") if main is not None and hasattr(main, k)}
    if "__file__" in saved:
        delattr(main, "__file__")
    if main is not None:
        main.__spec__ = None
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(main, k, v)


def _main_thread_frames(dump: str, limit: int = 6) -> str:
    """The innermost `limit` frames of the thread that was running the stage in a faulthandler dump."""
    blocks = [b for b in dump.split("\n\n") if b.strip()]
    main = next((b for b in blocks if "worker_main" in b), blocks[0] if blocks else "")
    frames = [ln for ln in main.splitlines() if ln.strip().startswith("File ")]
    return "\n".join(frames[:limit])


def _holds_main(path: str) -> bool:
    with open(path) as f:
        return "worker_main" in f.read()


def _reap(procs: list) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=5)


class Supervisor:
    """The worker processes of one engine and the queues to them."""

    def __init__(self, args: list[WorkerArgs], timeout: float) -> None:
        self.args, self.timeout = args, timeout
        self._stacks = tempfile.TemporaryDirectory(prefix="eet_pipe-stacks-")
        for a in args:
            a.stack_file = os.path.join(self._stacks.name, f"stage{a.rank}.txt")
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.commands = [CommandChannel(ctx) for _ in args]
        # no lock: a worker killed while holding a shared lock would block every later read of its stamp
        # (the supervisor's liveness check itself); an aligned double is stored and read whole
        self.progress = [ctx.Value("d", time.monotonic(), lock=False) for _ in args]
        self.procs = [ctx.Process(target=worker_main, args=(a, c.reader, self.results, p), daemon=True,
                                  name=f"eet_pipe-stage{a.rank}")
                      for a, c, p in zip(args, self.commands, self.progress, strict=True)]
        self.closed = False
        self.shutting_down = False
        """`shutdown` was called: a wait that sees workers exit from now on raises PipelineClosedError."""
        # MKL may otherwise use fewer threads than asked when cores are busy, and a different thread
        # split changes the last bits of CPU results (workers must match the caller bit for bit)
        os.environ.setdefault("MKL_DYNAMIC", "FALSE")
        with _without_main_module():
            for p in self.procs:
                p.start()
        for channel in self.commands:
            channel.started()
        self._finalizer = weakref.finalize(self, _reap, list(self.procs))
        atexit.register(self._finalizer)

    def describe(self, rank: int) -> str:
        return f"stage {rank} (device {self.args[rank].device}, pid {self.procs[rank].pid})"

    def broadcast(self, cmd: Any) -> None:
        """Send one command to every worker."""
        if self.closed:
            raise WorkerError("the pipeline is closed (a worker failed or close() was called); create a new engine")
        # bytes: tensors in commands travel by value, not as shared-memory file descriptors (which would
        # keep a descriptor-server thread in this process and tie memory to worker lifetimes)
        payload = wire.dumps(cmd)
        for channel in self.commands:
            channel.put(payload)

    def collect(self, count: int, what: str, kinds: tuple[str, ...] = ("result",),
                timeout: float | None = None) -> list[tuple]:
        """Wait for `count` messages of `kinds`; raise (and stop every worker) on error, death or stall."""
        timeout = self.timeout if timeout is None else timeout
        got: list[tuple] = []
        while len(got) < count:
            if self.shutting_down:
                raise PipelineClosedError(f"the pipeline was shut down while {what}")
            try:
                msg = self.results.get(timeout=0.05)
            except queue.Empty:
                self._check(what, timeout)
                continue
            except (ValueError, OSError):  # the queue was closed under this call
                if self.shutting_down:
                    raise PipelineClosedError(f"the pipeline was shut down while {what}") from None
                raise
            if msg[0] == "error":
                self._fail_with_cause(msg, what)
            if msg[0] in kinds:
                got.append(msg)
        return got

    def _fail_with_cause(self, msg: tuple, what: str) -> None:
        """A worker reported an error; if another worker died first, that death is the cause."""
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            dead = [r for r, p in enumerate(self.procs) if r != msg[1] and p.exitcode not in (None, 0)]
            if dead:
                code = self.procs[dead[0]].exitcode
                how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                self.fail(WorkerDiedError(f"{self.describe(dead[0])} died ({how}) while {what}; then "
                                          f"{self.describe(msg[1])} failed:\n{msg[2]}"))
            time.sleep(0.05)
        self.fail(WorkerError(f"{self.describe(msg[1])} failed while {what}:\n{msg[2]}"))

    def _check(self, what: str, timeout: float) -> None:
        if self.shutting_down:  # workers exit on Shutdown: that is no failure
            raise PipelineClosedError(f"the pipeline was shut down while {what}")
        for rank, p in enumerate(self.procs):
            if not p.is_alive():
                time.sleep(0.1)  # let a final error message arrive first
                try:
                    msg = self.results.get_nowait()
                    if msg[0] == "error":
                        self._fail_with_cause(msg, what)
                except queue.Empty:
                    pass
                code = p.exitcode
                how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                self.fail(WorkerDiedError(f"{self.describe(rank)} died ({how}) while {what}"))
        now = time.monotonic()
        stalls = [now - v.value for v in self.progress]
        if min(stalls) > timeout:
            worst = max(range(len(stalls)), key=lambda r: stalls[r])
            self.fail(WorkerTimeoutError(
                f"no stage made progress for {timeout:.0f} s while {what}; {self.describe(worst)} has been "
                f"silent longest ({stalls[worst]:.0f} s): a hung peer or a deadlock\n{self.stacks()}"))

    def stacks(self, wait: float = 1.0) -> str:
        """Where every live worker is now: each one's innermost Python frames (asked for with SIGUSR1)."""
        asked = []
        for rank, p in enumerate(self.procs):
            path = self.args[rank].stack_file
            if p.is_alive() and path:
                open(path, "w").close()
                try:
                    os.kill(p.pid, signal.SIGUSR1)
                    asked.append(rank)
                except ProcessLookupError:
                    pass
        # a dump is written thread by thread: wait until each holds the stage's own thread (worker_main) or has
        # stopped growing, not just until it is non-empty (the first thread written may be a queue feeder's)
        deadline, sizes = time.monotonic() + wait, {r: -1 for r in asked}
        while time.monotonic() < deadline:
            done = True
            for r in asked:
                size = os.path.getsize(self.args[r].stack_file)
                if size == 0 or (size != sizes[r] and not _holds_main(self.args[r].stack_file)):
                    done = False
                sizes[r] = size
            if done:
                break
            time.sleep(0.05)
        parts = []
        for rank in asked:
            with open(self.args[rank].stack_file) as f:
                text = f.read()
            main = _main_thread_frames(text)
            parts.append(f"{self.describe(rank)} is at:\n{main or '  (no stack: not responding)'}")
        return "\n".join(parts)

    def fail(self, err: Exception) -> None:
        """Stop every worker, then raise `err`."""
        self.kill()
        raise err

    def kill(self) -> None:
        self.closed = True
        _reap(self.procs)
        for channel in self.commands:
            channel.close()

    def shutdown(self, grace: float = 10.0) -> None:
        """Ask workers to stop, wait `grace` seconds, then kill what is left."""
        self.shutting_down = True
        if not self.closed:
            self.closed = True
            stop = wire.dumps(Shutdown())
            for channel in self.commands:
                channel.put(stop)
            deadline = time.monotonic() + grace
            for p in self.procs:
                p.join(timeout=max(0.0, deadline - time.monotonic()))
        _reap(self.procs)
        self._stacks.cleanup()
        for channel in self.commands:
            channel.close()
        self.results.cancel_join_thread()
        self.results.close()
