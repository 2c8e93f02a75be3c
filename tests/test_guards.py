"""Loop guard (508), bearer authentication (401) and limits (413, 431, 429, 503), end to end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpClient, AiohttpServer
from yarl import URL

from gateway.app import build_gateway_app
from gateway.headers import MCP_PROXY_URL
from gateway.via import has_passed
from tests.conftest import Upstream, gateway_settings


async def test_a_target_pointing_at_the_gateway_itself_ends_with_508(aiohttp_client: AiohttpClient) -> None:
    gateway = await aiohttp_client(build_gateway_app(gateway_settings()))
    itself = str(gateway.make_url("")).rstrip("/")

    response = await gateway.post("/mcp", data=b"{}", headers={MCP_PROXY_URL: itself})

    # The first pass forwards to itself once; the second pass sees its own Via entry.
    assert (response.status, await response.json()) == (508, {
        "error": "request already passed through this gateway (Via); its target points back here",
        "code": "loop_detected",
    })


async def test_the_upstream_sees_the_gateway_via_entry(upstream: Upstream, aiohttp_client: AiohttpClient) -> None:
    gateway = await aiohttp_client(build_gateway_app(gateway_settings()))

    await gateway.get("/mcp", headers={MCP_PROXY_URL: str(upstream.url), "Via": "1.1 edge-proxy"})

    [seen] = upstream.seen
    [edge, ours] = seen.headers.getall("Via")
    assert edge == "1.1 edge-proxy"
    assert ours.startswith("1.1 mcp-gateway-")


def test_loop_detection_reads_every_entry_of_a_via_list() -> None:
    mark = "1.1 mcp-gateway-abc"
    assert [
        has_passed(["1.0 fred, 1.1 mcp-gateway-abc"], mark),
        has_passed(["1.1 edge", "1.1 mcp-gateway-abc , 1.1 other"], mark),
        has_passed(["1.1 mcp-gateway-abcd"], mark),
        has_passed([], mark),
    ] == [True, True, False, False]


# --- authentication ----------------------------------------------------------------------------

@pytest.fixture
def token_file(tmp_path: Path) -> str:
    path = tmp_path / "tokens"
    path.write_text("# agents\n5ecret-one\n\n  5ecret-two  \n")
    return str(path)


UNAUTHORIZED = {"error": "a valid Authorization: Bearer token is required", "code": "unauthorized"}


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Basic 5ecret-one", "Bearer", "5ecret-one"])
async def test_a_missing_or_wrong_token_gets_401(
    authorization: str | None, token_file: str, upstream: Upstream, aiohttp_client: AiohttpClient
) -> None:
    gateway = await aiohttp_client(build_gateway_app(gateway_settings(auth_token_file=token_file)))
    headers = {MCP_PROXY_URL: str(upstream.url)}
    if authorization is not None:
        headers["Authorization"] = authorization

    response = await gateway.post("/mcp", data=b"{}", headers=headers)

    assert (response.status, await response.json()) == (401, UNAUTHORIZED)
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="mcp-gateway"'
    assert upstream.seen == []


@pytest.mark.parametrize(("forward", "forwarded"), [(False, None), (True, "Bearer 5ecret-two")])
async def test_a_valid_token_passes_and_is_stripped_unless_forwarded(
    forward: bool, forwarded: str | None, token_file: str, upstream: Upstream, aiohttp_client: AiohttpClient
) -> None:
    settings = gateway_settings(auth_token_file=token_file, forward_authorization=forward)
    gateway = await aiohttp_client(build_gateway_app(settings))

    response = await gateway.post("/mcp", data=b"{}", headers={
        MCP_PROXY_URL: str(upstream.url), "Authorization": "Bearer 5ecret-two"})

    assert (response.status, await response.json()) == (200, {"ok": True})
    [seen] = upstream.seen
    assert (seen.method, seen.path_qs, seen.body, seen.headers.get("Authorization")) == (
        "POST", "/mcp", b"{}", forwarded)


async def test_health_stays_open_under_auth(token_file: str, aiohttp_client: AiohttpClient) -> None:
    gateway = await aiohttp_client(build_gateway_app(gateway_settings(auth_token_file=token_file)))

    response = await gateway.get("/health")

    assert (response.status, await response.json()) == (200, {"status": "ok", "engine": "k8s"})


def test_an_empty_token_file_stops_startup(tmp_path: Path) -> None:
    from gateway.config import load_settings
    from gateway.errors import ConfigError

    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ConfigError, match=r"^--auth-token-file: .* must contain at least one token$"):
        load_settings(["--auth-token-file", str(empty)], {})


# --- limits --------------------------------------------------------------------------------------

async def test_a_declared_body_over_the_limit_gets_413_and_nothing_is_forwarded(
    upstream: Upstream, aiohttp_client: AiohttpClient
) -> None:
    gateway = await aiohttp_client(build_gateway_app(gateway_settings(max_body_size=1000)))

    response = await gateway.post("/mcp", data=b"x" * 1001, headers={MCP_PROXY_URL: str(upstream.url)})

    assert (response.status, await response.json()) == (413, {
        "error": "request body of 1001 bytes exceeds --max-body-size 1000", "code": "body_too_large"})
    assert upstream.seen == []


async def test_a_streamed_body_over_the_limit_gets_413_and_breaks_the_upstream_request(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient
) -> None:
    outcomes: list[str] = []

    async def read_all(request: web.Request) -> web.Response:
        try:
            await request.read()
        except BaseException as exc:  # the upstream must see a broken request, never a short complete one
            outcomes.append(exc.__class__.__name__)
            raise
        outcomes.append("complete")
        return web.Response(text="read")

    app = web.Application()
    app.router.add_post("/mcp", read_all)
    upstream_server = await aiohttp_server(app)
    gateway = await aiohttp_client(build_gateway_app(gateway_settings(max_body_size=100_000)))

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b"y" * 10_000
            await asyncio.sleep(0.01)

    response = await gateway.post("/mcp", data=chunks(), headers={MCP_PROXY_URL: str(upstream_server.make_url(""))})

    assert (response.status, await response.json()) == (413, {
        "error": "request body exceeds --max-body-size 100000", "code": "body_too_large"})
    for _ in range(100):
        if outcomes:
            break
        await asyncio.sleep(0.02)
    assert outcomes and "complete" not in outcomes


async def test_headers_over_the_limit_get_431(upstream: Upstream, aiohttp_client: AiohttpClient) -> None:
    gateway = await aiohttp_client(build_gateway_app(gateway_settings(max_header_size=4096)))
    headers = {MCP_PROXY_URL: str(upstream.url), **{f"X-Big-{i}": "v" * 1000 for i in range(5)}}

    response = await gateway.get("/mcp", headers=headers)

    assert response.status == 431
    body = await response.json()
    assert body["code"] == "headers_too_large"
    assert body["error"].endswith("exceed --max-header-size 4096")
    assert upstream.seen == []


@pytest.fixture
async def held_upstream(aiohttp_server: AiohttpServer) -> AsyncIterator[tuple[URL, asyncio.Event]]:
    """An upstream whose /slow answers once released, and whose /sse opens a stream held open."""
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="done")

    async def sse(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: hello\n\n")
        await release.wait()
        return response

    app = web.Application()
    app.router.add_get("/slow", slow)
    app.router.add_get("/sse", sse)
    server = await aiohttp_server(app)
    yield server.make_url(""), release
    release.set()


async def test_a_target_at_its_inflight_limit_gets_429_with_retry_after(
    held_upstream: tuple[URL, asyncio.Event], upstream: Upstream, aiohttp_client: AiohttpClient
) -> None:
    url, release = held_upstream
    gateway = await aiohttp_client(build_gateway_app(gateway_settings(max_inflight_per_target=1)))
    routed = {MCP_PROXY_URL: str(url)}
    first = asyncio.ensure_future(gateway.get("/slow", headers=routed))
    await asyncio.sleep(0.2)

    refused = await gateway.get("/slow", headers=routed)
    other_target = await gateway.get("/mcp", headers={MCP_PROXY_URL: str(upstream.url)})
    release.set()
    served = await first

    assert (refused.status, refused.headers["Retry-After"], await refused.json()) == (429, "1", {
        "error": f"target 127.0.0.1:{url.port} already has 1 requests in flight (--max-inflight-per-target)",
        "code": "target_busy",
    })
    assert (served.status, await served.text()) == (200, "done")
    assert (other_target.status, await other_target.json()) == (200, {"ok": True})
    after = await gateway.get("/slow", headers=routed)
    assert (after.status, await after.text()) == (200, "done")


async def test_streams_over_the_limit_get_503_with_retry_after(
    held_upstream: tuple[URL, asyncio.Event], aiohttp_client: AiohttpClient
) -> None:
    url, release = held_upstream
    gateway = await aiohttp_client(build_gateway_app(gateway_settings(max_streams=1)))
    routed = {MCP_PROXY_URL: str(url)}
    stream = await gateway.get("/sse", headers=routed)
    assert await stream.content.readuntil(b"\n\n") == b"data: hello\n\n"

    refused = await gateway.get("/sse", headers=routed)

    assert (refused.status, refused.headers["Retry-After"], await refused.json()) == (503, "1", {
        "error": "the gateway already relays 1 streams (--max-streams)", "code": "too_many_streams"})
    release.set()
    assert await stream.read() == b""
    again = await gateway.get("/sse", headers=routed)
    assert (again.status, await again.read()) == (200, b"data: hello\n\n")


def test_targets_are_counted_by_sandbox_id_else_host_and_port() -> None:
    from gateway.engines import Target
    from gateway.limits import target_key

    assert [
        target_key(Target(URL("http://10.1.2.3:8081/mcp"))),
        target_key(Target(URL("http://[fd00::1]:8081/"))),
        target_key(Target(URL("https://arca.example/arca/api/v1/sandbox/sbx-1/mcp"),
                          (("x-agent-sandbox-api-key", "k"), ("X-Agent-Sandbox-Id", "sbx-1")))),
    ] == ["10.1.2.3:8081", "[fd00::1]:8081", "sbx-1"]


async def test_auth_and_inflight_limits_release_every_slot(
    token_file: str, upstream: Upstream, aiohttp_client: AiohttpClient
) -> None:
    # Regression: auth hands a cloned request inward; a slot taken on the clone was never released.
    settings = gateway_settings(auth_token_file=token_file, max_inflight_per_target=1)
    gateway = await aiohttp_client(build_gateway_app(settings))
    headers = {MCP_PROXY_URL: str(upstream.url), "Authorization": "Bearer 5ecret-one"}

    statuses = [(await gateway.get("/mcp", headers=headers)).status for _ in range(3)]

    assert statuses == [200, 200, 200]


def test_every_gateway_error_has_a_unique_code_and_an_error_status() -> None:
    from gateway import errors

    def family(cls: type[errors.GatewayError]) -> list[type[errors.GatewayError]]:
        return [cls, *(member for sub in cls.__subclasses__() for member in family(sub))]

    concrete = [cls for cls in family(errors.GatewayError) if not cls.__name__.startswith("_")]
    codes = [cls.code for cls in concrete]
    assert len(codes) == len(set(codes))
    assert all(400 <= cls.status <= 599 for cls in concrete)
