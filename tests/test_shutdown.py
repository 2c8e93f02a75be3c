"""Graceful shutdown of the real program: SIGTERM/SIGINT drain in-flight work and exit 0."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer
from yarl import URL

from gateway.headers import MCP_PROXY_URL

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Gateway:
    process: asyncio.subprocess.Process
    url: URL
    admin: URL
    log: Path


async def _start_gateway(tmp_path: Path, *extra: str) -> Gateway:
    port, admin_port = _free_port(), _free_port()
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "--host", "127.0.0.1", "--port", str(port),
            "--admin-port", str(admin_port), *extra, cwd=ROOT, stdout=out, stderr=asyncio.subprocess.STDOUT)
    gateway = Gateway(process, URL(f"http://127.0.0.1:{port}"), URL(f"http://127.0.0.1:{admin_port}"), log)
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            try:
                async with session.get(gateway.admin / "readyz") as ready:
                    if ready.status == 200:
                        return gateway
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)
    process.kill()
    await process.wait()
    raise AssertionError(f"gateway did not become ready: {log.read_text()}")


@pytest.fixture
async def gateway_process(tmp_path: Path) -> AsyncIterator[list[Gateway]]:
    started: list[Gateway] = []
    yield started
    for gateway in started:
        if gateway.process.returncode is None:
            gateway.process.kill()
            await gateway.process.wait()


@pytest.fixture
async def slow_upstream(aiohttp_server: AiohttpServer) -> AsyncIterator[URL]:
    """/slow answers after 1 s; /sse sends one event and then stays open until the test ends."""
    done = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(1.0)
        return web.Response(text="finished")

    async def sse(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: open\n\n")
        await done.wait()
        return response

    app = web.Application()
    app.router.add_get("/slow", slow)
    app.router.add_get("/sse", sse)
    server = await aiohttp_server(app)
    yield server.make_url("")
    done.set()


async def test_sigterm_drains_requests_closes_streams_and_exits_0(
    tmp_path: Path, gateway_process: list[Gateway], slow_upstream: URL
) -> None:
    gateway = await _start_gateway(tmp_path, "--drain-timeout", "3")
    gateway_process.append(gateway)
    routed = {MCP_PROXY_URL: str(slow_upstream)}
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as session:
        stream = await session.get(gateway.url / "sse", headers=routed)
        assert await stream.content.readuntil(b"\n\n") == b"data: open\n\n"
        in_flight = asyncio.ensure_future(session.get(gateway.url / "slow", headers=routed))
        await asyncio.sleep(0.3)

        gateway.process.send_signal(signal.SIGTERM)
        signalled_at = loop.time()
        await asyncio.sleep(0.2)
        async with session.get(gateway.admin / "readyz") as readyz:
            assert (readyz.status, await readyz.json()) == (503, {"status": "not ready"})

        slow = await in_flight
        assert (slow.status, await slow.text()) == (200, "finished")
        async with asyncio.timeout(10):
            rest = await stream.content.read()  # ends cleanly: a ClientPayloadError would fail the test
        closed_after = loop.time() - signalled_at
        assert rest == b""
        stream.close()

        async with asyncio.timeout(10):
            assert await gateway.process.wait() == 0
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(gateway.url / "health")
    assert 2.5 <= closed_after <= 8, closed_after  # the stream was held until the 3 s deadline
    assert b"gateway_drained" in gateway.log.read_bytes()


async def test_sigint_with_nothing_in_flight_exits_0_at_once(tmp_path: Path, gateway_process: list[Gateway]) -> None:
    gateway = await _start_gateway(tmp_path, "--drain-timeout", "30")
    gateway_process.append(gateway)
    loop = asyncio.get_running_loop()
    started = loop.time()

    gateway.process.send_signal(signal.SIGINT)

    async with asyncio.timeout(10):
        assert await gateway.process.wait() == 0
    assert loop.time() - started < 5
