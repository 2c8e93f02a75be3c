"""Bounded soak: slow-client back-pressure (issue #5 item 8) and leaks (item 10), against the real program.

    .venv/bin/python bench/soak.py                 # defaults: 200 MB slow read, 10,000 requests, 1,000 streams
    .venv/bin/python bench/soak.py --big-mb 50 --requests 2000 --streams 200   # a quicker run
    .venv/bin/python bench/soak.py --requests-only --gateway-root /tmp/other-checkout   # CPU per request

The gateway runs in a child process (this file, `serve` mode) that also writes its asyncio task
count to a file; the upstream and the load run here. Gateway RSS and open fds come from /proc.
Every phase is bounded by a timeout; the child is stopped with SIGTERM (and killed if it hangs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 64 * 1024


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_text(path: str, text: str) -> None:
    Path(path).write_text(text)  # a few bytes to tmpfs-like /tmp: not worth a thread


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)


# --- child: the gateway plus a task-count reporter ------------------------------------------------

async def serve_with_stats(argv: list[str], stats_path: str, gateway_root: str) -> None:
    sys.path.insert(0, gateway_root)
    from gateway.cli import serve
    from gateway.config import load_settings
    from gateway.engines import build_engine
    from gateway.log import configure_logging

    settings = load_settings(argv, os.environ)
    configure_logging("json", "error")

    async def report() -> None:
        while True:
            write_text(stats_path, str(len(asyncio.all_tasks())))
            await asyncio.sleep(0.2)

    reporter = asyncio.ensure_future(report())
    try:
        await serve(settings, build_engine(settings))
    finally:
        reporter.cancel()


# --- parent: upstream, load and measurements -------------------------------------------------------

class Upstream:
    """/mcp answers small JSON; /sse emits an event every 50 ms; /big streams N MB as fast as allowed."""

    def __init__(self, big_bytes: int) -> None:
        self.big_bytes = big_bytes
        self.big_written = 0

    async def mcp(self, request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"jsonrpc": "2.0", "id": 1, "result": {}})

    async def sse(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for n in range(10_000):
                await response.write(b"data: %d\n\n" % n)
                await asyncio.sleep(0.05)
        except ConnectionResetError:  # the gateway dropped us after its client left: expected here
            pass
        return response

    async def big(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = self.big_bytes
        await response.prepare(request)
        block = b"\0" * CHUNK
        self.big_written = 0
        while self.big_written < self.big_bytes:
            await response.write(block)  # waits while the socket buffer is full: back-pressure
            self.big_written += CHUNK
        return response


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (fields 14 and 15 of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_stats(pid: int, stats_path: Path) -> dict[str, int]:
    rss_kib = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith("VmRSS:"))
    return {"rss_mib": rss_kib // 1024, "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "tasks": int(stats_path.read_text() or 0)}


async def settle(pid: int, stats_path: Path, baseline: dict[str, int], seconds: float) -> dict[str, int]:
    """Wait up to `seconds` for fds and tasks to come back to the baseline; the last reading."""
    deadline = time.monotonic() + seconds
    while True:
        await asyncio.sleep(0.5)
        now = proc_stats(pid, stats_path)
        if (now["fds"] <= baseline["fds"] and now["tasks"] <= baseline["tasks"]) or time.monotonic() > deadline:
            return now


async def requests_phase(gateway: str, routed: dict[str, str], total: int, concurrency: int) -> dict[str, int]:
    statuses: dict[str, int] = {}
    queue = iter(range(total))
    async with aiohttp.ClientSession() as session:
        async def worker() -> None:
            for _ in queue:
                async with session.post(f"{gateway}/mcp", data=b'{"jsonrpc":"2.0","id":1,"method":"ping"}',
                                        headers=routed) as response:
                    await response.read()
                    statuses[str(response.status)] = statuses.get(str(response.status), 0) + 1
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


async def streams_phase(gateway: str, routed: dict[str, str], total: int, concurrency: int) -> int:
    """Open SSE streams, read one event, then drop the connection without a goodbye."""
    opened = 0
    queue = iter(range(total))
    async with aiohttp.ClientSession() as session:
        async def worker() -> None:
            nonlocal opened
            for _ in queue:
                response = await session.get(f"{gateway}/sse", headers=routed)
                await response.content.readuntil(b"\n\n")
                opened += 1
                response.close()  # closes the TCP connection: a dropped client
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return opened


async def slow_reader_phase(gateway_port: int, upstream_url: str, upstream: Upstream, pid: int,
                            stats_path: Path, read_bytes_per_tick: int) -> dict[str, float]:
    """Read /big through the gateway over a raw socket, slowly; sample gateway RSS and the upstream lead."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway_port)
    writer.write(f"GET /big HTTP/1.1\r\nHost: gw\r\nAEnvCore-MCPProxy-URL: {upstream_url}\r\n\r\n".encode())
    await writer.drain()
    await reader.readuntil(b"\r\n\r\n")
    received, peak_rss, peak_lead = 0, 0, 0
    started = time.monotonic()
    while received < upstream.big_bytes:
        chunk = await reader.read(read_bytes_per_tick)
        if not chunk:
            break
        received += len(chunk)
        await asyncio.sleep(0.01)
        peak_lead = max(peak_lead, upstream.big_written - received)
        if received % (8 * 1024 * 1024) < read_bytes_per_tick:
            peak_rss = max(peak_rss, proc_stats(pid, stats_path)["rss_mib"])
    writer.close()
    elapsed = time.monotonic() - started
    return {"received_mb": received / 1e6, "seconds": round(elapsed, 1),
            "read_mb_per_s": round(received / 1e6 / elapsed, 1), "peak_gateway_rss_mib": peak_rss,
            "peak_upstream_lead_mib": round(peak_lead / 2**20, 1)}


async def soak(args: argparse.Namespace) -> dict[str, object]:
    upstream = Upstream(args.big_mb * 1_000_000)
    app = web.Application()
    app.router.add_post("/mcp", upstream.mcp)
    app.router.add_get("/sse", upstream.sse)
    app.router.add_get("/big", upstream.big)
    # Idle keep-alive connections from the gateway's pool are closed after 1 s, so fds can settle.
    runner = web.AppRunner(app, keepalive_timeout=1.0, handler_cancellation=True, access_log=None)
    await runner.setup()
    upstream_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", upstream_port).start()
    upstream_url = f"http://127.0.0.1:{upstream_port}"
    routed = {"AEnvCore-MCPProxy-URL": upstream_url}

    port, admin_port = free_port(), free_port()
    stats_path = Path(tempfile.mkstemp(prefix="soak-tasks-")[1])
    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "serve", str(stats_path), args.gateway_root, "--",
        "--host", "127.0.0.1", "--port", str(port), "--admin-port", str(admin_port),
        env={**os.environ, "GATEWAY_DRAIN_TIMEOUT": "1"})  # env: an older checkout ignores what it lacks
    gateway = f"http://127.0.0.1:{port}"
    result: dict[str, object] = {}
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.get(f"http://127.0.0.1:{admin_port}/readyz") as ready:
                        if ready.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    if child.returncode is not None:
                        raise RuntimeError(f"the gateway exited with {child.returncode}") from None
                    await asyncio.sleep(0.1)
        async with asyncio.timeout(60):  # warm-up: pools, caches and lazy imports exist before the baseline
            await requests_phase(gateway, routed, 200, 20)
            await streams_phase(gateway, routed, 20, 10)
        baseline = await settle(child.pid, stats_path, {"fds": 0, "tasks": 0}, 3)
        result["baseline"] = baseline

        started, cpu_before = time.monotonic(), cpu_seconds(child.pid)
        async with asyncio.timeout(args.phase_timeout):
            result["requests"] = await requests_phase(gateway, routed, args.requests, args.concurrency)
        result["requests_per_s"] = round(args.requests / (time.monotonic() - started))
        result["gateway_cpu_us_per_request"] = round((cpu_seconds(child.pid) - cpu_before) / args.requests * 1e6)
        if args.requests_only:
            return result
        result["after_requests"] = proc_stats(child.pid, stats_path)
        async with asyncio.timeout(args.phase_timeout):
            result["streams_dropped"] = await streams_phase(gateway, routed, args.streams, args.concurrency)
        result["after_streams"] = proc_stats(child.pid, stats_path)
        result["settled"] = await settle(child.pid, stats_path, baseline, 10)

        async with asyncio.timeout(args.phase_timeout):
            result["slow_reader"] = await slow_reader_phase(port, upstream_url, upstream, child.pid, stats_path,
                                                            args.read_kib_per_tick * 1024)
        settled = result["settled"]
        assert isinstance(settled, dict)
        result["leak_free"] = settled["fds"] <= baseline["fds"] and settled["tasks"] <= baseline["tasks"]
    finally:
        if child.returncode is None:
            child.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(10):
                result["exit_code"] = await child.wait()
        except TimeoutError:
            child.kill()
            await child.wait()
        await runner.cleanup()
        remove(stats_path)
    return result


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "serve":
        asyncio.run(serve_with_stats(sys.argv[5:], sys.argv[2], sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--streams", type=int, default=1_000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--big-mb", type=int, default=200)
    parser.add_argument("--read-kib-per-tick", type=int, default=256, help="slow reader: KiB per 10 ms")
    parser.add_argument("--phase-timeout", type=float, default=120.0)
    parser.add_argument("--gateway-root", default=str(ROOT), help="import the gateway package from here")
    parser.add_argument("--requests-only", action="store_true", help="stop after the requests phase")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(soak(args)), indent=2))


if __name__ == "__main__":
    main()
