"""`ServeOptions`: everything `python -m eet_pipe.serve` accepts (as --flags or key=value)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import socket
import sys
from dataclasses import dataclass

from eet_pipe.options.typed import EngineOptions

__all__ = ["AUTO_API_SERVERS", "HTTP_PARSERS", "ServeOptions", "port_sharing"]

HTTP_PARSERS = ("auto", "httptools", "h11")
"""Values of `http_parser` (`eet_pipe.serving.protocol` builds the protocol class of each)."""

AUTO_API_SERVERS = 2
"""HTTP processes of `api_servers=0` where the stages are on GPUs: on one H100 at 256 streaming clients one
process was a core busy and the server reached 0.875 x the engine's tokens/s; two reached 0.964, four 0.960
(docs/PERF.md, server section)."""

AUTO_MIN_CORES = 8
"""Cores this process may use before `api_servers=0` starts more than one HTTP process: the step loop, one
worker per stage and the HTTP processes each want one."""


def port_sharing() -> bool:
    """Whether several processes can listen on one port with the kernel spreading connections (SO_REUSEPORT on
    Linux; elsewhere it either lacks the option or lets the last listener take every connection)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class ServeOptions(EngineOptions):
    """Options of the HTTP server; `microbatches` is the number of step groups in flight (0 = 2 x stages)."""

    host: str = "127.0.0.1"
    """Address to bind (0.0.0.0 to accept connections from other machines)."""
    port: int = 8000
    """TCP port of the HTTP server."""
    api_servers: int = 0
    """HTTP processes (HTTP, tokenisation, detokenisation, SSE), all on `port` (SO_REUSEPORT; Linux): more
    than one when one process's core limits the server (many streaming clients on fast GPUs). 0 = auto: 2
    where every stage is on a GPU, the port can be shared (Linux, a port number) and the process may use at
    least 8 cores; 1 otherwise."""
    api_key: str | None = None
    """If set, /v1/* requests need the header 'Authorization: Bearer <api_key>'."""
    served_model_name: str | None = None
    """Model id shown in /v1/models and responses (default: the model argument)."""
    threads: int = 0
    """Intra-op CPU threads per worker (0 = the machine's cores / stages, at least 1; oversubscribed CPU
    workers spin and slow down many times over)."""
    max_slots: int = 32
    """Sequences decoded at once: KV-cache rows per stage, shared by all step groups."""
    max_queue: int = 256
    """Sequences waiting for a slot before new requests get 429."""
    max_prefill_tokens: int = 4096
    """Padded prompt tokens admitted into one step (at least one prompt always is)."""
    prefill_wait: float = 0.0
    """Seconds waiting prompts may be held back, while other sequences keep the pipeline busy, until they
    fill a prefill part (`max_prefill_tokens`, or the group's free slots). 0 admits at once."""
    trace_max_mb: int = 1024
    """Largest size of the `trace` file in MiB: at this size the trace is closed (a complete JSON array) and
    serving goes on untraced."""
    warmup: bool = True
    """Before reporting ready, run every step shape the server can replay from CUDA graphs twice (once eagerly,
    once to capture it): a decode part per batch bucket, a prompt part per batch and width bucket up to the
    graphed size. Startup takes longer (seconds per stage on GPT-2 XL); no request pays a capture later. Only
    where the stages are on GPUs with `cuda_graphs` on."""
    max_n: int = 16
    """Largest `n` (choices per prompt) a request may ask for."""
    max_body_bytes: int = 1048576
    """Largest request body in bytes (larger gets 413)."""
    max_stops: int = 16
    """Most stop strings one request may give (each is searched for on every new token)."""
    max_stop_chars: int = 128
    """Longest stop string in characters (a stream holds back this many characters minus one)."""
    max_connections: int = 2048
    """Open connections plus running requests before new requests get 503 (uvicorn's limit_concurrency,
    shared out over the `api_servers` HTTP processes)."""
    http_parser: str = "auto"
    """HTTP/1.1 parser of the HTTP processes: httptools (C), h11 (pure Python), or auto (httptools where it is
    installed, as the `serve` extra installs it)."""
    header_timeout: float = 30.0
    """Seconds a connection may take to send a request's line and headers before it is closed."""
    body_timeout: float = 60.0
    """Seconds a client may take to send a request body before it gets 408."""
    keep_alive: int = 75
    """Seconds an idle keep-alive connection stays open. Longer than clients' own idle expiry (httpx: 5 s),
    so a client never sends a request on a connection the server is closing at that moment."""
    drain_timeout: float = 30.0
    """On SIGINT/SIGTERM, seconds to let running requests finish before stopping the workers."""
    startup_timeout: float = 900.0
    """Seconds to wait for the workers to load the model."""
    exit_on_failure: bool = True
    """Exit (status 1) after a worker failure instead of answering 503 until stopped."""
    log_level: str = "info"
    """Logging level: debug, info, warning or error."""

    def __post_init__(self) -> None:
        checks = [
            ("port", 0 <= self.port <= 65535, "an integer 0..65535"),
            ("api_servers", 0 <= self.api_servers <= 64, "an integer 1..64, or 0 (auto)"),
            ("threads", self.threads >= 0, ">= 0 (0 = cores / stages)"),
            ("max_slots", self.max_slots >= 1, ">= 1"),
            ("max_queue", self.max_queue >= 0, ">= 0"),
            ("max_prefill_tokens", self.max_prefill_tokens >= 1, ">= 1"),
            ("prefill_wait", 0 <= self.prefill_wait <= 10, "0..10 seconds"),
            ("trace_max_mb", self.trace_max_mb >= 1, ">= 1 (MiB)"),
            ("max_n", self.max_n >= 1, ">= 1"),
            ("max_body_bytes", self.max_body_bytes >= 1024, ">= 1024"),
            ("max_stops", self.max_stops >= 0, ">= 0"),
            ("max_stop_chars", self.max_stop_chars >= 1, ">= 1"),
            ("max_connections", self.max_connections >= (self.api_servers or AUTO_API_SERVERS),
             ">= api_servers (each HTTP process takes a share)"),
            ("http_parser", self.http_parser in HTTP_PARSERS, f"{', '.join(HTTP_PARSERS[:-1])} or {HTTP_PARSERS[-1]}"),
            ("header_timeout", self.header_timeout > 0, "> 0 seconds"),
            ("body_timeout", self.body_timeout > 0, "> 0 seconds"),
            ("keep_alive", self.keep_alive >= 1, ">= 1 (seconds)"),
            ("drain_timeout", self.drain_timeout >= 0, ">= 0 seconds"),
            ("startup_timeout", self.startup_timeout > 0, "> 0 seconds"),
            ("timeout", self.timeout > 0, "> 0 seconds"),
            ("stages", self.stages >= 1, ">= 1"),
            ("microbatches", self.microbatches >= 0, ">= 0 (0 = 2 x stages)"),
            ("max_seq", self.max_seq >= 0, ">= 0 (0 = the model's max positions)"),
            ("log_level", self.log_level.lower() in ("debug", "info", "warning", "error"),
             "debug, info, warning or error"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be {allowed}")
        if self.http_parser == "httptools" and importlib.util.find_spec("httptools") is None:
            raise ValueError("http_parser=httptools but httptools is not installed: pip install httptools, "
                             "or use http_parser=auto or h11")
        if self.api_servers > 1 and not port_sharing():
            raise ValueError(f"api_servers={self.api_servers} needs SO_REUSEPORT with load balancing (Linux); "
                             "use api_servers=1 here")
        if self.api_servers > 1 and self.port == 0:
            raise ValueError(f"api_servers={self.api_servers} with port=0: processes cannot share an arbitrary "
                             "free port; give a port number")

    def resolve_api_servers(self, on_gpus: bool) -> ServeOptions:
        """These options with `api_servers` decided (unchanged unless 0, auto): `AUTO_API_SERVERS` when `on_gpus`
        (every stage on a GPU), the port can be shared and at least `AUTO_MIN_CORES` cores are usable; else 1.
        CPU stages want the cores themselves, and there the HTTP side is not what limits the server."""
        if self.api_servers:
            return self
        many = on_gpus and port_sharing() and self.port != 0 and _usable_cores() >= AUTO_MIN_CORES
        return dataclasses.replace(self, api_servers=AUTO_API_SERVERS if many else 1)
