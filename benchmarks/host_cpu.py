"""CPU time per generated token of a server's host processes, for the serving benchmarks: the engine process
(scheduler and step loop) and the HTTP processes, apart."""

from __future__ import annotations

import os
import sys

import psutil

__all__ = ["CpuProbe", "cpu_per_token", "fmt_us", "CPU_RESOLUTION_S"]

CPU_RESOLUTION_S = 3 / os.sysconf("SC_CLK_TCK")
"""Process CPU times advance in clock ticks: a level that used less than three of them is not measured."""


def cpu_per_token(cpu_s: float, tokens: int) -> float | None:
    """CPU microseconds per token, or None when the level was too short for the clock to measure."""
    return None if cpu_s < CPU_RESOLUTION_S or not tokens else cpu_s / tokens * 1e6


def fmt_us(value: float | None) -> str:
    return "   n/a" if value is None else f"{value:6.1f}"


HTTP_SATURATED = 0.8
"""An HTTP process busier than this share of a core (on average over a level) delays the requests and tokens
that queue behind its event loop: the level may measure it rather than the pipeline."""


class CpuProbe:
    """The engine (step-loop) process's CPU times for `sweep`; records the HTTP processes' at the same moments
    (the children listening on the server's port, summed; workers, which drive the devices, are not
    counted)."""

    def __init__(self, server: psutil.Process, port: int) -> None:
        self.server = server
        self.http = [p for p in server.children() if any(
            c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in p.net_connections("tcp"))]
        self.http_marks: list[float] = []

    def cpu_times(self):
        if self.http:
            self.http_marks.append(sum(t.user + t.system for t in (p.cpu_times() for p in self.http)))
        return self.server.cpu_times()

    def annotate(self, levels: list[dict]) -> None:
        for level, (before, after) in zip(levels, zip(self.http_marks[::2], self.http_marks[1::2], strict=True),
                                          strict=False):
            level["http_cpu_s"] = after - before
            level["http_cpu_us_per_token"] = cpu_per_token(level["http_cpu_s"], level["tokens"])
            level["http_busy"] = level["http_cpu_s"] / max(level["wall_s"] * len(self.http), 1e-9)
            level["http_processes"] = len(self.http)
            print(f"concurrency {level['concurrency']:>4}: step-loop process "
                  f"{fmt_us(level['server_cpu_us_per_token'])} us/token, {len(self.http)} HTTP process(es) "
                  f"{fmt_us(level['http_cpu_us_per_token'])} us/token, each {level['http_busy']:.0%} busy",
                  file=sys.stderr)
            if level["http_busy"] > HTTP_SATURATED:
                print(f"    the HTTP side may limit this level: each of its {len(self.http)} process(es) used "
                      f"{level['http_busy']:.0%} of a core (raise the server's api_servers=)", file=sys.stderr)
