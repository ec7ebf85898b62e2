"""`ServerProcess`: run ``python -m eet_pipe.serve`` in a subprocess and wait until it is ready.

Used by the tests and by ``benchmarks/serve_load.py --quick``; handy for scripts too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from eet_pipe.runtime.supervisor import free_port

__all__ = ["ServerProcess", "ServerStartError"]


class ServerStartError(RuntimeError):
    """The server exited or did not become ready in time; the message ends with its log."""


class ServerProcess:
    """A server subprocess on 127.0.0.1:`port` (a free port by default); its output goes to `log_path`."""

    def __init__(self, args: Sequence[str], port: int | None = None, env: dict[str, str] | None = None,
                 module: str = "eet_pipe.serve", command: Sequence[str] | None = None) -> None:
        self.port = port or free_port()
        self.args = list(args)
        self.command = list(command) if command is not None else [sys.executable, "-m", module, "--port",
                                                                    str(self.port)]
        self.env = {**os.environ, **(env or {})}
        self.log_path = Path(tempfile.mkstemp(prefix="eet_pipe_serve_", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        """Start the process (returns at once; see `wait_ready`)."""
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([*self.command, *self.args], stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, start_new_session=False)
        return self

    def health(self) -> tuple[int, dict]:
        """(HTTP status, body) of /health; (0, {}) while nothing listens."""
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return 0, {}

    def wait_ready(self, timeout: float = 120.0) -> dict:
        """Wait until /health answers 200; raise ServerStartError if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise ServerStartError(f"server exited with status {self.proc and self.proc.returncode}:\n{self.log()}")
            status, body = self.health()
            if status == 200:
                return body
            time.sleep(0.1)
        self.stop(signal.SIGKILL)
        raise ServerStartError(f"server not ready after {timeout:.0f} s:\n{self.log()}")

    def log(self, tail: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        """Send `sig`, wait up to `timeout` s (then SIGKILL); returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop(signal.SIGKILL)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
