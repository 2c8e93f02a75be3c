"""--workers N end to end: real supervisor and worker processes on 127.0.0.1, a real upstream in the test.

Which worker served a request is read from /proc: each worker keeps its own pooled connections to the
upstream, so the worker processes holding a connection to the upstream's port are the ones that served.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from pytest_aiohttp import AiohttpServer

from gateway.config import load_settings
from gateway.errors import ConfigError
from gateway.supervisor import restart_delay_s

MCP_PROXY_URL = "AEnvCore-MCPProxy-URL"
STARTUP_S = 30.0  # two Python processes importing aiohttp on a busy 2-core machine


@dataclass(slots=True)
class SlowUpstream:
    port: int
    slow_started: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
async def slow_upstream(aiohttp_server: AiohttpServer) -> SlowUpstream:
    """Answers {"ok": true}, except /slow, which answers b"slow done" two seconds after it arrived."""
    started = asyncio.Event()

    async def answer(request: web.Request) -> web.Response:
        if request.path == "/slow":
            started.set()
            await asyncio.sleep(2.0)
            return web.Response(body=b"slow done")
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    server = await aiohttp_server(app)
    assert server.port is not None
    return SlowUpstream(port=server.port, slow_started=started)


@dataclass(slots=True)
class Supervised:
    """A running `mcp-gateway --workers N` and the JSON log lines it (and its workers) printed."""

    process: asyncio.subprocess.Process
    events: list[dict[str, Any]] = field(default_factory=list)
    printed: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_for(self, event: str, count: int = 1, timeout_s: float = STARTUP_S) -> list[dict[str, Any]]:
        async with asyncio.timeout(timeout_s):
            while len(seen := [line for line in self.events if line.get("event") == event]) < count:
                self.printed.clear()
                await self.printed.wait()
        return seen

    async def pump(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            with contextlib.suppress(ValueError):
                self.events.append(json.loads(raw))
                self.printed.set()

    def worker_pids(self) -> list[int]:
        return [line["pid"] for line in self.events if line.get("event") == "worker_started"]


StartSupervisor = Callable[..., Awaitable[Supervised]]


@pytest.fixture
async def start_supervisor(tmp_path: Path) -> AsyncIterator[StartSupervisor]:
    """Start the program with --workers; on teardown kill it and every worker it started."""
    started: list[Supervised] = []
    pumps: list[asyncio.Task[None]] = []

    async def start(*args: str) -> Supervised:
        with (tmp_path / "stderr.txt").open("ab") as stderr:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", "--host", "127.0.0.1", "--port", "0", "--admin-port", "0", *args,
                stdout=subprocess.PIPE, stderr=stderr,
            )
        supervised = Supervised(process)
        started.append(supervised)
        pumps.append(asyncio.create_task(supervised.pump()))
        return supervised

    yield start
    for supervised in started:
        if supervised.process.returncode is None:
            supervised.process.send_signal(signal.SIGTERM)  # a drain, so it removes its metrics directory
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(supervised.process.wait(), 20)
        for pid in [supervised.process.pid, *supervised.worker_pids()]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await asyncio.wait_for(supervised.process.wait(), 10)
    for pump in pumps:
        pump.cancel()


async def proxied_get(gateway_port: int, upstream_port: int, path: str = "/mcp") -> tuple[int, bytes]:
    """One request on a fresh connection, so the kernel picks a worker for each."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        headers = {MCP_PROXY_URL: f"http://127.0.0.1:{upstream_port}"}
        async with session.get(f"http://127.0.0.1:{gateway_port}{path}", headers=headers) as response:
            return response.status, await response.read()


def pids_connected_to(port: int, pids: list[int]) -> set[int]:
    """Which of these processes hold an established TCP connection to 127.0.0.1:port."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            for line in list(lines)[1:]:
                columns = line.split()
                if int(columns[2].rsplit(":", 1)[1], 16) == port and columns[3] == "01":
                    inodes.add(f"socket:[{columns[9]}]")
    holders = set()
    for pid in pids:
        with contextlib.suppress(FileNotFoundError):
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(_readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in fds):
                holders.add(pid)
    return holders


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def children_of(pid: int) -> set[int]:
    children = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    children.add(int(entry))
    return children


def exists(path: str | Path) -> bool:
    """A stat of /proc or of a local directory: instant, and kept out of the async tests' bodies for ruff."""
    return os.path.exists(path)


async def wait_until_gone(pid: int, timeout_s: float = 10.0) -> None:
    """Until the process is reaped by its parent (its sockets are closed long before)."""
    for _ in range(int(timeout_s / 0.05)):
        if not exists(f"/proc/{pid}"):
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"process {pid} still exists after {timeout_s} s")


async def test_both_workers_serve_and_a_killed_worker_is_replaced(
    start_supervisor: StartSupervisor, slow_upstream: SlowUpstream
) -> None:
    supervised = await start_supervisor("--workers", "2")
    [ready] = await supervised.wait_for("supervisor_started")
    await supervised.wait_for("gateway_started", count=2)
    first_pids = supervised.worker_pids()
    assert children_of(supervised.process.pid) == set(first_pids)

    answers = [await proxied_get(ready["port"], slow_upstream.port) for _ in range(40)]

    assert answers == [(200, b'{"ok": true}')] * 40
    assert pids_connected_to(slow_upstream.port, first_pids) == set(first_pids)

    victim, survivor = first_pids
    # A live gauge file of the victim, as prometheus_client writes one: the supervisor must drop it.
    live_gauge = Path(ready["metrics_multiproc_dir"]) / f"gauge_livesum_{victim}.db"
    live_gauge.write_bytes(b"")
    os.kill(victim, signal.SIGKILL)
    await wait_until_gone(victim)

    answers = [await proxied_get(ready["port"], slow_upstream.port) for _ in range(20)]

    assert answers == [(200, b'{"ok": true}')] * 20
    [died] = await supervised.wait_for("worker_died")
    assert (died["pid"], died["returncode"]) == (victim, -signal.SIGKILL)
    assert died["restart_in_s"] in (0.5, 0.0)  # 0.0 if a loaded machine took 10 s to get here
    await supervised.wait_for("gateway_started", count=3)
    replacement = supervised.worker_pids()[2]
    assert children_of(supervised.process.pid) == {survivor, replacement}
    assert not live_gauge.exists()
    assert await proxied_get(ready["port"], slow_upstream.port) == (200, b'{"ok": true}')


async def test_sigterm_drains_every_worker_and_exits_zero(
    start_supervisor: StartSupervisor, slow_upstream: SlowUpstream
) -> None:
    supervised = await start_supervisor("--workers", "2")
    [ready] = await supervised.wait_for("supervisor_started")
    await supervised.wait_for("gateway_started", count=2)
    worker_pids = supervised.worker_pids()
    metrics_dir = Path(ready["metrics_multiproc_dir"])
    assert exists(metrics_dir)
    in_flight = asyncio.create_task(proxied_get(ready["port"], slow_upstream.port, "/slow"))
    await asyncio.wait_for(slow_upstream.slow_started.wait(), 10)

    supervised.process.send_signal(signal.SIGTERM)

    # Every worker still answering the admin port is draining: not ready, while the request finishes.
    async with aiohttp.ClientSession() as session:
        readyz = None
        async with asyncio.timeout(10):
            while readyz != 503:
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with session.get(f"http://127.0.0.1:{ready['admin_port']}/readyz") as response:
                        readyz = response.status
    assert not in_flight.done()
    assert await asyncio.wait_for(in_flight, 10) == (200, b"slow done")
    assert await asyncio.wait_for(supervised.process.wait(), 20) == 0
    exited = await supervised.wait_for("worker_exited", count=2, timeout_s=1)
    assert sorted((line["pid"], line["returncode"]) for line in exited) == sorted((pid, 0) for pid in worker_pids)
    assert not any(exists(f"/proc/{pid}") for pid in worker_pids)
    assert not exists(metrics_dir)


def run_gateway(*args: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True,
                          timeout=timeout_s, check=False)


def test_bad_workers_value_exits_2_with_one_line() -> None:
    result = run_gateway("--workers", "two")

    assert (result.returncode, result.stdout, result.stderr) == (
        2, "", "mcp-gateway: error: --workers: 'two' from --workers must be a whole number from 1 to 1024, or auto\n"
    )


def test_workers_on_a_port_in_use_exits_2_before_starting_any() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run_gateway("--workers", "2", "--host", "127.0.0.1", "--port", str(port), "--admin-port", "0")

    assert (result.returncode, result.stderr) == (2, "mcp-gateway: error: cannot listen: Address already in use\n")
    assert "worker_started" not in result.stdout


@pytest.mark.parametrize("raw", ["0", "-1", "1.5", "1025", "", "AUTO"])
def test_workers_refuses_anything_but_a_count_or_auto(raw: str) -> None:
    with pytest.raises(ConfigError, match=r"^--workers: .* must be a whole number from 1 to 1024, or auto$"):
        load_settings(["--workers", raw], {})


@given(raw=st.text(max_size=6) | st.integers(-5, 2000).map(str))
def test_workers_takes_a_count_from_1_to_1024_or_auto_and_nothing_else(raw: str) -> None:
    if raw == "auto" or (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= 1024):
        assert load_settings([f"--workers={raw}"], {}).workers >= 1
    else:
        with pytest.raises(ConfigError, match=r"^--workers: .* must be a whole number from 1 to 1024, or auto$"):
            load_settings([f"--workers={raw}"], {})


def test_workers_auto_is_the_cpus_this_process_may_use() -> None:
    assert load_settings(["--workers", "auto"], {}).workers == len(os.sched_getaffinity(0))
    assert load_settings([], {"GATEWAY_WORKERS": "3"}).workers == 3
    assert load_settings([], {}).workers == 1


def test_metrics_multiproc_dir_setting() -> None:
    assert load_settings([], {}).metrics_multiproc_dir == ""
    assert load_settings([], {"GATEWAY_METRICS_MULTIPROC_DIR": "/run/m"}).metrics_multiproc_dir == "/run/m"
    assert load_settings(["--metrics-multiproc-dir", "/x"], {}).metrics_multiproc_dir == "/x"


def test_restart_back_off_doubles_and_is_bounded() -> None:
    assert [restart_delay_s(deaths) for deaths in range(10)] == [0.0, 0.5, 1, 2, 4, 8, 16, 30, 30, 30]


async def test_workers_drain_and_exit_when_the_supervisor_is_killed(
    start_supervisor: StartSupervisor, slow_upstream: SlowUpstream
) -> None:
    supervised = await start_supervisor("--workers", "2")
    [ready] = await supervised.wait_for("supervisor_started")
    await supervised.wait_for("gateway_started", count=2)

    supervised.process.kill()

    for pid in supervised.worker_pids():
        await wait_until_gone(pid)
    shutil.rmtree(ready["metrics_multiproc_dir"])  # nobody was left to remove it
