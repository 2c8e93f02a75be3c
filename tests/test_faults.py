"""Upstream faults, injected by raw asyncio servers that misbehave on purpose.

Each fault gives the client a clear status (or a stream that ends), leaves a log line, and the
same gateway goes on serving a healthy upstream right after.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient
from structlog.testing import capture_logs
from yarl import URL

from gateway.app import build_gateway_app
from gateway.headers import MCP_PROXY_URL
from tests.conftest import Upstream, gateway_settings

Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
Misbehaving = Callable[[Behaviour], Awaitable[URL]]


@pytest.fixture
async def misbehaving() -> AsyncIterator[Misbehaving]:
    """Start a raw TCP upstream on 127.0.0.1 that reads one request head and then does `behaviour`."""
    servers: list[asyncio.Server] = []

    async def start(behaviour: Behaviour) -> URL:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.readuntil(b"\r\n\r\n")
                await behaviour(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        servers.append(server)
        return URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def access(logs: list[dict[str, Any]]) -> list[tuple[int, str, str | None]]:
    """What the access log says of each request: status, outcome, upstream error kind."""
    return [(e["status"], e["outcome"], e.get("upstream_error")) for e in logs if e["event"] == "request"]


async def _still_serving(gateway: TestClient[web.Request, web.Application], upstream: Upstream) -> None:
    response = await gateway.get("/mcp", headers={MCP_PROXY_URL: str(upstream.url)})
    assert (response.status, await response.json()) == (200, {"ok": True})


async def test_connection_refused_gives_502(upstream: Upstream, aiohttp_client: AiohttpClient) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    gateway = await aiohttp_client(build_gateway_app(gateway_settings(connect_retry_budget_s=0)))

    with capture_logs() as logs:
        response = await gateway.get("/mcp", headers={MCP_PROXY_URL: f"http://127.0.0.1:{port}"})

    assert (response.status, await response.json()) == (502, {
        "error": f"cannot connect to upstream 127.0.0.1:{port}: connection refused", "code": "upstream_unreachable"})
    assert access(logs) == [(502, "upstream_error", "connect_refused")]
    await _still_serving(gateway, upstream)


async def test_reset_before_the_response_gives_502_and_is_not_retried(
    misbehaving: Misbehaving, upstream: Upstream, aiohttp_client: AiohttpClient
) -> None:
    connections = 0

    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        _reset(writer)

    url = await misbehaving(reset)
    gateway = await aiohttp_client(build_gateway_app(gateway_settings(connect_retry_budget_s=2)))

    response = await gateway.post("/mcp", data=b"{}", headers={MCP_PROXY_URL: str(url)})

    where = f"upstream 127.0.0.1:{url.port} failed"
    assert (response.status, await response.json()) in [  # the RST may land before or after the request is sent
        (502, {"error": f"{where}: [Errno 104] Connection reset by peer", "code": "upstream_unreachable"}),
        (502, {"error": f"{where}: upstream closed the connection before responding", "code": "upstream_unreachable"}),
    ]
    assert connections == 1  # a request byte reached the upstream: never retried
    await _still_serving(gateway, upstream)


async def test_slow_headers_give_504(
    misbehaving: Misbehaving, upstream: Upstream, aiohttp_client: AiohttpClient
) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    url = await misbehaving(silent)
    gateway = await aiohttp_client(build_gateway_app(gateway_settings(idle_timeout_s=0.5)))

    with capture_logs() as logs:
        response = await gateway.get("/mcp", headers={MCP_PROXY_URL: str(url)})

    assert (response.status, await response.json()) == (504, {
        "error": f"upstream 127.0.0.1:{url.port} did not answer in time", "code": "upstream_timeout"})
    assert access(logs) == [(504, "upstream_error", "timeout")]
    await _still_serving(gateway, upstream)


async def test_invalid_http_gives_502(
    misbehaving: Misbehaving, upstream: Upstream, aiohttp_client: AiohttpClient
) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\nnot http at all\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.5)

    url = await misbehaving(garbage)
    gateway = await aiohttp_client(build_gateway_app(gateway_settings()))

    response = await gateway.get("/mcp", headers={MCP_PROXY_URL: str(url)})

    assert (response.status, await response.json()) == (502, {
        "error": f"upstream 127.0.0.1:{url.port} sent an invalid HTTP response", "code": "upstream_bad_response"})
    await _still_serving(gateway, upstream)


async def test_reset_mid_body_aborts_the_client_connection(
    misbehaving: Misbehaving, upstream: Upstream, aiohttp_client: AiohttpClient
) -> None:
    async def half_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
        writer.write(b"x" * 100)
        await writer.drain()
        await asyncio.sleep(0.2)
        _reset(writer)

    url = await misbehaving(half_body)
    gateway = await aiohttp_client(build_gateway_app(gateway_settings()))

    with capture_logs() as logs:
        response = await gateway.get("/mcp", headers={MCP_PROXY_URL: str(url)})
        assert response.status == 200  # the status line was on the wire before the body broke
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()  # never a short body that looks complete

    assert access(logs) == [(200, "upstream_error", "reset_mid_stream")]
    await _still_serving(gateway, upstream)


async def test_a_body_that_stalls_past_the_idle_timeout_aborts_the_client_connection(
    misbehaving: Misbehaving, upstream: Upstream, aiohttp_client: AiohttpClient
) -> None:
    async def stalling(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"a\":")
        await writer.drain()
        await asyncio.sleep(5)

    url = await misbehaving(stalling)
    gateway = await aiohttp_client(build_gateway_app(gateway_settings(idle_timeout_s=0.5)))

    with capture_logs() as logs:
        response = await gateway.get("/mcp", headers={MCP_PROXY_URL: str(url)})
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            async with asyncio.timeout(5):
                await response.read()

    assert access(logs) == [(200, "upstream_error", "idle_timeout")]
    await _still_serving(gateway, upstream)


async def test_truncated_chunked_body_aborts_the_client_connection(
    misbehaving: Misbehaving, upstream: Upstream, aiohttp_client: AiohttpClient
) -> None:
    async def truncated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"5\r\nhello\r\n10\r\nonly six")  # a 16-byte chunk cut short, no last chunk
        await writer.drain()
        await asyncio.sleep(0.2)

    url = await misbehaving(truncated)
    gateway = await aiohttp_client(build_gateway_app(gateway_settings()))

    with capture_logs() as logs:
        response = await gateway.get("/mcp", headers={MCP_PROXY_URL: str(url)})
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()

    assert access(logs) == [(200, "upstream_error", "reset_mid_stream")]
    await _still_serving(gateway, upstream)


@pytest.mark.parametrize("ending", ["reset", "truncated_chunk"])
async def test_an_sse_upstream_that_breaks_ends_the_client_stream_cleanly(
    ending: str, misbehaving: Misbehaving, upstream: Upstream, aiohttp_client: AiohttpClient
) -> None:
    async def breaking_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"d\r\ndata: first\n\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)
        if ending == "reset":
            _reset(writer)
        else:
            writer.write(b"20\r\ndata: cut")
            await writer.drain()

    url = await misbehaving(breaking_stream)
    gateway = await aiohttp_client(build_gateway_app(gateway_settings()))

    with capture_logs() as logs:
        response = await gateway.get("/sse", headers={MCP_PROXY_URL: str(url)})
        async with asyncio.timeout(5):
            body = await response.read()  # ends with the terminating chunk, no ClientPayloadError

    assert (response.status, body[:13]) == (200, b"data: first\n\n")
    assert access(logs) == [(200, "upstream_error", "reset_mid_stream")]
    await _still_serving(gateway, upstream)
