"""The engine-to-worker command channel: never blocks the engine, keeps order, survives a dead reader."""

from __future__ import annotations

import multiprocessing as mp
import queue
import time

import pytest

from eet_pipe.runtime.channel import CommandChannel, CommandReader


def _read_slowly(reader: CommandReader, out, count: int) -> None:
    time.sleep(0.5)  # the engine has written far more than the pipe holds by now
    got = [reader.get() for _ in range(count)]
    out.put([len(g) for g in got])
    out.put([g[0] for g in got])


def test_puts_never_block_and_arrive_in_order_past_the_pipe_capacity():
    ctx = mp.get_context("spawn")
    channel, out = CommandChannel(ctx), ctx.Queue()
    sizes = [100_000 + 7 * i for i in range(40)]  # ~4 MB: many times a pipe's buffer
    proc = ctx.Process(target=_read_slowly, args=(channel.reader, out, len(sizes)), daemon=True)
    proc.start()
    channel.started()
    began = time.monotonic()
    for i, size in enumerate(sizes):
        channel.put(bytes([i]) * size)
    assert time.monotonic() - began < 0.4, "put blocked on a full pipe"
    assert out.get(timeout=30) == sizes
    assert out.get(timeout=30) == list(range(len(sizes)))
    proc.join(10)
    channel.close()


def test_a_dead_reader_makes_put_a_no_op():
    ctx = mp.get_context("spawn")
    channel = CommandChannel(ctx)
    proc = ctx.Process(target=time.sleep, args=(0,), daemon=True)
    proc.start()
    proc.join(10)
    channel.started()  # the only reading end is gone with the closed copy
    for _ in range(100):
        channel.put(b"x" * 100_000)
    assert channel.broken
    channel.close()


def test_reader_timeouts_raise_empty():
    ctx = mp.get_context("spawn")
    channel = CommandChannel(ctx)
    with pytest.raises(queue.Empty):
        channel.reader.get_nowait()
    began = time.monotonic()
    with pytest.raises(queue.Empty):
        channel.reader.get(timeout=0.2)
    assert time.monotonic() - began >= 0.19
    channel.put(b"abc")
    assert channel.reader.get(timeout=1.0) == b"abc"
    channel.close()
