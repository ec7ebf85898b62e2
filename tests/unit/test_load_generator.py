"""serve_load's client against a server that answers badly: each such request fails, the level goes on."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

web = pytest.importorskip("aiohttp.web")

from benchmarks.load_generator import run_level  # noqa: E402


def _serve(app) -> tuple[str, callable]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        started.set()
        loop.run_forever()

    threading.Thread(target=run, daemon=True).start()
    assert started.wait(10)

    def stop() -> None:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)

    return f"http://127.0.0.1:{port}", stop


@pytest.mark.timeout(60)
def test_a_malformed_or_short_stream_fails_its_requests_not_the_level():
    async def health(_):
        return web.Response(text="ok")

    async def completions(request):
        body = await request.json()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if body["prompt"] == "bad json":
            await resp.write(b"data: {not json\n\n")
        else:  # two tokens streamed, but the usage says three
            for ids in ([1], [2]):
                await resp.write(b'data: {"choices": [{"token_ids": %s}]}\n\n' % str(ids).encode())
            await resp.write(b'data: {"choices": [], "usage": {"completion_tokens": 3}}\n\ndata: [DONE]\n\n')
        return resp

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/v1/completions", completions)
    url, stop = _serve(app)
    try:
        level = run_level(url, {}, 2, 4, ["bad json", "short"], {"max_tokens": 3, "temperature": 0.0})
    finally:
        stop()
    assert level["failed"] == 4 and level["tokens"] == 0
    assert any(e.startswith("JSONDecodeError") for e in level["errors"]), level["errors"]
    assert "2 tokens streamed but usage says 3" in level["errors"], level["errors"]
