"""Probe, not product: what a proxied call costs when the server side is as lean as the upstream side.

An httptools request parser on an asyncio protocol in front of the gateway's own Http1Client, with
no feature at all (no limits, logs, metrics, policy, streaming or error answers). It answers the
question the c16 target of #6 raises: how much of the per-call CPU is aiohttp's server?

    .venv/bin/python bench/probe_lean_server.py --port 18691        # pinned: taskset -c 1 ...
    UPSTREAM_URL=http://127.0.0.1:PORT wrk -t1 -c16 -d3s -s bench/wrk_post.lua http://127.0.0.1:18691/mcp

Figures from it are in docs/performance.md ("Where the time goes now").
"""

from __future__ import annotations

import argparse
import asyncio

import uvloop
from httptools import HttpRequestParser
from multidict import CIMultiDict
from yarl import URL

from gateway.config import Settings
from gateway.headers import MCP_PROXY_URL
from gateway.http1 import Http1Client

_FRAMING = frozenset({"content-length", "connection", "transfer-encoding"})


class ProbeProtocol(asyncio.Protocol):
    def __init__(self, client: Http1Client) -> None:
        self._client = client
        self._parser = HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self._url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        method = self._parser.get_method().decode()
        headers, body = CIMultiDict(self._headers), b"".join(self._body)
        self._headers, self._body = [], []
        asyncio.get_running_loop().create_task(self._forward(method, self._url.decode(), headers, body))

    async def _forward(self, method: str, path_qs: str, headers: CIMultiDict[str], body: bytes) -> None:
        target = URL(headers.pop(MCP_PROXY_URL) + path_qs, encoded=True)
        upstream_response = await self._client.request(method, target, headers, body)
        try:
            data = upstream_response.arrived_body()
            if data is None:
                chunks = []
                while chunk := await upstream_response.read_chunk():
                    chunks.append(chunk)
                data = b"".join(chunks)
            head = [f"HTTP/1.1 {upstream_response.status} {upstream_response.reason}\r\n"]
            head += [f"{name}: {value}\r\n" for name, value in upstream_response.headers.items()
                     if name.lower() not in _FRAMING]
            head.append(f"Content-Length: {len(data)}\r\n\r\n")
            assert self._transport is not None
            self._transport.write("".join(head).encode("latin-1") + data)
        finally:
            upstream_response.release()


async def serve(port: int) -> None:
    client = Http1Client(Settings())
    await asyncio.get_running_loop().create_server(lambda: ProbeProtocol(client), "127.0.0.1", port)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=18691)
    uvloop.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
