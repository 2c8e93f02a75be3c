"""The data plane end to end over 127.0.0.1: routing, header policy, bodies, statuses, errors."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
import tracemalloc
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient, AiohttpServer
from yarl import URL

from gateway.app import build_gateway_app
from gateway.headers import MCP_PROXY_URL
from tests.conftest import Upstream, gateway_settings, serve_gateway


@pytest.fixture
async def gateway(aiohttp_client: AiohttpClient) -> TestClient[web.Request, web.Application]:
    return await serve_gateway(aiohttp_client)


async def raw_exchange(host: str, port: int, request: bytes, *, timeout_s: float = 5.0) -> bytes:
    """Send request bytes on a fresh connection and read until the server closes it."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout_s)
    finally:
        writer.close()


async def test_path_and_query_reach_the_upstream_byte_for_byte(gateway, upstream: Upstream) -> None:
    request = (f"POST /a%2Fb/%7Euser/c;p?x=%41&y=a+b&z&e=%2F%3F HTTP/1.1\r\nHost: gw\r\n"
               f"{MCP_PROXY_URL}: {upstream.url}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}").encode()

    response = await raw_exchange(gateway.host, gateway.port, request)

    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    [seen] = upstream.seen
    assert (seen.method, seen.path_qs, seen.body) == ("POST", "/a%2Fb/%7Euser/c;p?x=%41&y=a+b&z&e=%2F%3F", b"{}")


async def test_header_url_path_is_a_prefix(gateway, upstream: Upstream) -> None:
    resp = await gateway.get("/mcp?a=1", headers={MCP_PROXY_URL: str(upstream.url.with_path("/env/7"))})

    assert resp.status == 200
    assert [s.path_qs for s in upstream.seen] == ["/env/7/mcp?a=1"]


async def test_headers_pass_both_ways_except_hop_by_hop_and_routing(
    gateway, aiohttp_server: AiohttpServer, upstream_client: str
) -> None:
    seen_headers: list[dict[str, str]] = []

    async def echo(request: web.Request) -> web.Response:
        seen_headers.append(dict(request.headers))
        response = web.Response(text="ok", headers={"Mcp-Session-Id": "s-9", "X-Hop": "x",
                                                    "Connection": "X-Hop", "Keep-Alive": "timeout=1"})
        response.set_cookie("sid", "1")
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    server = await aiohttp_server(app)
    downstream_headers = {
        MCP_PROXY_URL: str(server.make_url("")), "Authorization": "Bearer t-5ecret", "Mcp-Session-Id": "s-1",
        "Mcp-Protocol-Version": "2025-06-18", "Last-Event-ID": "41", "Accept": "text/event-stream",
        "Cookie": "a=1", "AEnvCore-EnvInstance-ID": "env-1", "Connection": "X-Drop", "X-Drop": "1",
        "Keep-Alive": "timeout=9", "X-Custom": "kept", "User-Agent": "test/1", "Accept-Encoding": "br",
    }

    resp = await gateway.get("/mcp", headers=downstream_headers)

    assert resp.status == 200
    [upstream_saw] = seen_headers
    assert upstream_saw.pop("X-Request-ID")  # the gateway's request id travels with the request
    assert upstream_saw.pop("Via").startswith("1.1 ")  # the loop guard's mark
    if upstream_client == "aiohttp":  # its transport does not pool (upstream.AiohttpClient says why)
        assert upstream_saw.pop("Connection") == "close"
    assert {k: v for k, v in upstream_saw.items() if k not in ("Host", "Content-Length")} == {
        "Authorization": "Bearer t-5ecret", "Mcp-Session-Id": "s-1", "Mcp-Protocol-Version": "2025-06-18",
        "Last-Event-ID": "41", "Accept": "text/event-stream", "Cookie": "a=1", "AEnvCore-EnvInstance-ID": "env-1",
        "X-Custom": "kept", "User-Agent": "test/1", "Accept-Encoding": "br",
    }
    assert upstream_saw["Host"] == f"127.0.0.1:{server.port}"
    assert resp.headers["Mcp-Session-Id"] == "s-9"
    assert resp.headers["Set-Cookie"] == "sid=1; Path=/"
    assert "X-Hop" not in resp.headers and "Keep-Alive" not in resp.headers


async def test_gateway_invents_no_client_headers(gateway, upstream: Upstream, upstream_client: str) -> None:
    request = (f"GET /x HTTP/1.1\r\nHost: gw\r\n{MCP_PROXY_URL}: {upstream.url}\r\nConnection: close\r\n\r\n").encode()

    await raw_exchange(gateway.host, gateway.port, request)

    [seen] = upstream.seen
    # The request id and the loop guard's Via entry are the headers a proxy adds, nothing else.
    hop = ["Connection"] if upstream_client == "aiohttp" else []  # "close": that transport does not pool
    assert sorted(seen.headers) == [*hop, "Host", "Via", "X-Request-ID"]


async def test_redirects_and_any_status_pass_through(gateway, aiohttp_server: AiohttpServer) -> None:
    async def answer(request: web.Request) -> web.Response:
        status = int(request.match_info["status"])
        if status in (301, 302, 307, 308):
            return web.Response(status=status, headers={"Location": "/elsewhere"})
        return web.Response(status=status, text="" if status in (204, 304) else f"status {status}")

    app = web.Application()
    app.router.add_route("*", "/{status}", answer)
    server = await aiohttp_server(app)
    headers = {MCP_PROXY_URL: str(server.make_url(""))}

    seen = []
    for status in (200, 201, 202, 204, 302, 307, 400, 404, 418, 500, 503):
        resp = await gateway.post(f"/{status}", headers=headers, allow_redirects=False, data=b"x")
        seen.append((resp.status, resp.headers.get("Location"), await resp.read()))

    assert seen == [
        (200, None, b"status 200"), (201, None, b"status 201"), (202, None, b"status 202"), (204, None, b""),
        (302, "/elsewhere", b""), (307, "/elsewhere", b""), (400, None, b"status 400"), (404, None, b"status 404"),
        (418, None, b"status 418"), (500, None, b"status 500"), (503, None, b"status 503"),
    ]


async def test_compressed_bodies_pass_byte_for_byte(gateway, aiohttp_server: AiohttpServer) -> None:
    payload = gzip.compress(b'{"jsonrpc": "2.0", "result": {}}' * 100)
    received: list[tuple[str | None, bytes]] = []

    async def gzipped(request: web.Request) -> web.Response:
        received.append((request.headers.get("Content-Encoding"), await request.read()))
        return web.Response(body=payload, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})

    app = web.Application()
    app.router.add_post("/mcp", gzipped)
    server = await aiohttp_server(app, auto_decompress=False)

    resp = await gateway.post("/mcp", data=payload, headers={
        MCP_PROXY_URL: str(server.make_url("")), "Content-Encoding": "gzip", "Accept-Encoding": "gzip"})

    assert (resp.status, resp.headers["Content-Encoding"], await resp.read()) == (200, "gzip", payload)
    assert received == [("gzip", payload)]


async def test_head_request_gets_headers_and_no_body(gateway, aiohttp_server: AiohttpServer) -> None:
    async def sized(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 1000)

    app = web.Application()
    app.router.add_get("/f", sized)
    server = await aiohttp_server(app)

    resp = await gateway.head("/f", headers={MCP_PROXY_URL: str(server.make_url(""))})

    assert (resp.status, resp.headers["Content-Length"], await resp.read()) == (200, "1000", b"")


async def test_health_without_header_is_the_gateways_own(gateway, upstream: Upstream) -> None:
    own = await gateway.get("/health")
    forwarded = await gateway.get("/health", headers={MCP_PROXY_URL: str(upstream.url)})

    assert (own.status, await own.json()) == (200, {"status": "ok", "engine": "k8s"})
    assert (forwarded.status, await forwarded.json()) == (200, {"ok": True})
    assert [s.path_qs for s in upstream.seen] == ["/health"]


@pytest.mark.parametrize(("method", "path", "headers", "error"), [
    ("POST", "/mcp", {}, {"error": "AEnvCore-MCPProxy-URL header is required", "code": "missing_header"}),
    ("GET", "/", {}, {"error": "AEnvCore-MCPProxy-URL header is required", "code": "missing_header"}),
    ("POST", "/health", {}, {"error": "AEnvCore-MCPProxy-URL header is required", "code": "missing_header"}),
    ("GET", "/sse", {MCP_PROXY_URL: "ftp://x:1"}, {
        "error": "AEnvCore-MCPProxy-URL header must be an http:// or https:// URL, like http://10.1.2.3:8081",
        "code": "malformed_header"}),
    ("GET", "/sse", {MCP_PROXY_URL: "http://:80"}, {
        "error": "AEnvCore-MCPProxy-URL header is not a valid URL: Invalid URL: host is required for "
                 "absolute urls with the http scheme", "code": "malformed_header"}),
])
async def test_bad_routing_header_is_400_json(gateway, method: str, path: str, headers: dict[str, str],
                                              error: dict[str, str]) -> None:
    resp = await gateway.request(method, path, headers=headers)

    assert (resp.status, resp.content_type, await resp.json()) == (400, "application/json", error)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_refused_upstream_is_502(gateway) -> None:
    port = free_port()

    resp = await gateway.post("/mcp", data=b"{}", headers={MCP_PROXY_URL: f"http://127.0.0.1:{port}"})

    assert (resp.status, await resp.json()) == (502, {
        "error": f"cannot connect to upstream 127.0.0.1:{port}: connection refused", "code": "upstream_unreachable"})


async def serve_raw(reply: bytes | None, *, delay_s: float = 0.0) -> tuple[asyncio.Server, int]:
    """A raw TCP upstream that reads the request head, waits, sends reply (None: just close)."""

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            await asyncio.sleep(delay_s)
            if reply:
                writer.write(reply)
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_upstream_closing_before_responding_is_502(gateway) -> None:
    server, port = await serve_raw(None)
    async with server:
        resp = await gateway.get("/mcp", headers={MCP_PROXY_URL: f"http://127.0.0.1:{port}"})

        assert (resp.status, await resp.json()) == (502, {
            "error": f"upstream 127.0.0.1:{port} failed: upstream closed the connection before responding",
            "code": "upstream_unreachable"})


async def test_invalid_http_from_upstream_is_502(gateway) -> None:
    server, port = await serve_raw(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    async with server:
        resp = await gateway.get("/mcp", headers={MCP_PROXY_URL: f"http://127.0.0.1:{port}"})

        assert (resp.status, await resp.json()) == (502, {
            "error": f"upstream 127.0.0.1:{port} sent an invalid HTTP response", "code": "upstream_bad_response"})


async def test_upstream_that_never_answers_is_504(aiohttp_client: AiohttpClient) -> None:
    gateway = await serve_gateway(aiohttp_client, idle_timeout_s=0.3)
    server, port = await serve_raw(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", delay_s=3)
    async with server:
        resp = await gateway.get("/mcp", headers={MCP_PROXY_URL: f"http://127.0.0.1:{port}"})

        assert (resp.status, await resp.json()) == (504, {
            "error": f"upstream 127.0.0.1:{port} did not answer in time", "code": "upstream_timeout"})


async def test_body_cut_by_the_upstream_is_not_delivered_as_complete(gateway) -> None:
    server, port = await serve_raw(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    async with server:
        resp = await gateway.get("/mcp", headers={MCP_PROXY_URL: f"http://127.0.0.1:{port}"})

        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


CHUNK = 256 * 1024
FIFTY_MB = 50 * 1024 * 1024


async def test_50mb_streams_both_ways_without_holding_it(gateway, aiohttp_server: AiohttpServer) -> None:
    upstream_digest = hashlib.sha256()

    async def sink_and_source(request: web.Request) -> web.StreamResponse:
        async for chunk in request.content.iter_chunked(CHUNK):
            upstream_digest.update(chunk)
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = FIFTY_MB
        await response.prepare(request)
        block = bytes(range(256)) * (CHUNK // 256)
        for _ in range(FIFTY_MB // CHUNK):
            await response.write(block)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/blob", sink_and_source)
    server = await aiohttp_server(app)
    block = os.urandom(CHUNK)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(FIFTY_MB // CHUNK):
            yield block

    tracemalloc.start()
    try:
        resp = await gateway.post("/blob", data=body(), headers={MCP_PROXY_URL: str(server.make_url(""))})
        received = 0
        async for chunk in resp.content.iter_chunked(CHUNK):
            received += len(chunk)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    expected = hashlib.sha256()
    for _ in range(FIFTY_MB // CHUNK):
        expected.update(block)
    assert (resp.status, received, upstream_digest.hexdigest()) == (200, FIFTY_MB, expected.hexdigest())
    # Client, gateway and upstream all live in this process: 100 MB moved, a few MB held at most.
    assert peak_bytes < 16 * 1024 * 1024, f"peak traced memory {peak_bytes / 2**20:.1f} MiB"


async def test_request_without_length_streams_chunked(gateway, upstream: Upstream) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b'{"jsonrpc":'
        yield b'"2.0"}'

    resp = await gateway.post("/mcp", data=body(), headers={MCP_PROXY_URL: str(upstream.url)})

    assert resp.status == 200
    assert [s.body for s in upstream.seen] == [b'{"jsonrpc":"2.0"}']


async def test_keeps_upstream_connections_alive(gateway, aiohttp_server: AiohttpServer, upstream_client: str) -> None:
    peers: set[object] = set()

    async def who(request: web.Request) -> web.Response:
        peers.add(request.transport and request.transport.get_extra_info("peername"))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/mcp", who)
    server = await aiohttp_server(app)
    for _ in range(20):
        resp = await gateway.post("/mcp", data=b"{}", headers={MCP_PROXY_URL: str(server.make_url(""))})
        await resp.read()

    # aiohttp's transport cannot pool safely (upstream.AiohttpClient): a connection per request.
    assert len(peers) == (1 if upstream_client == "lean" else 20)


def test_target_url_keeps_encoding() -> None:
    assert URL("http://h:1/a%2Fb?x=%41", encoded=True).raw_path_qs == "/a%2Fb?x=%41"


async def _expect_continue(host: str, port: int, upstream: Upstream, body: bytes) -> tuple[bytes, bytes]:
    """A POST with Expect: 100-continue that sends its body only after the interim answer; both answers."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"POST /mcp HTTP/1.1\r\nHost: gw\r\n{MCP_PROXY_URL}: {upstream.url}\r\nExpect: 100-continue\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        if not first.startswith(b"HTTP/1.1 100 "):
            return first, b""  # a final answer: the body is never sent
        writer.write(body)
        return first, await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


@pytest.mark.parametrize("runner", ["cli", "router"])
async def test_a_caller_expecting_100_continue_is_told_to_send_its_body(
    runner: str, upstream: Upstream, aiohttp_client: AiohttpClient
) -> None:
    gateway = (await serve_gateway(aiohttp_client) if runner == "cli"
               else await aiohttp_client(build_gateway_app(gateway_settings())))
    body = b'{"jsonrpc":"2.0","id":1,"method":"ping"}'

    interim, rest = await _expect_continue(gateway.host, gateway.port, upstream, body)

    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"  # once: not the router's and then ours
    assert rest.startswith(b"HTTP/1.1 200 OK\r\n")
    [seen] = upstream.seen
    assert (seen.body, seen.headers["Expect"]) == (body, "100-continue")


async def test_a_refused_caller_expecting_100_continue_gets_the_refusal_and_sends_no_body(
    upstream: Upstream, aiohttp_client: AiohttpClient
) -> None:
    gateway = await serve_gateway(aiohttp_client, max_body_size=16)

    interim, _ = await _expect_continue(gateway.host, gateway.port, upstream, b"x" * 64)

    assert interim.startswith(b"HTTP/1.1 413 ")
    assert upstream.seen == []
