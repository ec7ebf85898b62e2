"""The load generator of the server benchmarks (`serve_load`, `serve_frontend`): streaming completions from
`clients` processes, per concurrency level, with TTFT / TPOT percentiles and the clients' own CPU time.

Every request streams (SSE) with ignore_eos and return_token_ids, so each produces exactly max_tokens tokens and
every token arrives in its own chunk. The load is `clients` processes, each with its share of a level's
concurrency and requests, started together: one Python HTTP client process handles a few thousand streamed
tokens a second, less than a GPU server produces. Each level records the clients' CPU time and warns when a
client process was busy more than 80 % of the level (it may then be the limit).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import ssl
import statistics
import sys
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import aiohttp

from benchmarks.host_cpu import cpu_per_token, fmt_us

__all__ = ["CLIENT_SATURATED", "client_processes", "get_text", "percentiles", "prompts_for", "run_level", "shares",
           "sweep"]


def prompts_for(length: int, count: int = 64) -> list[str]:
    """`count` fixed random prompts of `length` lowercase letters and spaces."""
    rng = random.Random(0)
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(length)) for _ in range(count)]


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50 / p90 / p99 (None for an empty list)."""
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    if len(values) == 1:
        return {"p50": values[0], "p90": values[0], "p99": values[0]}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": q[49], "p90": q[89], "p99": q[98]}


async def one_request(session: aiohttp.ClientSession, prompt: str, opts: dict) -> dict:
    """Send one streaming completion; returns its timings and token count (or the error)."""
    body = {"prompt": prompt, "max_tokens": opts["max_tokens"], "temperature": opts["temperature"], "stream": True,
            "ignore_eos": True, "return_token_ids": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    try:
        return await _stream_one(session, body, start)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as err:  # a dropped connection, a line over 64
        # KiB or a chunk that is not JSON fails the request, not the sweep
        return {"error": f"{type(err).__name__} after {time.perf_counter() - start:.1f} s: {err}"}


async def _stream_one(session: aiohttp.ClientSession, body: dict, start: float) -> dict:
    first, tokens, streamed, error = None, 0, 0, None
    async with session.post("/v1/completions", json=body) as r:
        if r.status != 200:
            return {"error": f"HTTP {r.status}: {(await r.read())[:200]!r}"}
        async for raw in r.content:  # one SSE line at a time
            if not raw.startswith(b"data: ") or raw.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(raw[6:])
            if "error" in chunk:
                error = chunk["error"]["message"]
            elif chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            else:
                got = sum(len(c.get("token_ids") or []) for c in chunk.get("choices", []))
                if got and first is None:
                    first = time.perf_counter()
                streamed += got
    end = time.perf_counter()
    if error or first is None:
        return {"error": error or "no tokens"}
    if streamed != tokens:
        return {"error": f"{streamed} tokens streamed but usage says {tokens}"}
    tpot = (end - first) / (tokens - 1) if tokens > 1 else None
    return {"ttft": first - start, "tpot": tpot, "latency": end - start, "tokens": tokens}


async def _send_all(url: str, headers: dict, concurrency: int, picks: list[int], prompts: list[str], opts: dict,
                    start_at: float) -> dict:
    """One client process's share of a level: the prompts `picks`, at most `concurrency` in flight, sent from
    `start_at` (a `time.perf_counter` instant, the same clock in every process). Each of the `concurrency`
    users has a session of its own with one kept-alive connection and takes the next prompt when its last
    answer is complete. The client is aiohttp (C-accelerated HTTP parsing, as vLLM's serving benchmark): a
    streamed one-token request costs a fifth of httpx's CPU, a 64-token one three fifths (docs/PERF.md), and at
    hundreds of streaming clients the load generator's own CPU would otherwise delay the next request after each
    answer. The sessions are made and their connections opened (a GET /health each) before the clock starts,
    sharing one TLS context (a context each costs 10-20 ms of CPU, which would block the event loop while the
    first requests stream). With the connections opened inside the level, its first request reached the server
    212 ms after the clock started at 256 clients (1 x H200 host, 4 client processes), time the server had
    nothing to run; opened before, 70 ms (docs/PERF.md)."""
    todo = iter(picks)
    rows: list[dict] = []
    tls = ssl.create_default_context()
    timeout = aiohttp.ClientTimeout(total=600)

    async def user(session: aiohttp.ClientSession) -> None:
        for i in todo:
            rows.append(await one_request(session, prompts[i % len(prompts)], opts))

    async def opened(session: aiohttp.ClientSession) -> None:
        async with session.get("/health") as r:
            await r.read()

    async with contextlib.AsyncExitStack() as stack:
        sessions = [await stack.enter_async_context(aiohttp.ClientSession(
            base_url=url, headers=headers, timeout=timeout,
            connector=aiohttp.TCPConnector(limit=1, ssl=tls if url.startswith("https") else False)))
            for _ in range(min(concurrency, len(picks)))]
        await asyncio.gather(*(opened(s) for s in sessions))
        await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
        cpu, began = time.process_time(), time.perf_counter()
        await asyncio.gather(*(user(s) for s in sessions))
        ended = time.perf_counter()
    return {"rows": rows, "began": began, "ended": ended, "cpu_s": time.process_time() - cpu}


def _client_process(args: tuple) -> dict:
    return asyncio.run(_send_all(*args))


def get_text(url: str, headers: dict) -> str:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
        return r.read().decode()


def shares(total: int, parts: int) -> list[int]:
    """`total` split into `parts` integers that differ by at most one (larger first)."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def run_level(url: str, headers: dict, concurrency: int, count: int, prompts: list[str], opts: dict,
              pool: Any = None, clients: int = 1) -> dict:
    """`count` requests with at most `concurrency` in flight, sent by up to `clients` processes of `pool` (a
    ProcessPoolExecutor of that many; None = this process), each with its share of the concurrency and the
    requests. Throughput counts from the first client's start to the last one's end."""
    procs = 1 if pool is None else min(clients, concurrency, count)
    gates, counts = shares(concurrency, procs), shares(count, procs)  # every process has requests
    starts = [sum(counts[:i]) for i in range(procs)]
    start_at = time.perf_counter() + (0.5 if pool is not None else 0.0)  # every process ready before it
    jobs = [(url, headers, g, list(range(s, s + n)), prompts, opts, start_at)
            for g, s, n in zip(gates, starts, counts, strict=True)]
    parts = [_client_process(jobs[0])] if pool is None else list(pool.map(_client_process, jobs))
    rows = [r for part in parts for r in part["rows"]]
    wall = max(p["ended"] for p in parts) - min(p["began"] for p in parts)
    ok = [r for r in rows if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    busiest = max(p["cpu_s"] / max(p["ended"] - p["began"], 1e-9) for p in parts)
    return {"concurrency": concurrency, "requests": count, "failed": len(rows) - len(ok), "wall_s": wall,
            "tokens": tokens, "tokens_per_s": tokens / wall, "requests_per_s": len(ok) / wall,
            "ttft_s": percentiles([r["ttft"] for r in ok]),
            "tpot_s": percentiles([r["tpot"] for r in ok if r["tpot"] is not None]),
            "latency_s": percentiles([r["latency"] for r in ok]),
            "began_s": min(p["began"] for p in parts), "ended_s": max(p["ended"] for p in parts),
            "client_processes": procs, "client_cpu_s": sum(p["cpu_s"] for p in parts), "client_busiest": busiest,
            "errors": sorted({r["error"] for r in rows if "error" in r})[:5]}


CLIENT_SATURATED = 0.8
"""A client process busier than this share of a core may be what limits a level's throughput."""


def sweep(url: str, headers: dict, opts: dict, server: Any = None) -> list[dict]:
    """Every concurrency level of `opts`, each with max(requests, waves x concurrency) requests, printed as
    it finishes. With `server` (a psutil.Process) each level also records that process's CPU time."""
    prompts = prompts_for(opts["prompt_len"])
    procs = client_processes(opts.get("clients", "auto"))
    pool = None if procs == 1 else ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn"))
    try:
        if pool is not None:
            _start_clients(pool, procs)
        return _levels(url, headers, opts, server, prompts, pool, procs)
    finally:
        if pool is not None:
            pool.shutdown()


def _started(_: int) -> int:
    time.sleep(0.2)  # holds its process while the others are asked for: each task gets a process of its own
    return os.getpid()


def _start_clients(pool: ProcessPoolExecutor, procs: int) -> None:
    """Start every client process (and its imports) before the first level: the pool spawns its processes
    on demand, and one still starting would join a level seconds late and stretch its wall time."""
    for _ in range(5):
        if len(set(pool.map(_started, range(procs)))) == procs:
            return
    raise SystemExit(f"could not start {procs} load generator processes")


def client_processes(value: Any) -> int:
    """`clients=auto`: a quarter of the cores (1 to 8), the rest left to the server; else the number given."""
    if str(value) == "auto":
        return max(1, min(8, (os.cpu_count() or 1) // 4))
    if not str(value).isdigit() or int(value) < 1:
        raise SystemExit(f"clients={value!r} is invalid: must be auto or an integer >= 1 (load generator processes)")
    return int(value)


def _levels(url: str, headers: dict, opts: dict, server: Any, prompts: list[str], pool: Any,
            clients: int) -> list[dict]:
    levels = []
    for c in (int(x) for x in opts["concurrency"]):
        before = server.cpu_times() if server is not None else None
        level = run_level(url, headers, c, max(opts["requests"], opts["waves"] * c), prompts, opts, pool, clients)
        cpu_note = ""
        if server is not None:
            after = server.cpu_times()
            level["server_cpu_s"] = (after.user - before.user) + (after.system - before.system)
            level["server_cpu_us_per_token"] = cpu_per_token(level["server_cpu_s"], level["tokens"])
            cpu_note = f"server CPU {fmt_us(level['server_cpu_us_per_token'])} us/token, "
        levels.append(level)
        print(f"concurrency {c:>4}: {level['tokens_per_s']:8.1f} tok/s, {cpu_note}TTFT p50 "
              f"{(level['ttft_s']['p50'] or 0) * 1e3:7.1f} ms, TPOT p50 {(level['tpot_s']['p50'] or 0) * 1e3:6.2f} ms, "
              f"{level['failed']} failed", file=sys.stderr)
        for message in level["errors"]:
            print(f"    error: {message}", file=sys.stderr)
        if level["client_busiest"] > CLIENT_SATURATED:
            print(f"    the load generator may limit this level: its busiest process used "
                  f"{level['client_busiest']:.0%} of a core (clients={level['client_processes']}; raise clients=)",
                  file=sys.stderr)
    return levels
