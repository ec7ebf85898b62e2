"""A one-way command channel from the engine to one worker process: framed bytes on an OS pipe.

`multiprocessing.Queue` hands every `put` to a feeder thread (a lock, a condition variable and a thread
switch per message), which on a server's step loop costs more host time than building the command.
Here the writer writes the frame itself, without blocking: while the pipe has room (the common case:
a worker reads each command as soon as it is free), a `put` is one `write` system call. What the pipe
cannot take at once goes, in order, to a backlog that a sender thread writes out, so a slow worker
never blocks the engine (it may be waiting for a stage whose command comes next) and commands never
pass one another.

Frames are those of `multiprocessing.connection.Connection.send_bytes` (a 4-byte big-endian length,
or -1 and an 8-byte length for frames of 2 GiB and more), so the worker reads with `recv_bytes`.
Payloads are bytes (`eet_pipe.runtime.wire.dumps`); a worker that exited makes `put` a no-op (the
supervisor reports its death).
"""

from __future__ import annotations

import errno
import os
import queue
import select
import struct
import threading
from collections import deque
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["CommandChannel", "CommandReader"]


def _frame(payload: bytes) -> bytes:
    if len(payload) > 0x7FFFFFFF:
        return struct.pack("!i", -1) + struct.pack("!Q", len(payload)) + payload
    return struct.pack("!i", len(payload)) + payload


class CommandReader:
    """The worker's end (picklable into a spawned process): `get`, `get(timeout=)`, `get_nowait`."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def get(self, block: bool = True, timeout: float | None = None) -> bytes:
        if (not block or timeout is not None) and not self.conn.poll(0.0 if not block else timeout):
            raise queue.Empty
        return self.conn.recv_bytes()

    def get_nowait(self) -> bytes:
        return self.get(block=False)


class CommandChannel:
    """The engine's end; see the module docstring. `reader` goes to the worker's process arguments;
    call `started()` once that process runs, so the engine keeps no reading end open."""

    def __init__(self, ctx: Any) -> None:
        read, self._conn = ctx.Pipe(duplex=False)
        self.reader = CommandReader(read)
        self._fd = self._conn.fileno()
        os.set_blocking(self._fd, False)
        self._backlog: deque[memoryview] = deque()
        self._lock = threading.Lock()
        self._more = threading.Condition(self._lock)
        self._sender: threading.Thread | None = None
        self.broken = False
        """The worker's end is closed (it exited): commands are dropped."""
        self.closed = False

    def started(self) -> None:
        """The worker has its reading end: close the engine's copy (a dead worker then breaks the pipe)."""
        self.reader.conn.close()

    def put(self, payload: bytes) -> None:
        frame = memoryview(_frame(payload))
        with self._lock:
            if self.broken or self.closed:
                return
            if not self._backlog:
                frame = self._write(frame)
                if frame is None:
                    return
            self._backlog.append(frame)
            if self._sender is None:
                self._sender = threading.Thread(target=self._send_backlog, name="eet_pipe-commands", daemon=True)
                self._sender.start()
            self._more.notify()

    def _write(self, frame: memoryview) -> memoryview | None:
        """Write what the pipe takes now (lock held); the rest of the frame, or None when all of it went or
        the worker is gone (then `broken` is set)."""
        while frame:
            try:
                frame = frame[os.write(self._fd, frame):]
            except BlockingIOError:
                return frame
            except OSError as err:  # EPIPE: the worker exited
                if err.errno not in (errno.EPIPE, errno.EBADF):
                    raise
                self.broken = True
                return None
        return None

    def _send_backlog(self) -> None:
        room = select.poll()  # not select.select: the descriptor may be above FD_SETSIZE
        room.register(self._fd, select.POLLOUT)
        while True:
            with self._lock:
                while not self._backlog and not self.closed and not self.broken:
                    self._more.wait()
                if self.closed or self.broken:
                    return
                rest = self._write(self._backlog[0])
                if self.broken:
                    self._backlog.clear()
                    return
                if rest is None:
                    self._backlog.popleft()
                    continue
                self._backlog[0] = rest
            room.poll(1000)  # room in the pipe (or look at closed / broken again)

    def close(self) -> None:
        """Stop the sender and close the engine's end (unsent commands are dropped)."""
        with self._lock:
            self.closed = True
            self._backlog.clear()
            self._more.notify_all()
        if self._sender is not None:
            self._sender.join(2.0)
        self._conn.close()
        if not self.reader.conn.closed:
            self.reader.conn.close()
