"""RSS growth per idle SSE stream: open up to 10,000 silent streams through one gateway, then close them.

The script starts bench/upstream.py and the gateway, raises the fd limit (within the hard limit),
opens the streams in batches, reads the gateway's RSS from /proc, closes every stream and checks the
gateway let go of its upstream side. Bounded: every step has a deadline. `make bench-idle-sse`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import HERE, PY, pinned, started


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def upstream_open(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as reply:
        return int(json.load(reply)["open"]) - 1  # this call's own connection


async def open_stream(gateway_port: int, upstream_url: str) -> asyncio.StreamWriter:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway_port, limit=4096)
    writer.write(f"GET /sse?n=0 HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n"
                 f"AEnvCore-MCPProxy-URL: {upstream_url}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"idle_sse: stream refused: {head[:200]!r}")
    return writer


async def wait_until(predicate: object, limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.2)
    return False


async def measure_rounds(
    rounds: int, streams: int, gateway_pid: int, gateway_port: int, upstream_port: int, batch: int
) -> dict[str, object]:
    """The first round's figures, and each round's RSS after its streams closed: a figure that stays
    level from round to round is memory the allocator keeps for reuse, one that climbs is held."""
    first = await measure(streams, gateway_pid, gateway_port, upstream_port, batch)
    after = [first["rss_after_close_mb"]]
    for _ in range(rounds - 1):
        after.append((await measure(streams, gateway_pid, gateway_port, upstream_port, batch))["rss_after_close_mb"])
    return {**first, "rss_after_close_mb_by_round": after} if rounds > 1 else dict(first)


async def measure(
    streams: int, gateway_pid: int, gateway_port: int, upstream_port: int, batch: int
) -> dict[str, float]:
    upstream_url = f"http://127.0.0.1:{upstream_port}"
    # Warm-up: first-use allocations (pools, caches) are not per-stream cost.
    for writer in [await open_stream(gateway_port, upstream_url) for _ in range(50)]:
        writer.close()
    await wait_until(lambda: upstream_open(upstream_port) == 0, 10)
    await asyncio.sleep(0.5)
    before_kb = rss_kb(gateway_pid)
    started_at = time.monotonic()
    writers: list[asyncio.StreamWriter] = []
    for start in range(0, streams, batch):
        count = min(batch, streams - start)
        writers += await asyncio.wait_for(
            asyncio.gather(*(open_stream(gateway_port, upstream_url) for _ in range(count))), 60)
    open_s = time.monotonic() - started_at
    await wait_until(lambda: upstream_open(upstream_port) >= streams, 10)
    await asyncio.sleep(1.0)
    open_kb = rss_kb(gateway_pid)
    upstream_streams = upstream_open(upstream_port)
    for writer in writers:
        writer.close()
    released = await wait_until(lambda: upstream_open(upstream_port) == 0, 30)
    await asyncio.sleep(1.0)
    return {
        "streams": streams,
        "upstream_streams_while_open": upstream_streams,
        "open_s": round(open_s, 1),
        "rss_before_mb": round(before_kb / 1024, 1),
        "rss_open_mb": round(open_kb / 1024, 1),
        "rss_after_close_mb": round(rss_kb(gateway_pid) / 1024, 1),
        "growth_kb_per_stream": round((open_kb - before_kb) / streams, 2),
        "upstream_released_after_close": released,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--port-base", type=int, default=19900)
    parser.add_argument("--gateway-args", default="")
    parser.add_argument("--rounds", type=int, default=1, help="open and close the streams this many times")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = hard if hard != resource.RLIM_INFINITY else 1 << 20
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))  # inherited by the upstream and the gateway
    # The gateway holds two descriptors per stream (downstream and upstream sockets).
    streams = min(args.streams, (limit - 200) // 2)
    if streams < args.streams:
        print(f"idle_sse: fd hard limit {hard} allows {streams} streams, not {args.streams}")
    upstream_port, gateway_port = args.port_base, args.port_base + 1
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    gateway_argv = [PY, "-m", "gateway", "--host", "127.0.0.1", "--port", str(gateway_port),
                    "--admin-port", str(args.port_base + 2), *args.gateway_args.split()]
    with (started(pinned(0, [PY, str(HERE / "upstream.py"), "--port", str(upstream_port)]), upstream_port,
                  results / "upstream-idle.log"),
          started(pinned(1, gateway_argv), gateway_port, results / "gateway-idle.log") as gateway):
        try:
            import uvloop
            figures = uvloop.run(measure_rounds(args.rounds, streams, gateway.pid, gateway_port, upstream_port,
                                                args.batch))
        except ImportError:
            figures = asyncio.run(measure_rounds(args.rounds, streams, gateway.pid, gateway_port, upstream_port,
                                                 args.batch))
    print(json.dumps(figures, indent=1))
    (results / "idle_sse.json").write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
