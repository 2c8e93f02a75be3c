"""What a real MCP client's user sees when the gateway refuses or fails a call (issue #13).

The `fastmcp` Client as the platform SDK builds it (StreamableHttpTransport with the two AEnvCore
headers) and the official `mcp` client, each pointed at the gateway in-process on 127.0.0.1, one
test per refusal kind: the error the user's code catches, its message, and how long it took.
Before #13 both clients said `MCPError(-32603, 'Server returned an error response')` for every
one of them: they drop a non-2xx body that is not a JSON-RPC error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
import pytest
from aiohttp import web
from fastmcp import Client
from fastmcp.client.transports import StreamableHttpTransport
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from pytest_aiohttp import AiohttpServer
from yarl import URL

from gateway.app import build_gateway_app
from gateway.engines.arca import REJECT_MESSAGE
from gateway.headers import ENV_INSTANCE_ID, MCP_PROXY_URL
from tests.conftest import gateway_settings
from tests.process import free_port, gateway_process

# A refusal is answered before anything is forwarded: the client's error must not take longer.
REFUSAL_BUDGET_S = 1.0
CLIENT_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class Refusal:
    """One refusal kind: the gateway's settings, the SDK's headers, and the message the gateway writes."""

    name: str
    settings: dict[str, Any]
    headers: Callable[[Targets], dict[str, str]]
    gateway_message: Callable[[Targets], str]
    rpc_code: int


@dataclass(slots=True)
class Targets:
    """The URLs a refusal's headers point at."""

    dead: URL  # nothing listens there
    slow: URL  # an upstream that holds each request until released
    token_file: Path  # one bearer token, for --auth-token-file
    held: list[asyncio.Event] = field(default_factory=list)  # one per request the slow upstream holds
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # set when the first one is held
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def sdk_headers(target: URL) -> dict[str, str]:
    """The two headers the platform SDK sends on every call."""
    return {MCP_PROXY_URL: str(target), ENV_INSTANCE_ID: "inst-13"}


TOKEN_FILE = "<token file>"  # replaced by the fixture's file
ARCA_REJECT = {"schedule_type": "arca", "arca_base_url": "http://127.0.0.1:9", "arca_api_key": "k"}
REFUSALS = [
    Refusal("missing_header", {}, lambda _: {ENV_INSTANCE_ID: "inst-13"},
            lambda _: "AEnvCore-MCPProxy-URL header is required", -32600),
    Refusal("malformed_header", {}, lambda _: {MCP_PROXY_URL: "ftp://10.1.2.3", ENV_INSTANCE_ID: "inst-13"},
            lambda _: "AEnvCore-MCPProxy-URL header must be an http:// or https:// URL, like http://10.1.2.3:8081",
            -32600),
    Refusal("target_forbidden", {"target_deny": ("127.0.0.0/8",)}, lambda t: sdk_headers(t.dead),
            lambda t: f"target 127.0.0.1:{t.dead.port} is refused by rule: target_deny 127.0.0.0/8", -32011),
    Refusal("target_busy", {"max_inflight_per_target": 1}, lambda t: sdk_headers(t.slow),
            lambda t: f"target 127.0.0.1:{t.slow.port} already has 1 requests in flight (--max-inflight-per-target)",
            -32012),
    Refusal("upstream_unreachable", {"connect_retry_budget_s": 0.0}, lambda t: sdk_headers(t.dead),
            lambda t: f"cannot connect to upstream 127.0.0.1:{t.dead.port}: connection refused", -32014),
    Refusal("data_plane_unsupported", ARCA_REJECT, lambda t: sdk_headers(t.dead), lambda _: REJECT_MESSAGE, -32013),
    Refusal("unauthorized", {"auth_token_file": TOKEN_FILE}, lambda t: sdk_headers(t.dead),
            lambda _: "a valid Authorization: Bearer token is required", -32010),
    # What a page rebound to the gateway's address sends (its scripts can set Origin to nothing else).
    Refusal("origin_forbidden", {}, lambda t: {**sdk_headers(t.dead), "Origin": "http://evil.example.com"},
            lambda _: "Origin http://evil.example.com is not allowed: only loopback origins and --allow-origin are "
                      "accepted (DNS-rebinding protection)", -32011),
]


@pytest.fixture
async def targets(aiohttp_server: AiohttpServer, tmp_path: Path) -> AsyncIterator[Targets]:
    token_file = tmp_path / "tokens"
    token_file.write_text("tok-5ecret-13\n")
    found = Targets(dead=URL(f"http://127.0.0.1:{free_port()}"), slow=URL("http://127.0.0.1"), token_file=token_file)

    async def hold(request: web.Request) -> web.Response:
        release = asyncio.Event()
        found.held.append(release)
        found.arrived.set()
        async with asyncio.timeout(CLIENT_TIMEOUT_S):
            await release.wait()
        return web.json_response({})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hold)
    found.slow = (await aiohttp_server(app)).make_url("")
    yield found
    for release in found.held:
        release.set()
    await asyncio.wait_for(asyncio.gather(*found.tasks, return_exceptions=True), CLIENT_TIMEOUT_S)


@dataclass(frozen=True, slots=True)
class Seen:
    """What the user's code caught."""

    error: BaseException
    elapsed_s: float

    @property
    def message(self) -> str:
        return str(self.error)


def leaf(error: BaseException) -> BaseException:
    """The one exception inside the task groups the official client raises through."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


async def fastmcp_user(url: URL, headers: dict[str, str]) -> Seen:
    client = Client(transport=StreamableHttpTransport(str(url), headers=headers), timeout=CLIENT_TIMEOUT_S)
    started = time.monotonic()
    try:
        async with asyncio.timeout(CLIENT_TIMEOUT_S), client:
            await client.list_tools()
    except Exception as exc:
        return Seen(leaf(exc), time.monotonic() - started)
    raise AssertionError("the fastmcp client saw no error")


async def mcp_user(url: URL, headers: dict[str, str]) -> Seen:
    started = time.monotonic()
    try:
        async with (
            asyncio.timeout(CLIENT_TIMEOUT_S),
            httpx2.AsyncClient(headers=headers, timeout=CLIENT_TIMEOUT_S) as http,
            streamable_http_client(str(url), http_client=http) as (read_stream, write_stream),
            ClientSession(read_stream, write_stream) as session,
        ):
            await session.initialize()
    except Exception as exc:
        return Seen(leaf(exc), time.monotonic() - started)
    raise AssertionError("the mcp client saw no error")


async def gateway_for(aiohttp_server: AiohttpServer, refusal: Refusal, targets: Targets) -> URL:
    settings = {name: str(targets.token_file) if value == TOKEN_FILE else value
                for name, value in refusal.settings.items()}
    server = await aiohttp_server(build_gateway_app(gateway_settings(**settings)))
    gateway = server.make_url("/mcp")
    if refusal.name == "target_busy":  # one call holds the only slot the target has
        targets.tasks.append(asyncio.create_task(_hold_slot(gateway, refusal.headers(targets))))
        await asyncio.wait_for(targets.arrived.wait(), CLIENT_TIMEOUT_S)
    return gateway


async def _hold_slot(gateway: URL, headers: dict[str, str]) -> None:
    async with aiohttp.ClientSession() as http, http.post(gateway, data=b"{}", headers=headers) as response:
        await response.read()


@pytest.mark.parametrize("refusal", REFUSALS, ids=lambda refusal: refusal.name)
@pytest.mark.parametrize("user", [fastmcp_user, mcp_user], ids=["fastmcp", "mcp"])
async def test_the_user_sees_the_gateways_message(
    aiohttp_server: AiohttpServer, targets: Targets, refusal: Refusal, user: Callable[..., Any]
) -> None:
    gateway = await gateway_for(aiohttp_server, refusal, targets)

    seen: Seen = await user(gateway, refusal.headers(targets))

    assert isinstance(seen.error, MCPError)
    assert (seen.error.code, seen.message) == (refusal.rpc_code, refusal.gateway_message(targets))
    assert seen.elapsed_s < REFUSAL_BUDGET_S


@pytest.mark.parametrize("user", [fastmcp_user, mcp_user], ids=["fastmcp", "mcp"])
async def test_the_user_of_the_gateway_program_sees_its_message_every_time(user: Callable[..., Any]) -> None:
    # Regression: in-process the body arrives with the head; from another process httpx's body write
    # came after the refusal 39 times in 40, and the user saw "Server returned an error response".
    with gateway_process() as gateway:
        seen = [await user(gateway.url / "mcp", {ENV_INSTANCE_ID: "inst-13"}) for _ in range(10)]

    assert {(type(one.error), one.message) for one in seen} == {(MCPError, "AEnvCore-MCPProxy-URL header is required")}
    assert max(one.elapsed_s for one in seen) < REFUSAL_BUDGET_S
