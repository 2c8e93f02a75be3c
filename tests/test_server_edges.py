"""Edge cases of the data plane's own HTTP/1.1 server (gateway/server.py), on raw sockets.

Pipelining, request bodies, clients leaving at every stage, framing of bodiless answers, Upgrade
requests, the drain, and what must pass through unchanged. Most tests end by checking that the server
let go of what it held (settled): no connection left open, no request counted in flight.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import cast

import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway import server as server_module
from gateway.app import DATA_PLANE, LIMITS, DataPlaneRunner, build_gateway_app
from gateway.headers import MCP_PROXY_URL
from gateway.messages import Request, Response, StreamResponse
from gateway.server import Server
from tests.conftest import EchoUpstream, Gateway, Upstream, gateway_settings, serve_gateway
from tests.test_http_semantics import (
    RawResponse,
    assert_closed_by_server,
    connect,
    parse_response,
    read_response,
    request,
    serve,
)


async def eventually(check: Callable[[], bool], timeout_s: float = 3.0) -> bool:
    """Whether check() became true within timeout_s (polled)."""
    for _ in range(int(timeout_s / 0.01)):
        if check():
            return True
        await asyncio.sleep(0.01)
    return check()


async def settled(gateway: Gateway, timeout_s: float = 3.0) -> None:
    """The server let go of everything: no connection open, nothing counted in flight."""
    app = gateway.app
    assert app is not None
    server, limits = app[DATA_PLANE], app[LIMITS]
    await eventually(lambda: not server.connections and not limits.inflight, timeout_s)
    assert (len(server.connections), limits.inflight) == (0, 0)


def json_field(response: RawResponse, name: str) -> object:
    body = response.json()
    assert isinstance(body, dict)
    return body.get(name)


async def read_until_closed(reader: asyncio.StreamReader, timeout_s: float = 5.0) -> bytes:
    async with asyncio.timeout(timeout_s):
        try:
            return await reader.read()
        except ConnectionResetError:
            return b""


@asynccontextmanager
async def raw_upstream(answer: bytes) -> AsyncIterator[tuple[str, list[bytes]]]:
    """An upstream that answers each request head with `answer`, byte for byte; records the heads."""
    heads: list[bytes] = []
    writers: list[asyncio.StreamWriter] = []

    async def serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                heads.append(await reader.readuntil(b"\r\n\r\n"))
                writer.write(answer)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve_one, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", heads
    finally:
        server.close()
        for writer in writers:
            writer.close()
        with suppress(TimeoutError):
            async with asyncio.timeout(2):
                await server.wait_closed()
                for writer in writers:
                    with suppress(ConnectionError):
                        await writer.wait_closed()


H2C = "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"


# --- pipelining ---------------------------------------------------------------------------------------

async def test_a_request_pipelined_during_an_sse_stream_is_answered_after_it(
    gateway: Gateway, aiohttp_server: AiohttpServer, echo: EchoUpstream
) -> None:
    second_sent = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: one\n\n")
        async with asyncio.timeout(3):
            await second_sent.wait()
        await asyncio.sleep(0.05)
        await response.write(b"data: two\n\n")
        await response.write_eof()
        return response

    server = await serve(aiohttp_server, stream)

    async with connect(gateway.port) as (reader, writer):
        writer.write(request("GET", "/sse", server.make_url(""), extra="Accept: text/event-stream\r\n"))
        async with asyncio.timeout(3):
            first_part = await reader.readuntil(b"data: one\n\n")
        writer.write(request("POST", "/after", echo.url, body=b"pipelined"))
        await writer.drain()
        second_sent.set()
        async with asyncio.timeout(3):
            sse = await parse_response(first_part + await reader.readuntil(b"\r\n0\r\n\r\n"))
        after = await read_response(reader)

    assert (sse.status, sse.framing, sse.body.endswith(b"data: two\n\n")) == (200, "chunked", True)
    assert (after.status, after.body) == (200, b"POST /after")
    assert echo.seen == [("POST", "/after", b"pipelined")]
    await settled(gateway)


async def test_many_pipelined_requests_in_one_write_are_all_answered_in_order(
    gateway: Gateway, echo: EchoUpstream
) -> None:
    count = 100
    batch = b"".join(request("GET", f"/n/{n}", echo.url) for n in range(count))

    async with connect(gateway.port) as (reader, writer):
        writer.write(batch)
        responses = [await read_response(reader) for _ in range(count)]

    assert [r.body for r in responses] == [f"GET /n/{n}".encode() for n in range(count)]
    assert [path for _, path, _ in echo.seen] == [f"/n/{n}" for n in range(count)]
    await settled(gateway)


async def test_a_pipelined_large_body_behind_a_slow_bodiless_request_arrives_whole(
    gateway: Gateway, aiohttp_server: AiohttpServer
) -> None:
    payload = os.urandom(1_500_000)  # past the read-ahead: reading pauses until the first is answered
    digests: list[tuple[str, int, str]] = []

    async def answer(request: web.Request) -> web.Response:
        if request.path == "/slow":
            await asyncio.sleep(0.3)
        body = await request.content.read()  # no client_max_size on a stream
        digests.append((request.path, len(body), hashlib.sha256(body).hexdigest()))
        return web.Response(text=request.path)

    server = await serve(aiohttp_server, answer)
    url = server.make_url("")

    async with connect(gateway.port) as (reader, writer):
        writer.write(request("GET", "/slow", url) + request("POST", "/big", url, body=payload)
                     + request("GET", "/last", url))
        responses = [await read_response(reader) for _ in range(3)]

    assert [(r.status, r.body) for r in responses] == [(200, b"/slow"), (200, b"/big"), (200, b"/last")]
    assert digests == [("/slow", 0, hashlib.sha256(b"").hexdigest()),
                       ("/big", len(payload), hashlib.sha256(payload).hexdigest()),
                       ("/last", 0, hashlib.sha256(b"").hexdigest())]
    await settled(gateway)


# --- request bodies -----------------------------------------------------------------------------------

async def test_chunked_body_with_extensions_and_trailers_reaches_the_upstream_and_the_connection_serves_on(
    gateway: Gateway, echo: EchoUpstream
) -> None:
    async with connect(gateway.port) as (reader, writer):
        writer.write(request("POST", "/chunked", echo.url, extra="Transfer-Encoding: chunked\r\n")
                     + b"5;name=value\r\nhello\r\n6;quoted=\"a b\"\r\n world\r\n0\r\nX-Trailer: t\r\nX-Other: u\r\n\r\n"
                     + request("GET", "/next", echo.url))
        first = await read_response(reader)
        second = await read_response(reader)

    assert (first.status, second.status) == (200, 200)
    assert echo.seen == [("POST", "/chunked", b"hello world"), ("GET", "/next", b"")]
    await settled(gateway)


async def test_a_few_megabytes_to_a_slow_reader_arrive_whole(
    gateway: Gateway, aiohttp_server: AiohttpServer
) -> None:
    payload = os.urandom(4 * 1024 * 1024)
    got: list[tuple[int, str]] = []
    data_plane = gateway.app[DATA_PLANE]

    async def slow_reader(request: web.Request) -> web.Response:
        digest, total = hashlib.sha256(), 0
        while chunk := await request.content.read(32 * 1024):
            digest.update(chunk)
            total += len(chunk)
            await asyncio.sleep(0.0005)
        got.append((total, digest.hexdigest()))
        return web.Response(text="read")

    server = await serve(aiohttp_server, slow_reader)

    for extra in ("", "Transfer-Encoding: chunked\r\n"):
        async with connect(gateway.port) as (reader, writer):
            if extra:
                writer.write(request("POST", "/up", server.make_url(""), extra=extra))
                for offset in range(0, len(payload), 300_000):
                    part = payload[offset:offset + 300_000]
                    writer.write(b"%x\r\n%b\r\n" % (len(part), part))
                writer.write(b"0\r\n\r\n")
            else:
                writer.write(request("POST", "/up", server.make_url(""), body=payload))
            response = await read_response(reader, timeout_s=10)
            assert (response.status, response.body) == (200, b"read")

    assert got == [(len(payload), hashlib.sha256(payload).hexdigest())] * 2
    assert data_plane.read_pauses  # the read-ahead filled up: reading paused and resumed
    await settled(gateway)


async def test_content_length_zero_and_a_delayed_body(gateway: Gateway, echo: EchoUpstream) -> None:
    async with connect(gateway.port) as (reader, writer):
        writer.write(request("POST", "/empty", echo.url, extra="Content-Length: 0\r\n"))
        empty = await read_response(reader)
        writer.write(request("POST", "/late", echo.url, extra="Content-Length: 10\r\n"))
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(b"01234")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"56789")
        late = await read_response(reader)

    assert (empty.status, empty.body, late.status, late.body) == (200, b"POST /empty", 200, b"POST /late")
    assert echo.seen == [("POST", "/empty", b""), ("POST", "/late", b"0123456789")]
    await settled(gateway)


async def test_expect_100_continue_with_a_streamed_body(gateway: Gateway, echo: EchoUpstream) -> None:
    payload = b"z" * 200_000

    async with connect(gateway.port) as (reader, writer):
        writer.write(request("POST", "/cont", echo.url,
                             extra="Expect: 100-continue\r\nTransfer-Encoding: chunked\r\n"))
        interim = await read_response(reader)
        writer.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(payload), payload))
        final = await read_response(reader)
        writer.write(request("GET", "/then", echo.url))
        then = await read_response(reader)

    assert interim.status_line == b"HTTP/1.1 100 Continue"
    assert (final.status, final.body, then.body) == (200, b"POST /cont", b"GET /then")
    assert echo.seen == [("POST", "/cont", payload), ("GET", "/then", b"")]
    await settled(gateway)


# --- the client leaving --------------------------------------------------------------------------------

async def test_client_leaving_mid_head_and_mid_body_leaves_nothing_behind(
    gateway: Gateway, upstream: Upstream
) -> None:
    async with connect(gateway.port) as (_, writer):
        writer.write(b"POST /mcp HTTP/1.1\r\nHost: gw\r\nX-Half: ")
        await writer.drain()
        await asyncio.sleep(0.05)
    async with connect(gateway.port) as (_, writer):
        writer.write(request("POST", "/mcp", upstream.url, extra="Content-Length: 1000000\r\n") + b"x" * 400_000)
        await writer.drain()
        await asyncio.sleep(0.1)
    async with connect(gateway.port) as (_, writer):
        writer.write(request("POST", "/mcp", upstream.url, extra="Transfer-Encoding: chunked\r\n") + b"10\r\nabc")
        await writer.drain()
        await asyncio.sleep(0.1)

    await settled(gateway)
    assert upstream.seen == []


async def test_client_leaving_mid_response_and_during_sse_leaves_nothing_behind(
    gateway: Gateway, aiohttp_server: AiohttpServer
) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        kind = "text/event-stream" if request.path == "/sse" else "application/octet-stream"
        response = web.StreamResponse(headers={"Content-Type": kind})
        await response.prepare(request)
        with suppress(ConnectionError):
            for _ in range(200):
                await response.write(b"data: x\n\n" if kind.startswith("text") else b"y" * 65536)
                await asyncio.sleep(0.01)
        return response

    server = await serve(aiohttp_server, answer)

    for path in ("/big", "/sse"):
        async with connect(gateway.port) as (reader, writer):
            writer.write(request("GET", path, server.make_url("")))
            async with asyncio.timeout(3):
                await reader.readuntil(b"\r\n\r\n")
                await reader.read(100)

    await settled(gateway)


# --- framing ----------------------------------------------------------------------------------------

async def test_http10_with_and_without_keep_alive(gateway: Gateway, echo: EchoUpstream) -> None:
    async with connect(gateway.port) as (reader, writer):
        writer.write(request("GET", "/ka", echo.url, version="1.0", extra="Connection: keep-alive\r\n"))
        kept = await read_response(reader)
        writer.write(request("GET", "/plain", echo.url, version="1.0"))
        plain = await read_response(reader)
        await assert_closed_by_server(reader)

    assert (kept.status, kept.body, kept.framing, kept.headers.get("Connection", "").lower()) == (
        200, b"GET /ka", "length", "keep-alive")
    assert (plain.status, plain.body) == (200, b"GET /plain")
    assert plain.headers.get("Connection", "").lower() == "close"
    await settled(gateway)


async def test_head_on_a_chunked_upstream_response_has_no_body_and_the_connection_serves_on(
    gateway: Gateway, echo: EchoUpstream
) -> None:
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n"

    async with raw_upstream(answer) as (url, _), connect(gateway.port) as (reader, writer):
        writer.write(request("HEAD", "/h", url) + request("GET", "/after", echo.url))
        head = await read_response(reader, head=True)
        after = await read_response(reader)

    assert head.status == 200
    assert "Transfer-Encoding" not in head.headers
    assert (after.status_line, after.body) == (b"HTTP/1.1 200 OK", b"GET /after")  # no stray body bytes before it
    await settled(gateway)


@pytest.mark.parametrize("status", [204, 304])
async def test_bodiless_statuses_carry_no_body_and_no_transfer_encoding(
    gateway: Gateway, aiohttp_server: AiohttpServer, echo: EchoUpstream, status: int
) -> None:
    async def bodiless(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"ETag": '"v1"'})

    server = await serve(aiohttp_server, bodiless)

    async with connect(gateway.port) as (reader, writer):
        writer.write(request("GET", "/b", server.make_url("")) + request("GET", "/after", echo.url))
        bodiless_response = await read_response(reader)
        after = await read_response(reader)

    assert bodiless_response.status == status
    assert "Transfer-Encoding" not in bodiless_response.headers
    assert (after.status_line[:12], after.body) == (b"HTTP/1.1 200", b"GET /after")
    await settled(gateway)


async def test_413_on_a_streamed_body_over_the_limit(aiohttp_client: AiohttpClient, echo: EchoUpstream) -> None:
    gateway = await serve_gateway(aiohttp_client, max_body_size=1000)

    async with connect(gateway.port) as (reader, writer):
        writer.write(request("POST", "/big", echo.url, extra="Transfer-Encoding: chunked\r\n"))
        for _ in range(5):
            writer.write(b"190\r\n" + b"q" * 400 + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.02)
        with suppress(ConnectionError):
            writer.write(b"0\r\n\r\n")
        response = await read_response(reader)
        await assert_closed_by_server(reader, timeout_s=3)

    assert (response.status, json_field(response, "code")) == (413, "body_too_large")
    assert response.headers.get("Connection", "").lower() == "close"
    await settled(gateway)


async def test_401_to_a_request_whose_body_was_not_read(
    aiohttp_client: AiohttpClient, echo: EchoUpstream, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("5ecret-one\n")
    gateway = await serve_gateway(aiohttp_client, auth_token_file=str(tokens))

    async with connect(gateway.port) as (reader, writer):  # the body arrives whole with the head
        writer.write(request("POST", "/a", echo.url, body=b"small") + request("GET", "/b", echo.url))
        first = await read_response(reader)
        second = await read_response(reader)
    async with connect(gateway.port) as (reader, writer):  # the body never comes: the answer does not wait
        writer.write(request("POST", "/c", echo.url, extra="Content-Length: 5000000\r\n"))
        third = await read_response(reader)
        await assert_closed_by_server(reader, timeout_s=3)

    assert [first.status, second.status, third.status] == [401, 401, 401]
    assert third.headers.get("Connection", "").lower() == "close"
    assert echo.seen == []
    await settled(gateway)


# --- Upgrade -------------------------------------------------------------------------------------------

async def test_h2c_upgrade_get_is_answered_as_http11_then_a_pipelined_request(
    gateway: Gateway, echo: EchoUpstream
) -> None:
    async with connect(gateway.port) as (reader, writer):
        writer.write(request("GET", "/up", echo.url, extra=H2C) + request("GET", "/next", echo.url))
        upgraded = await read_response(reader)
        after = await read_response(reader)

    assert (upgraded.status_line, upgraded.body) == (b"HTTP/1.1 200 OK", b"GET /up")
    assert (after.status_line, after.body) == (b"HTTP/1.1 200 OK", b"GET /next")
    assert [path for _, path, _ in echo.seen] == ["/up", "/next"]
    await settled(gateway)


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_h2c_upgrade_post_with_a_body_is_forwarded_whole(
    gateway: Gateway, echo: EchoUpstream, framing: str
) -> None:
    body = b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}'
    if framing == "length":
        first = request("POST", "/mcp", echo.url, extra=H2C, body=body)
    else:
        first = (request("POST", "/mcp", echo.url, extra=H2C + "Transfer-Encoding: chunked\r\n")
                 + b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body))

    async with connect(gateway.port) as (reader, writer):
        writer.write(first + request("GET", "/next", echo.url))
        posted = await read_response(reader)
        after = await read_response(reader)

    assert (posted.status, posted.body) == (200, b"POST /mcp")
    assert (after.status, after.body) == (200, b"GET /next")
    assert echo.seen == [("POST", "/mcp", body), ("GET", "/next", b"")]
    await settled(gateway)


async def test_h2c_upgrade_post_with_expect_100_continue(gateway: Gateway, echo: EchoUpstream) -> None:
    body = b"e" * 100_000  # curl --http2 asks for 100-continue before a large body

    async with connect(gateway.port) as (reader, writer):
        expect = f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\n"
        writer.write(request("POST", "/mcp", echo.url, extra=H2C + expect))
        interim = await read_response(reader)
        writer.write(body + request("GET", "/next", echo.url))
        posted = await read_response(reader)
        after = await read_response(reader)

    assert (interim.status, posted.status, posted.body, after.body) == (100, 200, b"POST /mcp", b"GET /next")
    assert echo.seen == [("POST", "/mcp", body), ("GET", "/next", b"")]
    await settled(gateway)


@pytest.mark.parametrize("line", [b"X-Bad: one\rtwo", b"X-Bad: one\r\n two", b"X-Bad: one\ntwo"],
                         ids=["bare-cr", "obs-fold", "bare-lf"])
async def test_cr_or_lf_inside_a_request_header_value_is_refused(
    gateway: Gateway, echo: EchoUpstream, line: bytes
) -> None:
    async with connect(gateway.port) as (reader, writer):
        writer.write(b"GET /x HTTP/1.1\r\nHost: gw\r\n" + f"{MCP_PROXY_URL}: {echo.url}\r\n".encode()
                     + line + b"\r\n\r\n")
        response = await read_response(reader)
        await assert_closed_by_server(reader)

    assert (response.status, json_field(response, "code")) == (400, "bad_request")
    assert echo.seen == []
    await settled(gateway)


# --- what passes through -----------------------------------------------------------------------------

async def test_non_ascii_bytes_in_header_values_reach_the_upstream_unchanged(
    gateway: Gateway, upstream_client: str
) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with raw_upstream(answer) as (url, heads), connect(gateway.port) as (reader, writer):
        writer.write(b"GET /caf%C3%A9/%FF?q=%e9&r=\xe9 HTTP/1.1\r\nHost: gw\r\n".replace(b"&r=\xe9", b"&r=1")
                     + f"{MCP_PROXY_URL}: {url}\r\n".encode()
                     + b"X-Utf8: caf\xc3\xa9\r\nX-Latin1: \xe9t\xe9 \xff\r\n\r\n")
        response = await read_response(reader)
        # raw non-ASCII bytes in the request target are not HTTP (RFC 9112 §3.2): refused, as aiohttp did
        writer.write(b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: gw\r\n" + f"{MCP_PROXY_URL}: {url}\r\n\r\n".encode())
        refused = await read_response(reader)
        await assert_closed_by_server(reader)

    assert (response.status, response.body, refused.status) == (200, b"ok", 400)
    [head] = heads
    assert head.startswith(b"GET /caf%C3%A9/%FF?q=%e9&r=1 HTTP/1.1\r\n")
    assert b"\r\nX-Utf8: caf\xc3\xa9\r\n" in head
    if upstream_client == "lean":  # aiohttp's client drops the bytes that are not UTF-8 (its writer, not ours)
        assert b"\r\nX-Latin1: \xe9t\xe9 \xff\r\n" in head
    await settled(gateway)


async def test_absolute_form_targets_are_served(gateway: Gateway, echo: EchoUpstream) -> None:
    # A missing Host is a 400 (RFC 9112 §3.2; test_upstream_framing.py), an absolute-form target is served.
    async with connect(gateway.port) as (reader, writer):
        writer.write(request("GET", "http://x/abs?q=1", echo.url))
        absolute = await read_response(reader)

    assert absolute.status == 200
    assert [path for _, path, _ in echo.seen] == ["/abs?q=1"]
    await settled(gateway)


async def test_an_absolute_form_target_has_the_path_of_its_url(gateway: Gateway) -> None:
    async with connect(gateway.port) as (reader, writer):
        writer.write(b"GET http://gw:8080/health HTTP/1.1\r\nHost: gw\r\n\r\n")
        health = await read_response(reader)
        writer.write(b"GET HTTP://gw/health?x=1 HTTP/1.1\r\nHost: gw\r\n\r\n")
        upper = await read_response(reader)

    assert (health.status, json_field(health, "status")) == (200, "ok")  # as for GET /health
    assert (upper.status, json_field(upper, "status")) == (200, "ok")
    await settled(gateway)


def test_request_path_of_each_target_form() -> None:
    def path(target: str) -> str:
        connection = cast(server_module.ClientConnection, None)
        return Request(connection, "GET", target, "1.1", CIMultiDictProxy(CIMultiDict()), 0, True).path

    assert [path(t) for t in ("/a%20b?q", "http://h/a%20b?q", "https://h:1", "http://h?q", "*")] == [
        "/a b", "/a b", "/", "/", "*"]


async def test_a_folded_upstream_header_never_reaches_the_client_as_two_lines(gateway: Gateway) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Folded: one\r\n two\r\n\r\nok"  # obs-fold
    async with raw_upstream(answer) as (url, _), connect(gateway.port) as (reader, writer):
        writer.write(request("GET", "/folded", url))
        async with asyncio.timeout(3):
            head = await reader.readuntil(b"\r\n\r\n")
        response = await parse_response(head + await reader.read(int(dict(
            line.split(b": ", 1) for line in head[:-4].split(b"\r\n")[1:]).get(b"Content-Length", b"0"))))

    assert response.status in (200, 502)  # unfolded (aiohttp's parser) or refused (llhttp's)
    assert all(not line[:1].isspace() and b": " in line for line in head[:-4].split(b"\r\n")[1:]), head
    await settled(gateway)


# --- the drain ---------------------------------------------------------------------------------------

@asynccontextmanager
async def running(app: web.Application, shutdown_timeout: float) -> AsyncIterator[tuple[DataPlaneRunner, int]]:
    """The gateway app served on 127.0.0.1 as the CLI serves it; its runner and port. Cleaned up after."""
    runner = DataPlaneRunner(app, shutdown_timeout=shutdown_timeout)
    try:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        server = cast(asyncio.Server, site._server)  # uvloop's Server does not subclass asyncio's
        yield runner, int(server.sockets[0].getsockname()[1])
    finally:
        await runner.cleanup()


async def test_drain_closes_idle_connections_at_once_and_lets_in_flight_finish(
    aiohttp_server: AiohttpServer, upstream: Upstream
) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.4 if request.path == "/slow" else 5)
        return web.Response(text=f"done {request.path}")

    slow_server = await serve(aiohttp_server, slow)
    app = build_gateway_app(gateway_settings())
    async with running(app, shutdown_timeout=1.0) as (runner, port), connect(port) as (idle_reader, idle_writer), \
            connect(port) as (busy_reader, busy_writer), connect(port) as (stuck_reader, stuck_writer):
        idle_writer.write(request("GET", "/idle", upstream.url))
        assert (await read_response(idle_reader)).status == 200
        busy_writer.write(request("GET", "/slow", slow_server.make_url("")))
        stuck_writer.write(request("GET", "/stuck", slow_server.make_url("")))
        await asyncio.sleep(0.1)
        started = asyncio.get_running_loop().time()
        cleanup = asyncio.ensure_future(runner.cleanup())
        await assert_closed_by_server(idle_reader, timeout_s=0.3)
        busy = await read_response(busy_reader, timeout_s=2)
        await assert_closed_by_server(busy_reader, timeout_s=0.5)
        async with asyncio.timeout(3):
            await cleanup
        elapsed = asyncio.get_running_loop().time() - started
        stuck_rest = await read_until_closed(stuck_reader, timeout_s=1)

    assert (busy.status, busy.body) == (200, b"done /slow")
    assert busy.headers.get("Connection", "").lower() == "close"
    assert stuck_rest == b""  # cancelled after shutdown_timeout, with nothing written
    assert 0.9 < elapsed < 2.5, elapsed
    assert not app[DATA_PLANE].connections
    assert app[LIMITS].inflight == 0


async def test_drain_does_not_cut_a_large_reply_still_being_sent(aiohttp_server: AiohttpServer) -> None:
    payload = os.urandom(6 * 1024 * 1024)

    async def large(request: web.Request) -> web.Response:
        await asyncio.sleep(0.2)
        return web.Response(body=payload)

    large_server = await serve(aiohttp_server, large)
    async with running(build_gateway_app(gateway_settings()), shutdown_timeout=3.0) as (runner, port), \
            connect(port) as (reader, writer):
        writer.write(request("GET", "/large", large_server.make_url("")))
        await asyncio.sleep(0.05)
        cleanup = asyncio.ensure_future(runner.cleanup())
        raw = bytearray()
        async with asyncio.timeout(5):
            while chunk := await reader.read(65536):
                raw += chunk
                await asyncio.sleep(0.002)  # a slow reader: the tail still sits in the gateway's buffer
        async with asyncio.timeout(5):
            await cleanup

    head, _, body = bytes(raw).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert (len(body), hashlib.sha256(body).hexdigest()) == (len(payload), hashlib.sha256(payload).hexdigest())


# --- the server alone, with handlers that misbehave ----------------------------------------------------

@asynccontextmanager
async def bare_server(handler: Callable[[Request], Awaitable[Response | StreamResponse]]) -> AsyncIterator[
        tuple[int, Server]]:
    server = Server(handler, max_head_bytes=8192)
    listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
    try:
        yield listener.sockets[0].getsockname()[1], server
    finally:
        listener.close()
        server.pre_shutdown()
        async with asyncio.timeout(3):
            await server.shutdown(1.0)
            await listener.wait_closed()


async def test_a_reply_whose_head_cannot_be_written_gets_a_500_not_a_hang() -> None:
    async def bad_header(request: Request) -> Response:
        if request.path == "/bad":
            return Response(b"x", headers={"X-Bad": "split\r\nX-Injected: 1"})
        return Response(b"fine")

    async with bare_server(bad_header) as (port, server):
        async with connect(port) as (reader, writer):
            writer.write(b"GET /bad HTTP/1.1\r\nHost: x\r\n\r\n")
            response = await read_response(reader, timeout_s=2)
            await assert_closed_by_server(reader)
        assert await eventually(lambda: not server.connections, 2.0)

    assert response.status == 500
    assert b"X-Injected" not in response.status_line + b"".join(
        f"{name}: {value}".encode() for name, value in response.headers.items())


async def test_malformed_chunked_body_mid_stream_is_answered_and_the_connection_closed(
    gateway: Gateway, echo: EchoUpstream
) -> None:
    async with connect(gateway.port) as (reader, writer):
        writer.write(request("POST", "/bad-chunks", echo.url, extra="Transfer-Encoding: chunked\r\n")
                     + b"4\r\nabcd\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"zz-not-hex\r\n\r\n")
        response = await read_response(reader)
        await assert_closed_by_server(reader)

    assert (response.status, json_field(response, "code")) == (400, "bad_request")  # the caller's fault, not a 502
    assert response.headers.get("Connection", "").lower() == "close"
    assert not any(body == b"abcd" for _, _, body in echo.seen)  # never forwarded as if whole
    await settled(gateway)



async def test_a_handler_failing_during_an_upload_gets_its_500_to_the_client() -> None:
    async def fails(request: Request) -> Response:
        if request.path == "/fail":
            raise RuntimeError("boom")
        return Response(b"fine")

    async with bare_server(fails) as (port, server):
        async with connect(port) as (reader, writer):
            writer.write(b"POST /fail HTTP/1.1\r\nHost: x\r\nContent-Length: 3000000\r\n\r\n" + b"u" * 1_000_000)
            await asyncio.sleep(0.05)
            with suppress(ConnectionError):
                for _ in range(20):  # the rest of the body, sent while the answer is on its way
                    writer.write(b"u" * 100_000)
                    await writer.drain()
            response = await read_response(reader, timeout_s=2)
        assert await eventually(lambda: not server.connections, 2.0)

    assert (response.status, json_field(response, "code")) == (500, "internal_error")
    assert response.headers.get("Connection", "").lower() == "close"


async def test_pipelined_requests_past_the_queue_limit_arriving_during_a_slow_one(
    gateway: Gateway, aiohttp_server: AiohttpServer
) -> None:
    async def answer(request: web.Request) -> web.Response:
        if request.path == "/slow":
            await asyncio.sleep(0.3)
        return web.Response(text=request.path)

    server = await serve(aiohttp_server, answer)
    url = server.make_url("")
    count = 40

    async with connect(gateway.port) as (reader, writer):
        writer.write(request("GET", "/slow", url))
        for n in range(count):
            writer.write(request("POST", f"/p/{n}", url, body=b"b" * n + b"."))
            await writer.drain()
            await asyncio.sleep(0.002)
        responses = [await read_response(reader) for _ in range(count + 1)]

    assert [r.body for r in responses] == [b"/slow"] + [f"/p/{n}".encode() for n in range(count)]
    await settled(gateway)


async def test_client_leaving_while_reading_is_paused_leaves_nothing_behind(
    gateway: Gateway, aiohttp_server: AiohttpServer
) -> None:
    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        with suppress(ConnectionError):
            for _ in range(100):
                await response.write(b"data: tick\n\n")
                await asyncio.sleep(0.02)
        return response

    server = await serve(aiohttp_server, stream)
    url = server.make_url("")

    async with connect(gateway.port) as (reader, writer):
        # an event stream, then a large upload queued behind it: its read-ahead fills and reading pauses
        writer.write(request("GET", "/sse", url) + request("POST", "/queued", url, body=b"w" * 2_000_000))
        async with asyncio.timeout(3):
            await reader.readuntil(b"data: tick\n\n")
        await asyncio.sleep(0.1)

    await settled(gateway)


async def test_http10_keep_alive_with_a_streamed_reply_is_close_delimited(
    gateway: Gateway, aiohttp_server: AiohttpServer
) -> None:
    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for part in (b"one-", b"two-", b"three"):
            await response.write(part)
            await asyncio.sleep(0.01)
        await response.write_eof()
        return response

    server = await serve(aiohttp_server, chunked)

    async with connect(gateway.port) as (reader, writer):
        writer.write(request("GET", "/s", server.make_url(""), version="1.0", extra="Connection: keep-alive\r\n"))
        response = await read_response(reader)

    assert (response.status, response.framing, response.body) == (200, "eof", b"one-two-three")
    assert response.headers.get("Connection", "").lower() == "close"
    await settled(gateway)


async def test_idle_and_half_sent_heads_are_closed_after_the_idle_timeout(
    gateway: Gateway, echo: EchoUpstream, aiohttp_server: AiohttpServer
) -> None:
    gateway.app[DATA_PLANE].idle_timeout_s = 0.25  # before the first connection starts the sweep

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.6)
        return web.Response(text="slow")

    slow_server = await serve(aiohttp_server, slow)

    async with connect(gateway.port) as (idle_reader, idle_writer), \
            connect(gateway.port) as (half_reader, half_writer), connect(gateway.port) as (busy_reader, busy_writer):
        idle_writer.write(request("GET", "/once", echo.url))
        assert (await read_response(idle_reader)).status == 200
        half_writer.write(b"GET /never-ends HTTP/1.1\r\nHost: gw\r\n")
        busy_writer.write(request("GET", "/slow", slow_server.make_url("")))
        await assert_closed_by_server(idle_reader, timeout_s=1.0)
        await assert_closed_by_server(half_reader, timeout_s=1.0)
        busy = await read_response(busy_reader)  # in flight longer than the idle timeout: not cut

    assert (busy.status, busy.body) == (200, b"slow")
    await settled(gateway)


async def test_drain_answers_the_request_in_flight_and_drops_the_one_queued_behind_it(
    aiohttp_server: AiohttpServer
) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.3)
        return web.Response(text=f"done {request.path}")

    slow_server = await serve(aiohttp_server, slow)
    url = slow_server.make_url("")
    app = build_gateway_app(gateway_settings())
    async with running(app, shutdown_timeout=1.0) as (runner, port), connect(port) as (reader, writer):
        writer.write(request("GET", "/first", url) + request("GET", "/queued", url))
        await asyncio.sleep(0.1)
        async with asyncio.timeout(3):
            await runner.cleanup()
        first = await read_response(reader)
        rest = await read_until_closed(reader, timeout_s=1)

    assert (first.status, first.body, first.headers.get("Connection", "").lower()) == (200, b"done /first", "close")
    assert rest == b""
    assert not app[DATA_PLANE].connections
    assert app[LIMITS].inflight == 0
