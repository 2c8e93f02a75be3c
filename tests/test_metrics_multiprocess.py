"""Two real gateway processes sharing --metrics-multiproc-dir: either one's /metrics sums both."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer
from yarl import URL

from gateway.headers import MCP_PROXY_URL
from tests.test_observability import request_labels, samples

ARCA_KEY = "arca-key-5ecret-multiproc"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class GatewayProcess:
    """`python -m gateway` on loopback ports, its stdout collected in a file."""

    def __init__(self, multiproc_dir: Path, log_path: Path) -> None:
        self.port, self.admin_port = free_port(), free_port()
        self.log_path = log_path
        env = {**os.environ, "ARCA_API_KEY": ARCA_KEY}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the flag alone must switch multiprocess mode on
        with log_path.open("wb") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gateway", "--host", "127.0.0.1", "--port", str(self.port),
                 "--admin-port", str(self.admin_port), "--metrics-multiproc-dir", str(multiproc_dir),
                 "--log-format", "json"],
                stdout=log_file, stderr=subprocess.STDOUT, env=env,
            )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def admin_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.admin_port}{path}"

    async def wait_ready(self, session: aiohttp.ClientSession) -> None:
        async with asyncio.timeout(30):
            while True:
                assert self.process.poll() is None, self.log_path.read_text()
                try:
                    async with session.get(self.admin_url("/readyz")) as ready:
                        if ready.status == 200:
                            return
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(20):
                while self.process.poll() is None:  # noqa: ASYNC110  (a child process has no event to await)
                    await asyncio.sleep(0.05)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def log_lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.startswith("{")]


@pytest.fixture
async def gateways(tmp_path: Path) -> AsyncIterator[Callable[[], GatewayProcess]]:
    multiproc_dir = tmp_path / "metrics"
    multiproc_dir.mkdir()
    started: list[GatewayProcess] = []

    def start() -> GatewayProcess:
        started.append(GatewayProcess(multiproc_dir, tmp_path / f"gateway-{len(started)}.log"))
        return started[-1]

    yield start
    for gateway in started:
        gateway.kill()


@pytest.fixture
async def upstream_url(aiohttp_server: AiohttpServer) -> AsyncIterator[tuple[URL, asyncio.Event]]:
    """JSON for POSTs; a GET gets an event stream that ends once released."""
    release = asyncio.Event()

    async def answer(request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            await request.read()
            return web.json_response({"ok": True})
        stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await stream.prepare(request)
        await stream.write(b"data: hello\n\n")
        await release.wait()
        await stream.write_eof()
        return stream

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    yield (await aiohttp_server(app)).make_url(""), release


@pytest.mark.timeout(90)
async def test_two_worker_processes_are_scraped_as_one(
    gateways: Callable[[], GatewayProcess], upstream_url: tuple[URL, asyncio.Event]
) -> None:
    upstream, release = upstream_url
    first, second = gateways(), gateways()
    routed = {MCP_PROXY_URL: str(upstream)}
    call = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call"}).encode()
    async with aiohttp.ClientSession() as session:
        await first.wait_ready(session)
        await second.wait_ready(session)

        for gateway, times in ((first, 3), (second, 2)):
            for _ in range(times):
                async with session.post(gateway.url("/mcp"), data=call, headers=routed) as answered:
                    assert answered.status == 200
        async with session.get(second.url("/mcp"), headers=routed) as stream:
            await asyncio.wait_for(stream.content.readuntil(b"\n\n"), 10)
            async with session.get(first.admin_url("/metrics")) as scrape:
                while_open = await scrape.text()
            release.set()
            await asyncio.wait_for(stream.read(), 10)
        await second.stop()
        async with session.get(first.admin_url("/metrics")) as scrape:
            after = await scrape.text()

    assert samples(while_open, "aenv_api_mcp_requests_total") == {
        request_labels("POST", "/mcp", "tools/call", 200): 5.0}
    assert samples(while_open, "aenv_gateway_active_streams") == {(): 1.0}  # open in the second process
    assert samples(after, "aenv_api_mcp_requests_total") == {
        request_labels("POST", "/mcp", "tools/call", 200): 5.0,
        request_labels("GET", "/mcp", "", 200): 1.0,  # the stopped process's counts stay
    }
    assert samples(after, "aenv_api_mcp_request_duration_ms_count") == {
        request_labels("POST", "/mcp", "tools/call", 200): 5.0}
    assert samples(after, "aenv_gateway_active_streams") == {(): 0.0}
    assert second.process.returncode == 0
    [settings_line] = [line for line in second.log_lines() if line["event"] == "effective_settings"]
    assert (settings_line["arca_api_key"], settings_line["metrics_multiproc_dir"]) == (
        "<redacted>", str(first.log_path.parent / "metrics"))
    assert [line["event"] for line in second.log_lines()].count("request") == 3
    assert ARCA_KEY not in first.log_path.read_text() + second.log_path.read_text() + after
