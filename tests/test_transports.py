"""The gateway end to end on each upstream transport (the conftest runs every test once per transport)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.app import build_gateway_app
from gateway.config import load_settings
from gateway.errors import ConfigError
from gateway.headers import MCP_PROXY_URL
from tests.conftest import Upstream, gateway_settings


async def test_each_transport_is_selected(upstream_client: str) -> None:
    assert gateway_settings().upstream_client == upstream_client


def test_upstream_client_setting_is_validated() -> None:
    assert load_settings(["--upstream-client", "aiohttp"], {}).upstream_client == "aiohttp"
    assert load_settings([], {"GATEWAY_UPSTREAM_CLIENT": "lean"}).upstream_client == "lean"
    assert load_settings([], {}).upstream_client == "lean"
    with pytest.raises(ConfigError, match="--upstream-client: 'curl' from --upstream-client must be one of lean"):
        load_settings(["--upstream-client", "curl"], {})


async def test_post_is_forwarded_whole(upstream: Upstream, aiohttp_client: AiohttpClient) -> None:
    gateway = await aiohttp_client(build_gateway_app(gateway_settings()))
    body = b'{"jsonrpc":"2.0","id":1,"method":"tools/call"}'

    replies = [
        await gateway.post("/mcp?x=1", data=body, headers={MCP_PROXY_URL: str(upstream.url), "Mcp-Session-Id": "s1"})
        for _ in range(3)
    ]

    assert [(reply.status, await reply.json()) for reply in replies] == [(200, {"ok": True})] * 3
    assert [(seen.method, seen.path_qs, seen.body, seen.headers["Mcp-Session-Id"]) for seen in upstream.seen] == [
        ("POST", "/mcp?x=1", body, "s1")
    ] * 3
    assert upstream.seen[0].headers["Host"] == f"{upstream.url.host}:{upstream.url.port}"


async def test_large_upload_streams_through(upstream: Upstream, aiohttp_client: AiohttpClient) -> None:
    gateway = await aiohttp_client(build_gateway_app(gateway_settings()))
    body = bytes(range(256)) * 4096  # 1 MiB: above the one-write limit

    async def chunks() -> object:
        for start in range(0, len(body), 100_000):
            yield body[start:start + 100_000]

    reply = await gateway.post("/upload", data=chunks(), headers={MCP_PROXY_URL: str(upstream.url)})

    assert (reply.status, await reply.json()) == (200, {"ok": True})
    [seen] = upstream.seen
    assert (seen.method, seen.path_qs, seen.body) == ("POST", "/upload", body)


async def test_sse_events_relayed_one_by_one(aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient) -> None:
    sent = asyncio.Event()

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        await asyncio.wait_for(sent.wait(), 5)  # the second event waits until the first arrived
        await response.write(b"data: second\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/sse", events)
    server = await aiohttp_server(app)
    gateway = await aiohttp_client(build_gateway_app(gateway_settings()))

    reply = await gateway.get("/sse", headers={MCP_PROXY_URL: str(server.make_url(""))})
    first = await asyncio.wait_for(reply.content.readuntil(b"\n\n"), 5)
    sent.set()
    rest = await asyncio.wait_for(reply.content.read(), 5)

    assert (reply.status, reply.headers["Content-Type"], first, rest) == (
        200, "text/event-stream", b"data: first\n\n", b"data: second\n\n"
    )


async def test_head_and_no_content(aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient) -> None:
    async def answer(request: web.Request) -> web.Response:
        if request.method == "DELETE":
            return web.Response(status=204)
        return web.Response(body=b"0123456789", headers={"X-Kind": "doc"})

    app = web.Application()
    app.router.add_route("*", "/doc", answer)
    server = await aiohttp_server(app)
    gateway = await aiohttp_client(build_gateway_app(gateway_settings()))
    routed = {MCP_PROXY_URL: str(server.make_url(""))}

    head = await gateway.head("/doc", headers=routed)
    deleted = await gateway.delete("/doc", headers=routed)
    got = await gateway.get("/doc", headers=routed)

    assert (head.status, head.headers["Content-Length"], head.headers["X-Kind"], await head.read()) == (
        200, "10", "doc", b""
    )
    assert (deleted.status, await deleted.read()) == (204, b"")
    assert (got.status, await got.read()) == (200, b"0123456789")


async def test_refused_upstream_is_502(aiohttp_client: AiohttpClient, unused_tcp_port: int) -> None:
    gateway = await aiohttp_client(build_gateway_app(gateway_settings()))

    reply = await gateway.post("/mcp", data=b"{}", headers={MCP_PROXY_URL: f"http://127.0.0.1:{unused_tcp_port}"})

    assert (reply.status, await reply.json()) == (502, {
        "error": f"cannot connect to upstream 127.0.0.1:{unused_tcp_port}: connection refused",
        "code": "upstream_unreachable",
    })


async def test_upstream_silent_mid_body_aborts_the_reply(aiohttp_server: AiohttpServer,
                                                        aiohttp_client: AiohttpClient) -> None:
    async def stalls(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": "100"})
        await response.prepare(request)
        await response.write(b'{"partial":')
        await asyncio.sleep(10)
        return response

    app = web.Application()
    app.router.add_get("/slow", stalls)
    server = await aiohttp_server(app)
    gateway = await aiohttp_client(build_gateway_app(gateway_settings(idle_timeout_s=0.5)))

    reply = await gateway.get("/slow", headers={MCP_PROXY_URL: str(server.make_url(""))})
    started = asyncio.get_running_loop().time()
    with pytest.raises(aiohttp.ClientPayloadError):
        await asyncio.wait_for(reply.read(), 5)
    waited_s = asyncio.get_running_loop().time() - started

    assert reply.status == 200
    assert 0.3 < waited_s < 4  # the idle timeout (0.5 s, plus at most 10% slack), with room for a busy machine


async def test_downstream_leaving_an_sse_stream_closes_the_upstream(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient
) -> None:
    upstream_gone = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: hello\n\n")
        try:
            await asyncio.sleep(30)  # silent: only the connection closing ends this
        finally:
            upstream_gone.set()
        return response

    app = web.Application()  # aiohttp_server cancels the handler when the connection closes
    app.router.add_get("/sse", endless)
    server = await aiohttp_server(app)
    gateway = await aiohttp_client(build_gateway_app(gateway_settings()))

    reply = await gateway.get("/sse", headers={MCP_PROXY_URL: str(server.make_url(""))})
    first = await asyncio.wait_for(reply.content.readuntil(b"\n\n"), 5)
    reply.close()

    await asyncio.wait_for(upstream_gone.wait(), 5)
    assert first == b"data: hello\n\n"
