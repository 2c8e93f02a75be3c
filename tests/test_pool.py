"""The lean transport's connection budget (issue #12): one budget for all targets, LRU eviction, idle
expiry on a timer with or without traffic, upstreams that close idle connections themselves, and
running out of file descriptors, which is the gateway's condition (503), never the sandbox's (502)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from pytest_aiohttp import AiohttpClient
from yarl import URL

from gateway.app import build_gateway_app
from gateway.config import Settings
from gateway.errors import GatewayOverloaded
from gateway.headers import MCP_PROXY_URL
from gateway.http1 import Http1Client
from gateway.metrics import Metrics
from tests.conftest import gateway_settings
from tests.process import gateway_process
from tests.raw_servers import RawServers


@dataclass(slots=True)
class Target:
    """An upstream on its own port: answers each request with its port, counts connections."""

    url: URL
    opened: int = 0
    closed: int = 0
    requests: int = 0


@dataclass(slots=True)
class Fleet:
    targets: list[Target] = field(default_factory=list)

    @property
    def open(self) -> int:
        return sum(t.opened - t.closed for t in self.targets)


StartFleet = Callable[..., Awaitable[Fleet]]


@pytest.fixture
async def fleet() -> AsyncIterator[StartFleet]:
    servers = RawServers()

    async def start(count: int, delay_s: float = 0.0, close_idle_after_s: float | None = None,
                    keep_alive_header: str | None = None) -> Fleet:
        """count upstreams; each answer after delay_s; an idle connection closed after close_idle_after_s
        (as uvicorn does after 5 s); keep_alive_header sent as Keep-Alive."""
        started = Fleet()
        extra = f"Keep-Alive: {keep_alive_header}\r\n".encode() if keep_alive_header else b""
        for _ in range(count):
            target = Target(URL("http://127.0.0.1"))

            async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            target: Target = target) -> None:
                target.opened += 1
                try:
                    while True:
                        async with asyncio.timeout(close_idle_after_s):
                            head = await reader.readuntil(b"\r\n\r\n")
                        for line in head.split(b"\r\n"):
                            if line.lower().startswith(b"content-length:"):
                                await reader.readexactly(int(line.split(b":", 1)[1]))
                        target.requests += 1
                        if delay_s:
                            await asyncio.sleep(delay_s)
                        body = str(target.url.port).encode()
                        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%b\r\n%b" % (len(body), extra, body))
                        await writer.drain()
                finally:
                    target.closed += 1

            target.url = await servers.start(serve)
            started.targets.append(target)
        return started

    yield start
    await servers.close()


def client(**settings: float) -> Http1Client:
    return Http1Client(Settings(connect_timeout_s=2.0, connect_retry_budget_s=0.0, **settings))  # type: ignore[arg-type]


async def call(http1: Http1Client, target: Target, method: str = "GET") -> bytes:
    response = await http1.request(method, target.url.with_path("/mcp"), {}, b"{}" if method == "POST" else None)
    body = b""
    while chunk := await response.read_chunk():
        body += chunk
    response.release()
    return body


async def eventually(condition: Callable[[], bool], timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_the_budget_holds_across_targets_closing_the_least_recently_used(fleet: StartFleet) -> None:
    targets = (await fleet(5)).targets
    http1 = client(upstream_max_connections=3)
    try:
        for target in targets:
            assert await call(http1, target) == str(target.url.port).encode()
        await eventually(lambda: sum(t.opened - t.closed for t in targets) == 3)
        # The two least recently used went; the three most recent are kept and reused.
        assert [t.opened - t.closed for t in targets] == [0, 0, 1, 1, 1]
        await call(http1, targets[4])
        assert (http1.connections_opened, http1.stats().idle, http1.stats().closed["evicted"]) == (5, 3, 2)
    finally:
        await http1.close()


async def test_idle_connections_are_capped_least_recently_used_first(fleet: StartFleet) -> None:
    targets = (await fleet(4)).targets
    http1 = client(upstream_max_idle=2)
    try:
        for target in targets:
            await call(http1, target)
        assert http1.stats().idle == 2
        await eventually(lambda: [t.opened - t.closed for t in targets] == [0, 0, 1, 1])
    finally:
        await http1.close()


async def test_a_full_budget_of_busy_connections_is_the_gateways_503(fleet: StartFleet) -> None:
    targets = (await fleet(3, delay_s=0.5)).targets
    http1 = client(upstream_max_connections=2)
    try:
        busy = [asyncio.ensure_future(call(http1, target)) for target in targets[:2]]
        await eventually(lambda: http1.stats().busy == 2)
        started = time.perf_counter()
        with pytest.raises(GatewayOverloaded) as refused:
            await call(http1, targets[2])
        assert time.perf_counter() - started < 0.1  # refused at once, no connect attempted
        assert "--upstream-max-connections 2" in str(refused.value)
        assert targets[2].opened == 0
        await asyncio.gather(*busy)
        assert await call(http1, targets[2]) == str(targets[2].url.port).encode()  # room again: one evicted
    finally:
        await http1.close()


async def test_idle_connections_expire_without_any_traffic(fleet: StartFleet) -> None:
    targets = (await fleet(3)).targets
    http1 = client(upstream_idle_timeout_s=0.3)
    try:
        for target in targets:
            await call(http1, target)
        assert http1.stats().idle == 3
        await eventually(lambda: http1.stats().idle == 0, timeout_s=2.0)  # no request arrives meanwhile
        await eventually(lambda: all(t.closed == 1 for t in targets))
        assert http1.stats().closed["idle_timeout"] == 3
    finally:
        await http1.close()


async def test_a_connection_idle_past_the_timeout_is_never_reused(fleet: StartFleet) -> None:
    target = (await fleet(1)).targets[0]
    http1 = client(upstream_idle_timeout_s=10.0)
    try:
        await call(http1, target)
        http1._pool.idle_timeout_s = 0.05  # the timer's next tick is far off: the take itself checks
        for connection in list(http1._pool._lru):
            connection.idle_until = time.monotonic() + 0.05
        await asyncio.sleep(0.1)
        await call(http1, target)
        assert (http1.connections_opened, http1.stats().closed["idle_timeout"]) == (2, 1)
    finally:
        await http1.close()


@pytest.mark.parametrize(("announced", "reused"), [("timeout=1", False), ("timeout=3, max=100", True)])
async def test_the_upstreams_keep_alive_timeout_is_honoured(fleet: StartFleet, announced: str, reused: bool) -> None:
    target = (await fleet(1, keep_alive_header=announced)).targets[0]
    http1 = client()
    try:
        await call(http1, target)
        await asyncio.sleep(0.1)
        await call(http1, target)
        assert http1.connections_opened == (1 if reused else 2)  # never within a second of its own close
    finally:
        await http1.close()


async def test_an_upstream_that_closes_an_idle_connection_is_forgotten_at_once(fleet: StartFleet) -> None:
    target = (await fleet(1, close_idle_after_s=0.1)).targets[0]
    http1 = client(upstream_idle_timeout_s=10.0)
    try:
        await call(http1, target)
        await eventually(lambda: http1.stats().idle == 0)
        assert http1.stats().closed["upstream_closed"] == 1
        assert await call(http1, target, "POST") == str(target.url.port).encode()
    finally:
        await http1.close()


async def test_bursts_against_an_upstream_that_closes_idle_connections_never_fail(fleet: StartFleet) -> None:
    """The stale-connection race, scaled down: the upstream closes idle connections after 0.5 s (uvicorn:
    5 s), the gateway gives them up after 0.4 s (its default: 4 s), bursts come 0.4 to 0.6 s apart."""
    targets = (await fleet(2, close_idle_after_s=0.5)).targets
    http1 = client(upstream_idle_timeout_s=0.4)
    failures: list[BaseException] = []
    calls = 0
    try:
        for _ in range(10):
            results = await asyncio.gather(*(call(http1, targets[i % 2], "POST") for i in range(24)),
                                           return_exceptions=True)
            calls += len(results)
            failures += [r for r in results if isinstance(r, BaseException)]
            await asyncio.sleep(random.uniform(0.4, 0.6))
    finally:
        await http1.close()

    assert (calls, failures) == (240, [])


async def test_overload_is_a_503_with_retry_after_and_never_the_sandboxs_fault(
    fleet: StartFleet, aiohttp_client: AiohttpClient
) -> None:
    targets = (await fleet(2, delay_s=0.5)).targets
    metrics = Metrics.build(CollectorRegistry())
    app = build_gateway_app(gateway_settings(upstream_client="lean", upstream_max_connections=1), metrics=metrics)
    gateway = await aiohttp_client(app)
    slow = asyncio.ensure_future(gateway.post("/mcp", data=b"{}", headers={MCP_PROXY_URL: str(targets[0].url)}))
    await eventually(lambda: targets[0].requests == 1)

    refused = await gateway.post("/mcp", data=b"{}", headers={MCP_PROXY_URL: str(targets[1].url)})

    assert (refused.status, refused.headers["Retry-After"]) == (503, "1")
    assert (await refused.json())["code"] == "gateway_overloaded"
    assert (await slow).status == 200
    exposition = metrics.exposition().decode()
    assert 'aenv_gateway_refused_requests_total{reason="gateway_overloaded",status="503"} 1.0' in exposition
    assert "aenv_gateway_sandbox_errors_total{" not in exposition
    assert 'aenv_gateway_upstream_errors_total{kind="unreachable"} 0.0' in exposition
    assert "aenv_gateway_upstream_connection_budget 1.0" in exposition
    assert 'aenv_gateway_upstream_connections_opened_total 1.0' in exposition


async def test_pool_series_on_metrics(fleet: StartFleet, aiohttp_client: AiohttpClient) -> None:
    targets = (await fleet(3)).targets
    metrics = Metrics.build(CollectorRegistry())
    app = build_gateway_app(gateway_settings(upstream_client="lean", upstream_max_idle=2), metrics=metrics)
    gateway = await aiohttp_client(app)
    for target in targets:
        response = await gateway.get("/mcp", headers={MCP_PROXY_URL: str(target.url)})
        assert response.status == 200

    exposition = metrics.exposition().decode()

    for line in ('aenv_gateway_upstream_connections{state="idle"} 2.0',
                 'aenv_gateway_upstream_connections{state="busy"} 0.0',
                 "aenv_gateway_upstream_connections_opened_total 3.0",
                 'aenv_gateway_upstream_connections_closed_total{reason="evicted"} 1.0',
                 'aenv_gateway_upstream_connections_closed_total{reason="idle_timeout"} 0.0'):
        assert line in exposition
    fds = next(line for line in exposition.splitlines() if line.startswith("aenv_gateway_open_fds "))
    assert float(fds.split()[1]) > 3
    assert "aenv_gateway_fd_limit " in exposition


def _fleet_load(gateway_url: URL, targets: list[Target], requests: int, concurrency: int) -> Awaitable[list[int]]:
    async def run() -> list[int]:
        statuses: list[int] = []
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            async def one(index: int) -> None:
                target = targets[index % len(targets)]
                async with session.post(gateway_url / "mcp", data=b"{}",
                                        headers={MCP_PROXY_URL: str(target.url)}) as response:
                    await response.read()
                    statuses.append(response.status)
                    if response.status == 503:
                        assert response.headers["Retry-After"] == "1"
                        assert (json.loads(await response.read()))["code"] == "gateway_overloaded"

            queue = iter(range(requests))

            async def worker() -> None:
                for index in queue:
                    await one(index)

            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), 60)
        return statuses

    return run()


async def test_out_of_fds_idle_connections_are_shed_and_nothing_is_blamed_on_sandboxes(fleet: StartFleet) -> None:
    """RLIMIT_NOFILE 160, a budget above it: 300 targets at 24 connections run the process out of fds.
    Idle connections are closed to make room; what still fails is a 503 with Retry-After, never a 502;
    afterwards a new target is served at once and /metrics answers."""
    targets = (await fleet(301)).targets
    with gateway_process("--upstream-max-connections", "5000", "--log-level", "warning", nofile=160) as gateway:
        statuses = await _fleet_load(gateway.url, targets[:300], requests=1500, concurrency=24)

        assert len(statuses) == 1500
        assert set(statuses) <= {200, 503}
        assert statuses.count(200) / len(statuses) > 0.95
        started = time.perf_counter()
        fresh = await _fleet_load(gateway.url, targets[300:], requests=1, concurrency=1)
        assert fresh == [200] and time.perf_counter() - started < 1.0
        async with aiohttp.ClientSession() as session, session.get(gateway.admin_url / "metrics") as response:
            exposition = await response.text()
        assert "aenv_gateway_fd_limit 160.0" in exposition
        evicted = re.search(r'aenv_gateway_upstream_connections_closed_total\{reason="evicted"\} (\S+)', exposition)
        assert evicted is not None and float(evicted[1]) > 0  # the process did run out, and shed
        assert 'aenv_gateway_upstream_errors_total{kind="unreachable"} 0.0' in exposition
        assert "aenv_gateway_sandbox_errors_total{" not in exposition


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_callers_beyond_the_fd_limit_are_disconnected_and_the_listener_recovers() -> None:
    """RLIMIT_NOFILE 100 and 150 callers holding connections open: those past the limit are closed at
    once (no busy loop while it lasts), a warning is logged, and once they leave a new caller is served."""
    with gateway_process(nofile=100) as gateway:
        callers = []
        for _ in range(150):
            callers.append(await asyncio.wait_for(asyncio.open_connection("127.0.0.1", gateway.url.port), 2))
        await asyncio.sleep(1.5)  # the fd watch looks once a second
        cut = 0
        for reader, _ in callers:
            with contextlib.suppress(TimeoutError):
                cut += await asyncio.wait_for(reader.read(1), 0.01) == b""
        before = _cpu_s(gateway.process.pid)
        await asyncio.sleep(1.0)
        spent = _cpu_s(gateway.process.pid) - before
        for _, writer in callers:
            writer.close()
        await asyncio.sleep(0.3)
        started = time.perf_counter()
        async with aiohttp.ClientSession() as session, session.get(gateway.url / "health") as response:
            assert response.status == 200
        assert time.perf_counter() - started < 1.0
        gateway.process.send_signal(signal.SIGTERM)
        output, _ = gateway.process.communicate(timeout=10)

    assert cut > 0 and spent < 0.3
    warning = next(json.loads(line) for line in output.splitlines() if "fds_nearly_exhausted" in line)
    assert (warning["level"], warning["fd_limit"]) == ("warning", 100)
