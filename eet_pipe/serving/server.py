"""Server lifecycle: bind at once, load in the background, serve, drain on SIGINT/SIGTERM, stop every worker.

/health answers 503 ("loading") until the workers have loaded their stages, allocated their KV
caches and run a warm-up step; then 200 ("ready"). A worker failure fails every pending request with
503 and, with `exit_on_failure`, stops the server with exit status 1.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import uvicorn

from eet_pipe.runtime.serving_engine import PipelineSetup, StepDriver
from eet_pipe.serving.api import create_app
from eet_pipe.serving.errors import public_message
from eet_pipe.serving.metrics import Metrics
from eet_pipe.serving.options import ServeOptions
from eet_pipe.serving.protocol import protocol_with_header_timeout
from eet_pipe.serving.scheduler import Scheduler

__all__ = ["Runtime", "run_server"]

log = logging.getLogger("eet_pipe.serve")


class Runtime:
    """State shared by the HTTP app, the loader thread and the scheduler."""

    def __init__(self, opts: ServeOptions, driver: StepDriver) -> None:
        self.opts, self.driver = opts, driver
        self.status, self.message = "loading", "the server is loading the model"
        self.setup: PipelineSetup | None = None
        self.scheduler: Scheduler | None = None
        self.metrics = Metrics()
        self.created = int(time.time())
        self.server: uvicorn.Server | None = None
        self.failed = False
        self._lock = threading.Lock()
        self._loader: threading.Thread | None = None
        self._stopped = False

    @property
    def model_name(self) -> str:
        return self.opts.served_model_name or self.opts.model

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
        with self._lock:
            if self.status != "loading":  # stopped while loading
                self.driver.close()
                return
            self.setup = self.driver.setup
            self.scheduler = Scheduler(self.driver, self.opts.max_queue, self.opts.max_prefill_tokens, self.metrics)
            self.scheduler.on_failure = self.fail
            self.scheduler.thread.start()
            self.status, self.message = "ready", ""
        log.info("ready after %.1f s: http://%s:%d (model %s, %d stages)", time.perf_counter() - began,
                 self.opts.host, self.opts.port, self.model_name, self.setup.num_stages)

    def fail(self, message: str) -> None:
        """The pipeline is gone: answer 503 from now on and (with exit_on_failure) stop the server. The
        full `message` goes to the log; /health and 503 bodies show its first line."""
        with self._lock:
            if self._stopped:  # asked to stop: stopping the workers may end a step in flight; exit 0
                log.warning("while stopping: %s", message)
                return
            self.status, self.message, self.failed = "failed", public_message(message), True
        log.error("%s", message)
        if self.opts.exit_on_failure and self.server is not None:
            self.server.should_exit = True

    def stop(self) -> None:
        """Drain the scheduler (running requests finish), then stop every worker (idempotent)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            if self.status in ("loading", "ready"):
                self.status, self.message = "stopping", "the server is shutting down"
            scheduler = self.scheduler
        if scheduler is not None:
            scheduler.stop(self.opts.drain_timeout)
        self.driver.close()
        if self._loader is not None:
            self._loader.join(timeout=30.0)
        log.info("stopped")

    @asynccontextmanager
    async def lifespan(self, _: Any) -> AsyncIterator[None]:
        self._loader = threading.Thread(target=self.load, name="eet_pipe-loader", daemon=True)
        self._loader.start()
        yield
        await asyncio.to_thread(self.stop)


class _Server(uvicorn.Server):
    """uvicorn without re-raising the caught signal after shutdown, so the process exits with our status."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


@contextmanager
def _children_ignore_stop_signals() -> Iterator[None]:
    """Processes started here inherit an ignored SIGINT and SIGTERM: Ctrl-C in a terminal reaches the whole
    process group, and a service manager (systemd's default KillMode) sends SIGTERM to every process of
    the service, but only the server should react: it drains, then stops the workers itself. A worker
    still dies with the server (parent-death signal) and on SIGKILL."""
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in stops}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_server(opts: ServeOptions, driver: StepDriver) -> int:
    """Serve until SIGINT/SIGTERM (exit status 0) or a pipeline failure (1, with exit_on_failure)."""
    rt = Runtime(opts, driver)
    config = uvicorn.Config(create_app(rt), host=opts.host, port=opts.port, log_level=opts.log_level.lower(),
                            timeout_graceful_shutdown=max(opts.drain_timeout, 0.1), lifespan="on",
                            timeout_keep_alive=opts.keep_alive, limit_concurrency=opts.max_connections,
                            http=protocol_with_header_timeout(opts.header_timeout),
                            access_log=opts.log_level.lower() == "debug")
    rt.server = _Server(config)
    with _children_ignore_stop_signals():
        driver.spawn()
    try:
        rt.server.run()
    finally:
        rt.stop()  # idempotent; covers a forced exit (second Ctrl-C) that skipped the lifespan shutdown
    return 1 if rt.failed else 0
