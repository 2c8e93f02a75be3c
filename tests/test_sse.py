"""Server-Sent Events through the gateway: event by event, on any method, ending with either side."""

from __future__ import annotations

import asyncio
import gc
import time

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.app import DATA_PLANE
from gateway.headers import MCP_PROXY_URL
from gateway.http1 import UpstreamConnection
from gateway.server import ClientConnection
from tests.conftest import serve_gateway

INTERVAL_S = 0.2


def event(n: int) -> bytes:
    return f"id: {n}\nevent: message\ndata: {{\"jsonrpc\": \"2.0\", \"method\": \"notify\", \"n\": {n}}}\n\n".encode()


async def paced_upstream(aiohttp_server: AiohttpServer, sent_at: list[float], count: int = 5) -> TestServer:
    async def stream(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        for n in range(count):
            if n:
                await asyncio.sleep(INTERVAL_S)
            sent_at.append(time.monotonic())
            await response.write(event(n))
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", stream)
    return await aiohttp_server(app)


@pytest.mark.parametrize(("method", "path"), [("GET", "/sse"), ("POST", "/mcp"), ("GET", "/mcp")])
async def test_each_event_arrives_before_the_next_is_sent(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer, method: str, path: str
) -> None:
    sent_at: list[float] = []
    server = await paced_upstream(aiohttp_server, sent_at)
    gateway = await serve_gateway(aiohttp_client)
    arrived: list[tuple[float, bytes]] = []

    async with asyncio.timeout(10):
        resp = await gateway.request(method, path, data=b'{"jsonrpc": "2.0"}' if method == "POST" else None,
                                     headers={MCP_PROXY_URL: str(server.make_url(""))})
        buffer = b""
        async for chunk in resp.content.iter_any():
            buffer += chunk
            while b"\n\n" in buffer:
                one, buffer = buffer.split(b"\n\n", 1)
                arrived.append((time.monotonic(), one + b"\n\n"))

    assert resp.headers["Content-Type"] == "text/event-stream"
    assert [body for _, body in arrived] == [event(n) for n in range(5)]
    delays_ms = [round((at - sent) * 1000) for (at, _), sent in zip(arrived, sent_at, strict=True)]
    # The next event is sent 200 ms later; arriving within half of that is "well before".
    assert max(delays_ms) < INTERVAL_S * 1000 / 2, delays_ms


async def silent_upstream(
    aiohttp_server: AiohttpServer, *, tick_s: float | None = None
) -> tuple[TestServer, asyncio.Event]:
    """Sends one event, then stays quiet (or ticks every tick_s); sets the event when its client leaves."""
    gone = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(event(0))
        try:
            while True:
                await asyncio.sleep(tick_s or 30)
                await response.write(b": tick\n\n")
        except (asyncio.CancelledError, ConnectionResetError):
            gone.set()
            raise
        return response

    app = web.Application()
    app.router.add_get("/sse", stream)
    return await aiohttp_server(app), gone


async def test_client_leaving_a_silent_stream_closes_the_upstream_promptly(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer
) -> None:
    server, upstream_gone = await silent_upstream(aiohttp_server)
    gateway = await serve_gateway(aiohttp_client)

    resp = await gateway.get("/sse", headers={MCP_PROXY_URL: str(server.make_url(""))})
    assert await resp.content.readuntil(b"\n\n") == event(0)
    resp.close()  # drops the connection

    async with asyncio.timeout(3):
        await upstream_gone.wait()


async def test_upstream_ending_mid_stream_ends_the_client_stream_cleanly(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer
) -> None:
    sent_at: list[float] = []
    server = await paced_upstream(aiohttp_server, sent_at, count=2)
    gateway = await serve_gateway(aiohttp_client)

    async with asyncio.timeout(5):
        resp = await gateway.get("/sse", headers={MCP_PROXY_URL: str(server.make_url(""))})
        body = await resp.read()

    assert body == event(0) + event(1)


async def test_upstream_reset_mid_stream_ends_the_client_stream_after_the_last_event(
    aiohttp_client: AiohttpClient,
) -> None:
    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        first = event(0)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + f"{len(first):x}\r\n".encode() + first + b"\r\n")
        await writer.drain()
        writer.transport.abort()  # no terminating chunk: a broken stream

    raw_server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = raw_server.sockets[0].getsockname()[1]
    gateway = await serve_gateway(aiohttp_client)
    async with raw_server, asyncio.timeout(5):
        resp = await gateway.get("/sse", headers={MCP_PROXY_URL: f"http://127.0.0.1:{port}"})
        body = await resp.read()

    assert (resp.status, body) == (200, event(0))


async def test_a_slow_reader_gets_every_byte_and_holds_the_upstream_back(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer
) -> None:
    total_events, written = 160_000, [0]  # 200 bytes each: 32 MB

    async def flood(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for n in range(total_events):
            await response.write(f"data: {n:0190d}\n\n".encode())
            written[0] += 1
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/sse", flood)
    server = await aiohttp_server(app)
    gateway = await serve_gateway(aiohttp_client)

    async with asyncio.timeout(30):
        resp = await gateway.get("/sse", headers={MCP_PROXY_URL: str(server.make_url(""))})
        received = bytearray(await resp.content.readexactly(1_000_000))
        await asyncio.sleep(0.5)  # the reader stalls: the gateway must stop reading the upstream
        ahead = written[0] * 200 - len(received)
        received += await resp.read()

    expected = b"".join(f"data: {n:0190d}\n\n".encode() for n in range(total_events))
    assert len(received) == len(expected) and received == expected
    # Socket buffers (loopback's autotune to several MB) and the gateway's 256 KiB hold part of the
    # 31 MB left, not all of it: without back-pressure the upstream finishes during the stall.
    assert ahead < 31_000_000, f"the upstream ran {ahead} bytes ahead of a stalled reader"


async def test_streams_their_clients_drop_are_freed_without_the_garbage_collector(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer
) -> None:
    # The CLI runs the collector seldom (cli.settle_garbage_collector): anything a dropped stream
    # leaves in a reference cycle stays in memory until a full collection, as good as leaked.
    server, _ = await silent_upstream(aiohttp_server)
    gateway = await serve_gateway(aiohttp_client)
    data_plane = gateway.server.app[DATA_PLANE]
    gc.collect()
    gc.disable()
    try:
        for _ in range(20):
            resp = await gateway.get("/sse", headers={MCP_PROXY_URL: str(server.make_url(""))})
            assert await resp.content.readuntil(b"\n\n") == event(0)
            resp.close()
        for _ in range(500):  # bounded: 5 s
            if not data_plane.connections:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # the cancelled relays finish
        alive = [o for o in gc.get_objects() if isinstance(o, ClientConnection | UpstreamConnection)]
    finally:
        gc.enable()

    assert alive == []
