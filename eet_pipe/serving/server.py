"""Server lifecycle: two processes, or more. This one (the engine process) loads the pipeline and runs
the scheduler and the step loop; a spawned HTTP process (`eet_pipe.serving.frontend`) binds the port at
once and serves HTTP, tokenisation, detokenisation and SSE (`api_servers` > 1: that many, sharing the
port). They talk over ZeroMQ (`ipc`).

/health answers 503 ("loading") until the workers have loaded their stages, allocated their KV
caches and run a warm-up step; then 200 ("ready"). A worker failure fails every pending request with
503 and, with `exit_on_failure`, stops the server with exit status 1. SIGINT/SIGTERM: the HTTP process
stops accepting connections, running requests finish (up to `drain_timeout`), the workers stop, exit 0.
The HTTP processes die with the engine process, and the death of any of them stops the server (exit 1).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from eet_pipe.serving.driver import PipelineSetup, StepDriver, prompt_padding
from eet_pipe.serving.engine_core import EngineCore
from eet_pipe.serving.errors import public_message
from eet_pipe.serving.frontend import freeze_heap, frontend_main
from eet_pipe.serving.ipc import IpcPaths
from eet_pipe.serving.metrics import Metrics
from eet_pipe.serving.scheduler import Scheduler
from eet_pipe.serving.serve_options import ServeOptions

__all__ = ["Runtime", "run_server"]

log = logging.getLogger("eet_pipe.serve")


class Runtime:
    """The engine process's state: driver, scheduler, metrics and status (`on_change` hears of changes)."""

    def __init__(self, opts: ServeOptions, driver: StepDriver, wrap: Callable = lambda d: d,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.opts, self.driver, self.wrap, self.on_change = opts, driver, wrap, on_change
        self.status, self.message = "loading", "the server is loading the model"
        self.setup: PipelineSetup | None = None
        self.scheduler: Scheduler | None = None
        self.metrics = Metrics()
        self.failed = False
        self.done = threading.Event()
        """Set when the server should stop: a failure with exit_on_failure."""
        self._lock = threading.Lock()
        self._loader: threading.Thread | None = None
        self._stopped = False

    def load(self) -> None:
        """(loader thread) Load, warm up, start the scheduler; or fail with the reason."""
        began = time.perf_counter()
        try:
            self.driver.start()
        except Exception as err:  # noqa: BLE001 - whatever stops the startup fails the server (503, exit 1)
            self.driver.close()
            if self.status == "stopping":  # stop() closed the pipeline under the loading workers
                log.info("startup interrupted by shutdown (%s)", type(err).__name__)
                return
            log.exception("startup failed")
            self.fail(f"startup failed: {type(err).__name__}: {err}")
            return
        freeze_heap()  # the pipeline is set up; not under the lock (a full collection takes 50-100 ms)
        with self._lock:
            if self.status != "loading":  # stopped while loading
                self.driver.close()
                return
            self.setup = self.driver.setup
            self.scheduler = Scheduler(self.wrap(self.driver), self.opts.max_queue, self.opts.max_prefill_tokens,
                                       self.metrics, prefill_wait=self.opts.prefill_wait,
                                       prompt_padding=prompt_padding(self.setup))
            self.scheduler.on_failure = self.fail
            self.scheduler.thread.start()
            self.status, self.message = "ready", ""
        self.on_change()
        log.info("ready after %.1f s: http://%s:%d (model %s, %d stages)", time.perf_counter() - began,
                 self.opts.host, self.opts.port, self.opts.served_model_name or self.opts.model,
                 self.setup.num_stages)

    def start_loading(self) -> None:
        self._loader = threading.Thread(target=self.load, name="eet_pipe-loader", daemon=True)
        self._loader.start()

    def fail(self, message: str) -> None:
        """The pipeline is gone: answer 503 from now on and (with exit_on_failure) stop the server. The
        full `message` goes to the log; /health and 503 bodies show its first line."""
        with self._lock:
            if self._stopped:  # asked to stop: stopping the workers may end a step in flight; exit 0
                log.warning("while stopping: %s", message)
                return
            self.status, self.message, self.failed = "failed", public_message(message), True
        log.error("%s", message)
        self.on_change()
        if self.opts.exit_on_failure:
            self.done.set()

    def stop(self) -> None:
        """Drain the scheduler (running requests finish), then stop every worker (idempotent)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            if self.status in ("loading", "ready"):
                self.status, self.message = "stopping", "the server is shutting down"
            scheduler = self.scheduler
        self.on_change()
        if scheduler is not None:
            scheduler.stop(self.opts.drain_timeout)
        self.driver.close()
        if self.driver.trace is not None:
            self.driver.trace.close()
        if self._loader is not None:
            self._loader.join(timeout=30.0)
        log.info("stopped")


@contextmanager
def _children_ignore_stop_signals() -> Iterator[None]:
    """Processes started here inherit an ignored SIGINT and SIGTERM: Ctrl-C in a terminal reaches the whole
    process group, and a service manager (systemd's default KillMode) sends SIGTERM to every process of
    the service, but only this process should react: it drains, then stops the others itself. The
    children still die with this process (parent-death signal) and on SIGKILL."""
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in stops}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait(rt: Runtime, frontends: list[mp.process.BaseProcess], stop: threading.Event) -> int | None:
    """Until a stop signal, a failure that ends the server, or the death of an HTTP process (its index)."""
    while not stop.wait(0.1) and not rt.done.is_set():
        for index, frontend in enumerate(frontends):
            if not frontend.is_alive():
                with rt._lock:
                    rt.failed = True
                log.error("HTTP process %d exited (status %s); stopping", index, frontend.exitcode)
                return index
    return None


IPC_PREFIX = "eet_pipe-ipc-"
"""Each server's socket folder is <tmp>/eet_pipe-ipc-<pid>-<random> (mode 0700)."""


def _remove_stale_ipc_folders() -> None:
    """Remove socket folders of this user's servers that were killed before they could clean up."""
    for path in Path(tempfile.gettempdir()).glob(f"{IPC_PREFIX}*-*"):
        pid = path.name[len(IPC_PREFIX):].split("-", 1)[0]
        try:
            if not pid.isdigit() or path.stat().st_uid != os.getuid() or not path.is_dir():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:  # gone meanwhile, or a live process of another user
            continue


def run_server(opts: ServeOptions, driver: StepDriver) -> int:
    """Serve until SIGINT/SIGTERM (exit status 0) or a pipeline failure (1, with exit_on_failure)."""
    opts = opts.resolve_api_servers(driver.on_gpus())
    if opts.api_servers > 1:
        log.info("%d HTTP processes on port %d", opts.api_servers, opts.port)
    _remove_stale_ipc_folders()
    folder = tempfile.mkdtemp(prefix=f"{IPC_PREFIX}{os.getpid()}-")
    paths = IpcPaths(folder)
    rt = Runtime(opts, driver)
    core = EngineCore(rt, paths, opts.api_servers)
    rt.wrap, rt.on_change = core.wrap, core.publish_status
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    ctx = mp.get_context("spawn")
    frontends = [ctx.Process(target=frontend_main, args=(opts, paths, os.getpid(), i), daemon=True,
                             name=f"eet_pipe-http{i if opts.api_servers > 1 else ''}") for i in range(opts.api_servers)]
    try:
        with _children_ignore_stop_signals():
            for frontend in frontends:
                frontend.start()
            driver.spawn()
        core.start()
        core.publish_status()
        rt.start_loading()
        dead = _wait(rt, frontends, stop)
        if dead is not None:
            core.cancel_frontend(dead)  # the others' running requests drain
        core.stop_frontend()
        rt.stop()
        core.flush()  # the events of the last step (the scheduler thread has ended)
        deadline = time.monotonic() + opts.drain_timeout + 15.0
        for frontend in frontends:
            frontend.join(max(0.0, deadline - time.monotonic()))
    finally:
        rt.stop()  # idempotent; covers an exception above
        for frontend in frontends:
            if frontend.is_alive():
                frontend.kill()
                frontend.join(5.0)
        core.close()
        shutil.rmtree(folder, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 1 if rt.failed else 0
