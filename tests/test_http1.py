"""The lean transport against scripted upstreams on 127.0.0.1: framing, keep-alive, failures."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer
from yarl import URL

from gateway.config import Settings
from gateway.errors import BadUpstreamResponse
from gateway.http1 import BUFFER_HIGH_BYTES, Http1Client, Http1Response

Script = Callable[[bytes], bytes]


@dataclass(slots=True)
class RawUpstream:
    """A TCP server that answers each request head with bytes from a script, and counts connections."""

    url: URL
    connections: int = 0
    heads: list[bytes] = field(default_factory=list)


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[..., Awaitable[RawUpstream]]]:
    servers: list[asyncio.Server] = []

    async def start(script: Script, close_after: bool = False) -> RawUpstream:
        upstream = RawUpstream(url=URL("http://127.0.0.1"))

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            upstream.connections += 1
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    upstream.heads.append(head)
                    writer.write(script(head))
                    await writer.drain()
                    if close_after:
                        break
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        servers.append(server)
        upstream.url = URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        return upstream

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def client() -> AsyncIterator[Http1Client]:
    http1 = Http1Client(Settings(connect_timeout_s=2.0))
    yield http1
    await http1.close()


async def read_all(response: Http1Response) -> bytes:
    body = b""
    while chunk := await asyncio.wait_for(response.read_chunk(), 5):
        body += chunk
    response.release()
    return body


def answer(raw: bytes) -> Script:
    return lambda head: raw


async def test_keep_alive_reuses_one_connection(aiohttp_server: AiohttpServer, client: Http1Client) -> None:
    peers: list[object] = []

    async def record(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        return web.Response(body=await request.read())

    app = web.Application()
    app.router.add_post("/mcp", record)
    server = await aiohttp_server(app)

    bodies = [await read_all(await client.request("POST", server.make_url("/mcp"), {}, b"%d" % i)) for i in range(5)]

    assert bodies == [b"0", b"1", b"2", b"3", b"4"]
    assert (len(set(peers)), client.connections_opened) == (1, 1)


async def test_request_head_and_small_body(raw_upstream: Callable[..., Awaitable[RawUpstream]],
                                           client: Http1Client) -> None:
    upstream = await raw_upstream(answer(b"HTTP/1.1 204 No Content\r\n\r\n"))
    headers = {"Accept": "application/json", "Content-Length": "999"}  # framing is the transport's to set

    response = await client.request("POST", upstream.url.with_path("/mcp").with_query("a=1"), headers, None)

    assert (response.status, await read_all(response)) == (204, b"")
    assert upstream.heads == [
        b"POST /mcp?a=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAccept: application/json\r\nContent-Length: 0\r\n\r\n"
        % upstream.url.port
    ]


async def test_chunked_response_body(raw_upstream: Callable[..., Awaitable[RawUpstream]], client: Http1Client) -> None:
    upstream = await raw_upstream(answer(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    ))

    response = await client.request("GET", upstream.url, {}, None)

    assert (response.status, await read_all(response)) == (200, b"hello world")
    await read_all(await client.request("GET", upstream.url, {}, None))
    assert upstream.connections == 1


async def test_close_delimited_body_ends_at_eof_and_is_not_reused(
    raw_upstream: Callable[..., Awaitable[RawUpstream]], client: Http1Client
) -> None:
    upstream = await raw_upstream(answer(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end"),
                                  close_after=True)

    first = await read_all(await client.request("GET", upstream.url, {}, None))
    second = await read_all(await client.request("GET", upstream.url, {}, None))

    assert (first, second, upstream.connections) == (b"until the end", b"until the end", 2)


async def test_head_response_has_no_body_and_keeps_the_connection(
    raw_upstream: Callable[..., Awaitable[RawUpstream]], client: Http1Client
) -> None:
    def script(head: bytes) -> bytes:
        if head.startswith(b"HEAD"):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n"
        return b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world"

    upstream = await raw_upstream(script)

    head = await client.request("HEAD", upstream.url, {}, None)
    head_body = await read_all(head)
    get_body = await read_all(await client.request("GET", upstream.url, {}, None))

    assert (head.status, head.headers["Content-Length"], head_body, get_body) == (200, "11", b"", b"hello world")
    assert upstream.connections == 1


async def test_informational_responses_are_skipped(raw_upstream: Callable[..., Awaitable[RawUpstream]],
                                                    client: Http1Client) -> None:
    upstream = await raw_upstream(answer(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nX-Final: yes\r\n\r\nok"
    ))

    response = await client.request("POST", upstream.url, {}, b"{}")

    assert (response.status, response.reason, dict(response.headers), await read_all(response)) == (
        201, "Created", {"Content-Length": "2", "X-Final": "yes"}, b"ok"
    )


async def test_connection_close_is_honoured(raw_upstream: Callable[..., Awaitable[RawUpstream]],
                                            client: Http1Client) -> None:
    upstream = await raw_upstream(answer(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"))

    bodies = [await read_all(await client.request("GET", upstream.url, {}, None)) for _ in range(3)]

    assert (bodies, upstream.connections, client.connections_opened) == ([b"ok"] * 3, 3, 3)


async def test_reset_mid_body_raises(raw_upstream: Callable[..., Awaitable[RawUpstream]], client: Http1Client) -> None:
    upstream = await raw_upstream(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b"),
                                  close_after=True)

    response = await client.request("GET", upstream.url, {}, None)

    assert await response.read_chunk() == b"only ten b"
    with pytest.raises(ConnectionResetError, match="mid-body"):
        await asyncio.wait_for(response.read_chunk(), 5)
    response.release()


async def test_half_read_connection_is_not_reused(raw_upstream: Callable[..., Awaitable[RawUpstream]],
                                                  client: Http1Client) -> None:
    upstream = await raw_upstream(answer(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n"  # the rest never comes
    ))

    response = await client.request("GET", upstream.url, {}, None)
    assert await response.read_chunk() == b"first"
    response.release()
    second = await client.request("GET", upstream.url, {}, None)
    assert await second.read_chunk() == b"first"
    second.release()

    assert (upstream.connections, client.connections_opened) == (2, 2)


async def test_huge_response_header_is_refused(raw_upstream: Callable[..., Awaitable[RawUpstream]],
                                               client: Http1Client) -> None:
    upstream = await raw_upstream(answer(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"))

    with pytest.raises(BadUpstreamResponse, match="over 64 KiB"):
        await client.request("GET", upstream.url, {}, None)


async def test_garbage_is_a_bad_response(raw_upstream: Callable[..., Awaitable[RawUpstream]],
                                         client: Http1Client) -> None:
    upstream = await raw_upstream(answer(b"SSH-2.0-OpenSSH_9.2\r\n\r\n"))

    with pytest.raises(BadUpstreamResponse, match="invalid HTTP response"):
        await client.request("GET", upstream.url, {}, None)


async def test_close_before_response_is_a_reset(raw_upstream: Callable[..., Awaitable[RawUpstream]],
                                                client: Http1Client) -> None:
    upstream = await raw_upstream(answer(b""), close_after=True)

    with pytest.raises(ConnectionResetError, match="before responding"):
        await client.request("GET", upstream.url, {}, None)


async def test_refused_connection_raises_connection_refused(client: Http1Client) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()

    with pytest.raises(ConnectionRefusedError):
        await client.request("GET", URL(f"http://127.0.0.1:{port}/"), {}, None)


async def test_connections_go_through_the_resolver(raw_upstream: Callable[..., Awaitable[RawUpstream]]) -> None:
    upstream = await raw_upstream(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    asked: list[tuple[str, int]] = []

    async def resolve(host: str, port: int) -> list[str]:
        asked.append((host, port))
        return ["127.0.0.1"]

    http1 = Http1Client(Settings(), resolve=resolve)
    try:
        response = await http1.request("GET", upstream.url.with_host("sandbox.internal"), {}, None)
        body = await read_all(response)
    finally:
        await http1.close()

    assert (body, asked, upstream.heads[0].split(b"\r\n")[1]) == (
        b"ok", [("sandbox.internal", upstream.url.port)], b"Host: sandbox.internal:%d" % upstream.url.port
    )


async def test_large_streamed_request_and_response_with_back_pressure(
    aiohttp_server: AiohttpServer, client: Http1Client
) -> None:
    async def echo(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        async for chunk in request.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/echo", echo)
    server = await aiohttp_server(app)
    parts = [bytes([i]) * 100_000 for i in range(20)]

    async def stream() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    response = await client.request("POST", server.make_url("/echo"), {}, stream())
    await asyncio.sleep(0.3)  # the downstream is slow: the transport must not buffer the whole body
    buffered = sum(len(chunk) for chunk in response._connection._chunks)  # type: ignore[union-attr]
    body = await read_all(response)

    assert body == b"".join(parts)
    assert buffered <= 2 * BUFFER_HIGH_BYTES


def test_runs_on_uvloop() -> None:
    # The gateway serves on uvloop, whose transports are not asyncio.Transport subclasses.
    uvloop = pytest.importorskip("uvloop")

    async def exchange() -> tuple[int, bytes, int]:
        async def hello(request: web.Request) -> web.Response:
            return web.Response(body=b"hello")

        app = web.Application()
        app.router.add_get("/", hello)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        http1 = Http1Client(Settings())
        try:
            url = URL(f"http://127.0.0.1:{runner.addresses[0][1]}/")
            bodies = [await read_all(await http1.request("GET", url, {}, None)) for _ in range(2)]
            return 200, b"".join(bodies), http1.connections_opened
        finally:
            await http1.close()
            await runner.cleanup()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(asyncio.wait_for(exchange(), 10)) == (200, b"hellohello", 1)


async def test_idempotent_request_is_retried_when_a_kept_alive_connection_was_closed(
    raw_upstream: Callable[..., Awaitable[RawUpstream]], client: Http1Client
) -> None:
    # The upstream keeps nothing alive although it does not say so (uvicorn after its 5 s timeout).
    upstream = await raw_upstream(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"), close_after=True)

    bodies = [await read_all(await client.request("GET", upstream.url, {}, None)) for _ in range(3)]

    assert (bodies, upstream.connections) == ([b"ok"] * 3, 3)


async def test_closed_client_does_not_pool_released_connections(
    raw_upstream: Callable[..., Awaitable[RawUpstream]]
) -> None:
    upstream = await raw_upstream(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    http1 = Http1Client(Settings())
    response = await http1.request("GET", upstream.url, {}, None)
    assert await response.read_chunk() == b"ok"

    await http1.close()
    response.release()

    assert (http1.stats().idle, http1.stats().busy, http1.stats().closed["shutdown"]) == (0, 0, 1)


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )
    return cert, key


async def test_https_upstream_over_tls(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(body=b"over tls " + request.scheme.encode())

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context)
    await site.start()
    http1 = Http1Client(Settings(), ssl_context=ssl.create_default_context(cafile=str(cert)))
    untrusting = Http1Client(Settings())
    try:
        url = URL(f"https://127.0.0.1:{runner.addresses[0][1]}/")
        body = await read_all(await http1.request("GET", url, {}, None))
        with pytest.raises(ssl.SSLCertVerificationError):  # the default context does not trust it
            await untrusting.request("GET", url, {}, None)
    finally:
        await http1.close()
        await untrusting.close()
        await runner.cleanup()

    assert body == b"over tls https"


async def test_connect_timeout_covers_resolution_and_connect() -> None:
    async def slow_resolve(host: str, port: int) -> list[str]:
        await asyncio.sleep(10)
        return ["127.0.0.1"]

    http1 = Http1Client(Settings(connect_timeout_s=0.2), resolve=slow_resolve)
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(http1.request("GET", URL("http://slow.internal:80/"), {}, None), 5)
    finally:
        await http1.close()
