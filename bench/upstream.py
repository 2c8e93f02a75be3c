"""A fast MCP-like upstream for the benchmark: POST /mcp answers JSON, GET /sse streams timed events.

HTTP/1.1 keep-alive on asyncio protocols with httptools, so the upstream is not what limits the run.
GET /sse?n=N&size=B&interval_ms=M sends N events of B bytes, each `data: <send time ns> <padding>`;
n=0 holds the stream open and silent until the client leaves. GET /stats counts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from urllib.parse import parse_qs, urlsplit

import httptools

MCP_BODY = b'{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"ok"}],"isError":false}}'
MCP_REPLY = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(MCP_BODY) + MCP_BODY
)
SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
STATS = {"connections": 0, "open": 0}


class Upstream(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.streams: list[asyncio.Task[None]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        STATS["connections"] += 1
        STATS["open"] += 1

    def connection_lost(self, exc: Exception | None) -> None:
        STATS["open"] -= 1
        for task in self.streams:
            task.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_message_complete(self) -> None:
        assert self.transport is not None
        path = self.url.split(b"?", 1)[0]
        if path == b"/sse":
            self.streams.append(asyncio.ensure_future(self.sse(self.url.decode())))
        elif path == b"/stats":
            body = json.dumps(STATS).encode()
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        else:
            self.transport.write(MCP_REPLY)

    async def sse(self, url: str) -> None:
        query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
        n, size = int(query.get("n", 10)), int(query.get("size", 100))
        interval_s = int(query.get("interval_ms", 10)) / 1e3
        transport = self.transport
        assert transport is not None
        transport.write(SSE_HEAD)
        if n == 0:
            await asyncio.Event().wait()  # idle until the client goes (connection_lost cancels us)
        for _ in range(n):
            event = b"data: %d %s\n\n" % (time.time_ns(), b"x" * max(0, size - 30))
            transport.write(b"%x\r\n%s\r\n" % (len(event), event))
            if interval_s:
                await asyncio.sleep(interval_s)
            elif transport.get_write_buffer_size() > 1 << 20:
                await asyncio.sleep(0.001)
        transport.write(b"0\r\n\r\n")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Upstream, "127.0.0.1", args.port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        import uvloop
        uvloop.run(main())
    except KeyboardInterrupt:
        pass
