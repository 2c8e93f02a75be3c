"""Fallback load generator when wrk is not installed: C keep-alive connections POSTing for D seconds.

Prints one JSON line like wrk_post.lua's. Python is slower than wrk: figures are lower bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

BODY = (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_documents",'
        b'"arguments":{"query":"reverse proxy benchmark for MCP gateways","top_k":10}}}')


async def worker(port: int, upstream: str, deadline: float, latencies: list[float], errors: list[int]) -> None:
    request = (b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"AEnvCore-MCPProxy-URL: %s\r\nContent-Length: %d\r\n\r\n%s" % (upstream.encode(), len(BODY), BODY))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200"):
                errors.append(1)
            latencies.append(time.perf_counter() - start)
    finally:
        writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5)
    args = parser.parse_args()
    latencies: list[float] = []
    errors: list[int] = []
    start = time.perf_counter()
    deadline = start + args.duration
    await asyncio.gather(*(worker(args.port, args.upstream, deadline, latencies, errors)
                           for _ in range(args.connections)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e6 if latencies else 0.0  # noqa: E731
    print("WRKJSON " + json.dumps({"requests": len(latencies), "rps": len(latencies) / elapsed,
                                   "p50_us": pick(0.5), "p99_us": pick(0.99), "errors": len(errors)}))


if __name__ == "__main__":
    try:
        import uvloop
        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
