"""The HTTP processes' protocol: the header deadline under each parser, and the parser option's checks."""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import threading
import time

import pytest

uvicorn = pytest.importorskip("uvicorn")

from eet_pipe.serving.protocol import protocol_with_header_timeout  # noqa: E402
from eet_pipe.serving.serve_options import ServeOptions  # noqa: E402

HAVE_HTTPTOOLS = importlib.util.find_spec("httptools") is not None
PARSERS = ["h11", pytest.param("httptools", marks=pytest.mark.skipif(not HAVE_HTTPTOOLS, reason="no httptools"))]


async def _app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    reply = f"{scope['method']} {scope['path']} {len(body)}".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(reply)).encode())]})
    await send({"type": "http.response.body", "body": reply})


@pytest.fixture(params=PARSERS)
def server(request):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    protocol = protocol_with_header_timeout(0.5, request.param)
    config = uvicorn.Config(_app, host="127.0.0.1", port=port, http=protocol, log_level="warning", lifespan="off")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(srv.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the test server did not start"
        time.sleep(0.01)
    yield port, protocol
    srv.should_exit = True
    thread.join(10)


def _read_reply(sock: socket.socket) -> bytes:
    """One response: status line and headers, then content-length bytes of body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"connection closed mid-response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        chunk = sock.recv(4096)
        assert chunk, "connection closed mid-body"
        body += chunk
    return head + b"\r\n\r\n" + body


def test_parser_is_the_one_asked_for(server):
    _, protocol = server
    name = protocol.__mro__[2].__name__
    assert name in ("H11Protocol", "HttpToolsProtocol")
    assert protocol_with_header_timeout(1.0, "h11").__mro__[2].__name__ == "H11Protocol"
    auto = protocol_with_header_timeout(1.0, "auto").__mro__[2].__name__
    assert auto == ("HttpToolsProtocol" if HAVE_HTTPTOOLS else "H11Protocol")


def test_unfinished_headers_are_cut_and_requests_on_the_same_connection_are_served(server):
    port, _ = server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for path in ("/a", "/b"):  # keep-alive: the deadline is re-armed for the second request, not fired
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc".encode())
            assert _read_reply(sock).endswith(f"POST {path} 3".encode())
            time.sleep(0.3)
        time.sleep(0.4)  # idle between requests longer than the header deadline: keep-alive's business, not cut
        sock.sendall(b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_reply(sock).endswith(b"GET /c 0")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        began = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # the headers never end
        assert sock.recv(4096) == b""  # closed by the server
        assert 0.4 < time.monotonic() - began < 5
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        began = time.monotonic()
        for byte in b"GET /slow HTTP/1.1\r\nHost: x\r\n":  # slowloris: a byte at a time does not extend it
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.05)
        assert sock.recv(4096) == b""
        assert time.monotonic() - began < 5


def test_parser_option_is_checked():
    assert ServeOptions(model="tiny", http_parser="h11").http_parser == "h11"
    with pytest.raises(ValueError, match=r"http_parser='fast' is invalid: must be auto, httptools or h11"):
        ServeOptions(model="tiny", http_parser="fast")
    with pytest.raises(ValueError, match="http_parser='fast' is invalid"):
        protocol_with_header_timeout(1.0, "fast")
