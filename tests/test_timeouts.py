"""Timeouts by class, SSE keepalive and connect retries, over real sockets."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpClient, AiohttpServer
from yarl import URL

from gateway.app import build_gateway_app
from gateway.headers import MCP_PROXY_URL
from tests.conftest import gateway_settings


@pytest.fixture
def unanswered_port() -> Iterator[int]:
    """A port whose listen backlog is full: a new connection attempt hangs (SYNs are dropped)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    yield port
    for filler in fillers:
        filler.close()
    listener.close()


async def test_connect_timeout_gives_504(unanswered_port: int, aiohttp_client: AiohttpClient) -> None:
    gateway = await aiohttp_client(build_gateway_app(gateway_settings(connect_timeout_s=0.3)))

    response = await gateway.get("/mcp", headers={MCP_PROXY_URL: f"http://127.0.0.1:{unanswered_port}"})

    assert (response.status, await response.json()) == (504, {
        "error": f"upstream 127.0.0.1:{unanswered_port} did not answer in time", "code": "upstream_timeout"})


@pytest.fixture
async def quiet_sse(aiohttp_server: AiohttpServer) -> AsyncIterator[URL]:
    """/event: one whole event, then silence. /split: half an event, a pause, its end, then silence."""
    done = asyncio.Event()

    async def event(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: hello\n\n")
        await done.wait()
        return response

    async def split(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: a\n")
        await asyncio.sleep(0.8)
        await response.write(b"\n")
        await done.wait()
        return response

    async def silent(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await done.wait()
        return response

    app = web.Application()
    app.router.add_get("/silent", silent)
    app.router.add_get("/event", event)
    app.router.add_get("/split", split)
    server = await aiohttp_server(app)
    yield server.make_url("")
    done.set()


async def test_sse_keepalive_is_written_while_the_upstream_is_quiet(
    quiet_sse: URL, aiohttp_client: AiohttpClient
) -> None:
    gateway = await aiohttp_client(build_gateway_app(gateway_settings(sse_keepalive_s=0.2)))
    response = await gateway.get("/event", headers={MCP_PROXY_URL: str(quiet_sse)})

    async with asyncio.timeout(5):
        received = [await response.content.readuntil(b"\n\n") for _ in range(3)]

    assert received == [b"data: hello\n\n", b": keepalive\n\n", b": keepalive\n\n"]
    response.close()


async def test_sse_keepalive_starts_before_the_first_event(quiet_sse: URL, aiohttp_client: AiohttpClient) -> None:
    # A GET /mcp stream may carry no event for minutes: exactly what idle load balancers cut.
    gateway = await aiohttp_client(build_gateway_app(gateway_settings(sse_keepalive_s=0.2)))
    response = await gateway.get("/silent", headers={MCP_PROXY_URL: str(quiet_sse)})

    async with asyncio.timeout(5):
        received = await response.content.readuntil(b"\n\n")

    assert received == b": keepalive\n\n"
    response.close()


async def test_sse_keepalive_never_lands_inside_an_event(quiet_sse: URL, aiohttp_client: AiohttpClient) -> None:
    gateway = await aiohttp_client(build_gateway_app(gateway_settings(sse_keepalive_s=0.2)))
    response = await gateway.get("/split", headers={MCP_PROXY_URL: str(quiet_sse)})

    async with asyncio.timeout(5):
        received = [await response.content.readuntil(b"\n\n") for _ in range(2)]

    # The upstream paused 0.8 s (four keepalive periods) in the middle of its event.
    assert received == [b"data: a\n\n", b": keepalive\n\n"]
    response.close()


async def test_without_keepalive_a_quiet_stream_stays_silent(quiet_sse: URL, aiohttp_client: AiohttpClient) -> None:
    gateway = await aiohttp_client(build_gateway_app(gateway_settings()))
    response = await gateway.get("/event", headers={MCP_PROXY_URL: str(quiet_sse)})

    assert await response.content.readuntil(b"\n\n") == b"data: hello\n\n"
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await response.content.readany()
    response.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_a_refused_connection_is_retried_until_the_port_is_bound(aiohttp_client: AiohttpClient) -> None:
    port = _free_port()
    async def late(request: web.Request) -> web.Response:
        return web.Response(text="late but there")

    app = web.Application()
    app.router.add_get("/mcp", late)
    runner = web.AppRunner(app)
    await runner.setup()

    async def bind_later() -> None:
        await asyncio.sleep(0.4)
        await web.TCPSite(runner, "127.0.0.1", port).start()

    gateway = await aiohttp_client(build_gateway_app(gateway_settings(connect_retry_budget_s=5.0)))
    binder = asyncio.ensure_future(bind_later())
    try:
        response = await gateway.get("/mcp", headers={MCP_PROXY_URL: f"http://127.0.0.1:{port}"})
        assert (response.status, await response.text()) == (200, "late but there")
    finally:
        await binder
        await runner.cleanup()


async def test_a_refused_connection_gives_502_once_the_budget_is_spent(aiohttp_client: AiohttpClient) -> None:
    port = _free_port()
    gateway = await aiohttp_client(build_gateway_app(gateway_settings(connect_retry_budget_s=0.3)))
    loop = asyncio.get_running_loop()
    started = loop.time()

    response = await gateway.get("/mcp", headers={MCP_PROXY_URL: f"http://127.0.0.1:{port}"})

    assert (response.status, await response.json()) == (502, {
        "error": f"cannot connect to upstream 127.0.0.1:{port}: connection refused",
        "code": "upstream_unreachable"})
    assert loop.time() - started >= 0.3  # it did retry for the whole budget
