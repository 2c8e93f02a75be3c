"""The data plane's HTTP/1.1 server, judged by the bytes on the wire alone (raw sockets, no HTTP client).

Server-agnostic on purpose: these tests guard any replacement of the server side.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.headers import MCP_PROXY_URL
from tests.conftest import EchoUpstream, Gateway, Upstream, serve_gateway

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class RawResponse:
    status_line: bytes
    status: int
    headers: CIMultiDict[str]
    body: bytes
    framing: str  # "none", "length", "chunked" or "eof"

    def json(self) -> object:
        return json.loads(self.body)


@asynccontextmanager
async def connect(port: int | None) -> AsyncIterator[Conn]:
    assert port is not None
    async with asyncio.timeout(2):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(2):
                await writer.wait_closed()


async def read_response(reader: asyncio.StreamReader, *, head: bool = False, timeout_s: float = 5.0) -> RawResponse:
    """One response: status line, headers, and a body framed by Content-Length, chunked coding or EOF."""
    async with asyncio.timeout(timeout_s):
        raw_head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = raw_head[:-4].split(b"\r\n")
        status = int(status_line.split(b" ", 2)[1])
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines:
            name, _, value = line.partition(b":")
            headers.add(name.decode("latin-1").strip(), value.decode("latin-1").strip())
        codings = [c.strip().lower() for c in headers.get("Transfer-Encoding", "").split(",") if c.strip()]
        if head or status in (204, 304) or 100 <= status < 200:
            return RawResponse(status_line, status, headers, b"", "none")
        if codings and codings[-1] == "chunked":
            return RawResponse(status_line, status, headers, await _read_chunked(reader), "chunked")
        if "Content-Length" in headers:
            body = await reader.readexactly(int(headers["Content-Length"]))
            return RawResponse(status_line, status, headers, body, "length")
        return RawResponse(status_line, status, headers, await reader.read(), "eof")


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailer fields
                pass
            return bytes(body)
        body += await reader.readexactly(size)
        assert await reader.readexactly(2) == b"\r\n", "chunk data not followed by CRLF"


async def parse_response(raw: bytes) -> RawResponse:
    """A response already read to EOF, parsed by read_response."""
    reader = asyncio.StreamReader()
    reader.feed_data(raw)
    reader.feed_eof()
    return await read_response(reader)


async def assert_closed_by_server(reader: asyncio.StreamReader, timeout_s: float = 2.0) -> None:
    """The server closed the connection: EOF (or a reset) arrives within timeout_s, with no more bytes."""
    async with asyncio.timeout(timeout_s):
        try:
            rest = await reader.read()
        except ConnectionResetError:
            return
    assert rest == b"", f"unexpected bytes after the response: {rest[:200]!r}"


def request(method: str, path: str, target: object, *, version: str = "1.1", extra: str = "",
            body: bytes = b"") -> bytes:
    length = f"Content-Length: {len(body)}\r\n" if body else ""
    return (f"{method} {path} HTTP/{version}\r\nHost: gw\r\n{MCP_PROXY_URL}: {target}\r\n{length}{extra}\r\n"
            .encode() + body)


async def serve(aiohttp_server: AiohttpServer, handler: Handler) -> TestServer:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return await aiohttp_server(app)


# --- connection reuse --------------------------------------------------------------------------------

async def test_two_requests_on_one_connection_are_both_answered(gateway: Gateway, upstream: Upstream) -> None:
    async with connect(gateway.port) as (reader, writer):
        writer.write(request("GET", "/one", upstream.url))
        first = await read_response(reader)
        writer.write(request("POST", "/two", upstream.url, body=b'{"n": 2}'))
        second = await read_response(reader)

    assert (first.status, first.json()) == (200, {"ok": True})
    assert (second.status, second.json()) == (200, {"ok": True})
    assert [(s.method, s.path_qs, s.body) for s in upstream.seen] == [
        ("GET", "/one", b""), ("POST", "/two", b'{"n": 2}')]


async def test_pipelined_requests_are_answered_in_order(gateway: Gateway, echo: EchoUpstream) -> None:
    async with connect(gateway.port) as (reader, writer):
        writer.write(request("GET", "/first", echo.url) + request("POST", "/second", echo.url, body=b"2"))
        first = await read_response(reader)
        second = await read_response(reader)

    assert (first.status, first.body) == (200, b"GET /first")
    assert (second.status, second.body) == (200, b"POST /second")
    assert echo.seen == [("GET", "/first", b""), ("POST", "/second", b"2")]


async def test_chunked_request_body_reaches_the_upstream_byte_for_byte(gateway: Gateway, upstream: Upstream) -> None:
    chunks = [b'{"jsonrpc":', b' "2.0",\r\n', bytes(range(256)), b"0\r\n\r\n", b"}"]

    async with connect(gateway.port) as (reader, writer):
        writer.write(request("POST", "/mcp", upstream.url, extra="Transfer-Encoding: chunked\r\n"))
        for chunk in chunks:
            await asyncio.sleep(0.02)
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        await asyncio.sleep(0.02)
        writer.write(b"0\r\n\r\n")
        response = await read_response(reader)

    assert response.status == 200
    [seen] = upstream.seen
    assert seen.body == b"".join(chunks)


async def test_head_gets_no_body_and_the_connection_then_serves_a_get(
    gateway: Gateway, aiohttp_server: AiohttpServer
) -> None:
    async def sized(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 1000)

    server = await serve(aiohttp_server, sized)

    async with connect(gateway.port) as (reader, writer):
        writer.write(request("HEAD", "/f", server.make_url("")))
        head = await read_response(reader, head=True)
        writer.write(request("GET", "/f", server.make_url("")))
        get = await read_response(reader)

    assert head.status == 200
    assert head.headers.get("Content-Length", "1000") == "1000"
    assert head.status_line.startswith(b"HTTP/1.1 200")
    assert (get.status_line[:12], get.body) == (b"HTTP/1.1 200", b"x" * 1000)


# --- connection close ------------------------------------------------------------------------------

async def test_http10_request_without_keep_alive_is_answered_then_closed(gateway: Gateway, upstream: Upstream) -> None:
    async with connect(gateway.port) as (reader, writer):
        writer.write(request("GET", "/old", upstream.url, version="1.0"))
        response = await read_response(reader)
        if response.framing != "eof":
            await assert_closed_by_server(reader)

    assert response.framing != "chunked"
    assert (response.status, response.json()) == (200, {"ok": True})
    assert [s.path_qs for s in upstream.seen] == ["/old"]


async def test_connection_close_is_answered_with_connection_close_then_closed(
    gateway: Gateway, upstream: Upstream
) -> None:
    async with connect(gateway.port) as (reader, writer):
        writer.write(request("GET", "/bye", upstream.url, extra="Connection: close\r\n"))
        response = await read_response(reader)
        await assert_closed_by_server(reader)

    assert response.status == 200
    assert "close" in [token.strip().lower() for token in response.headers.get("Connection", "").split(",")]


# --- malformed and oversized requests -------------------------------------------------------------

@pytest.mark.parametrize("request_line", [b"GARBAGE", b"GET / HTTP/9.9junk"])
async def test_malformed_request_line_gets_400_and_a_closed_connection(
    gateway: Gateway, upstream: Upstream, request_line: bytes
) -> None:
    async with connect(gateway.port) as (reader, writer):
        writer.write(request_line + f"\r\nHost: gw\r\n{MCP_PROXY_URL}: {upstream.url}\r\n\r\n".encode())
        response = await read_response(reader)
        await assert_closed_by_server(reader)

    assert (response.status, json.loads(response.body)["code"]) == (400, "bad_request")
    assert upstream.seen == []


async def test_huge_header_gets_431_and_a_closed_connection_and_the_gateway_serves_on(
    aiohttp_client: AiohttpClient, upstream: Upstream
) -> None:
    gateway = await serve_gateway(aiohttp_client, max_header_size=4096)

    async with connect(gateway.port) as (reader, writer):
        writer.write(request("GET", "/big", upstream.url, extra=f"X-Big: {'v' * 200_000}\r\n"))
        response = await read_response(reader)
        await assert_closed_by_server(reader)
    async with connect(gateway.port) as (reader, writer):
        writer.write(request("GET", "/after", upstream.url))
        after = await read_response(reader)

    assert (response.status, json.loads(response.body)["code"]) == (431, "headers_too_large")
    assert after.status == 200
    assert [s.path_qs for s in upstream.seen] == ["/after"]


async def test_a_head_that_never_ends_is_refused_before_it_is_held_whole(
    aiohttp_client: AiohttpClient, upstream: Upstream
) -> None:
    gateway = await serve_gateway(aiohttp_client, max_header_size=4096)

    async with connect(gateway.port) as (reader, writer):
        writer.write(f"GET /endless HTTP/1.1\r\nHost: gw\r\n{MCP_PROXY_URL}: {upstream.url}\r\nX-Big: ".encode())
        for _ in range(40):  # 40 x 4 KiB of one header value, in separate reads, never ended
            writer.write(b"v" * 4096)
            await writer.drain()
            await asyncio.sleep(0.005)
        response = await read_response(reader)
        await assert_closed_by_server(reader)

    assert (response.status, json.loads(response.body)["code"]) == (431, "headers_too_large")
    assert upstream.seen == []


# --- the client going away --------------------------------------------------------------------------

async def test_client_disconnect_cancels_the_slow_upstream_call(
    gateway: Gateway, aiohttp_server: AiohttpServer
) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        started.set()
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return web.Response(text="late")

    server = await serve(aiohttp_server, slow)

    async with connect(gateway.port) as (_, writer):
        writer.write(request("GET", "/slow", server.make_url("")))
        async with asyncio.timeout(2):
            await started.wait()
        await asyncio.sleep(0.2)
    async with asyncio.timeout(3):
        await cancelled.wait()


@pytest.mark.parametrize(("declared", "sent"), [(1000, 500), (200_000, 100_000)], ids=["small", "streamed"])
async def test_truncated_request_body_never_reaches_the_upstream_as_whole(
    gateway: Gateway, aiohttp_server: AiohttpServer, upstream: Upstream, declared: int, sent: int
) -> None:
    outcomes: list[str] = []
    reached = asyncio.Event()

    async def read_all(request: web.Request) -> web.Response:
        try:
            body = await request.read()
        except BaseException as exc:
            outcomes.append(exc.__class__.__name__)
            raise
        finally:
            reached.set()
        outcomes.append(f"complete {len(body)}")
        return web.Response(text="read")

    server = await serve(aiohttp_server, read_all)

    async with connect(gateway.port) as (_, writer):
        writer.write(request("POST", "/mcp", server.make_url(""), extra=f"Content-Length: {declared}\r\n")
                     + b"x" * sent)
        await writer.drain()
        await asyncio.sleep(0.1)
    with suppress(TimeoutError):  # the upstream may rightly never be called: a negative, waited for briefly
        async with asyncio.timeout(0.5):
            await reached.wait()
    async with connect(gateway.port) as (reader, writer):
        writer.write(request("GET", "/next", upstream.url))
        after = await read_response(reader)

    assert not any(outcome.startswith("complete") for outcome in outcomes), outcomes
    assert after.status == 200


# --- response bodies --------------------------------------------------------------------------------

EIGHT_MB = 8 * 1024 * 1024
BLOCK = 64 * 1024


async def test_large_response_read_slowly_arrives_intact(gateway: Gateway, aiohttp_server: AiohttpServer) -> None:
    payload = os.urandom(EIGHT_MB)

    async def large(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = EIGHT_MB
        await response.prepare(request)
        for offset in range(0, EIGHT_MB, BLOCK):
            await response.write(payload[offset:offset + BLOCK])
        await response.write_eof()
        return response

    server = await serve(aiohttp_server, large)
    raw = bytearray()

    async with connect(gateway.port) as (reader, writer):
        writer.write(request("GET", "/large", server.make_url(""), extra="Connection: close\r\n"))
        async with asyncio.timeout(10):
            while chunk := await reader.read(BLOCK):
                raw += chunk
                await asyncio.sleep(0.001)
    response = await parse_response(bytes(raw))

    assert response.status == 200
    assert (len(response.body), hashlib.sha256(response.body).hexdigest()) == (
        EIGHT_MB, hashlib.sha256(payload).hexdigest())


CHUNKS = [b"alpha-" * 100, b"beta\r\n0\r\n\r\n", bytes(range(256)) * 40, b"omega"]


async def chunked_upstream(aiohttp_server: AiohttpServer) -> TestServer:
    """Answers /chunks with CHUNKS as a chunked body (no Content-Length), a little apart; /small with b"ok"."""

    async def answer(request: web.Request) -> web.StreamResponse:
        if request.path == "/small":
            return web.Response(body=b"ok")
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for chunk in CHUNKS:
            await response.write(chunk)
            await asyncio.sleep(0.01)
        await response.write_eof()
        return response

    return await serve(aiohttp_server, answer)


async def test_chunked_upstream_response_reaches_an_http11_client_intact_and_the_connection_is_reused(
    gateway: Gateway, aiohttp_server: AiohttpServer
) -> None:
    server = await chunked_upstream(aiohttp_server)

    async with connect(gateway.port) as (reader, writer):
        writer.write(request("GET", "/chunks", server.make_url("")))
        streamed = await read_response(reader)
        writer.write(request("GET", "/small", server.make_url("")))
        small = await read_response(reader)

    assert (streamed.status, streamed.body) == (200, b"".join(CHUNKS))
    assert streamed.framing in ("chunked", "length")
    assert (small.status, small.body) == (200, b"ok")


async def test_chunked_upstream_response_reaches_an_http10_client_intact(
    gateway: Gateway, aiohttp_server: AiohttpServer
) -> None:
    server = await chunked_upstream(aiohttp_server)

    async with connect(gateway.port) as (reader, writer):
        writer.write(request("GET", "/chunks", server.make_url(""), version="1.0"))
        response = await read_response(reader)

    assert response.framing in ("eof", "length")  # an HTTP/1.0 client cannot decode chunked (RFC 9112 §6.1)
    assert (response.status, response.body) == (200, b"".join(CHUNKS))


async def test_refused_upload_still_gets_its_complete_401(
    aiohttp_client: AiohttpClient, upstream: Upstream, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("5ecret-one\n")
    gateway = await serve_gateway(aiohttp_client, auth_token_file=str(tokens))
    body = b"y" * 2_000_000

    async with connect(gateway.port) as (reader, writer):
        writer.write(request("POST", "/mcp", upstream.url, body=body))
        response = await read_response(reader)

    assert response.status_line.startswith(b"HTTP/1.1 401 ")
    assert response.json() == {"error": "a valid Authorization: Bearer token is required", "code": "unauthorized"}
    assert upstream.seen == []


EVENT_GAP_S = 0.1


async def test_each_sse_event_arrives_before_the_next_is_sent(gateway: Gateway, aiohttp_server: AiohttpServer) -> None:
    events = [f"id: {n}\ndata: event-{n}\n\n".encode() for n in range(3)]
    sent_at: list[float] = []

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for n, event in enumerate(events):
            if n:
                await asyncio.sleep(EVENT_GAP_S)
            sent_at.append(time.monotonic())
            await response.write(event)
        await response.write_eof()
        return response

    server = await serve(aiohttp_server, stream)
    raw = bytearray()
    arrived_at: list[float] = []

    async with connect(gateway.port) as (reader, writer):
        writer.write(request("GET", "/sse", server.make_url(""),
                             extra="Accept: text/event-stream\r\nConnection: close\r\n"))
        async with asyncio.timeout(5):
            while chunk := await reader.read(65536):
                raw += chunk
                now = time.monotonic()
                while len(arrived_at) < len(events) and f"event-{len(arrived_at)}".encode() in raw:
                    arrived_at.append(now)
    response = await parse_response(bytes(raw))

    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.body == b"".join(events)
    assert len(arrived_at) == 3
    before_next = [arrived < next_sent for arrived, next_sent in zip(arrived_at, sent_at[1:], strict=False)]
    assert all(before_next), (arrived_at, sent_at)
    gaps_ms = [round((b - a) * 1000) for a, b in itertools.pairwise(arrived_at)]
    assert min(gaps_ms) >= 50, gaps_ms
