"""MCP end to end: real MCP clients, through the gateway in-process, to a real FastMCP server on 127.0.0.1.

Both transports (streamable HTTP and legacy SSE), with the official `mcp` client, the `fastmcp`
client as the platform SDK drives it, and raw HTTP for what clients only log (the standalone
GET /mcp stream, the legacy `endpoint` event and the 202 on POST /messages/).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
import httpx2
import pytest
from fastmcp import Client
from fastmcp.client.transports import StreamableHttpTransport
from mcp import ClientSession, types
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from pytest_aiohttp import AiohttpServer
from yarl import URL

from gateway.app import build_gateway_app
from gateway.errors import authority
from gateway.headers import ENV_INSTANCE_ID, MCP_PROXY_URL
from tests.conftest import gateway_settings
from tests.mcp_upstream import Event, McpUpstream, next_event, running_example_server

TEST_TIMEOUT_S = 20.0
EXAMPLE_TOOLS = ["add", "count", "notify", "request_headers"]
HANDSHAKE_VERSION = "2025-11-25"  # the newest version the initialize handshake negotiates
INITIALIZE: dict[str, Any] = {
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": HANDSHAKE_VERSION, "capabilities": {},
               "clientInfo": {"name": "raw", "version": "1"}},
}
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}
BOTH_ACCEPTED = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def streamable_upstream() -> Iterator[McpUpstream]:
    with running_example_server("streamable-http") as upstream:
        yield upstream


@pytest.fixture(scope="module")
def sse_upstream() -> Iterator[McpUpstream]:
    with running_example_server("sse") as upstream:
        yield upstream


@pytest.fixture
async def gateway(aiohttp_server: AiohttpServer) -> URL:
    server = await aiohttp_server(build_gateway_app(gateway_settings()))
    return server.make_url("")


@dataclass(frozen=True, slots=True)
class Exchange:
    """One HTTP exchange as the official client made it: Mcp-Session-Id sent and received."""

    method: str
    status: int
    sent_session_id: str | None
    received_session_id: str | None


@dataclass(slots=True)
class Exchanges:
    seen: list[Exchange] = field(default_factory=list)
    get_stream_opened: asyncio.Event = field(default_factory=asyncio.Event)


@asynccontextmanager
async def official_streamable_session(
    gateway: URL, upstream: McpUpstream, exchanges: Exchanges | None = None
) -> AsyncIterator[ClientSession]:
    """The official client over streamable HTTP, pointed at the gateway; records every exchange."""
    exchanges = exchanges or Exchanges()

    async def record(response: httpx2.Response) -> None:
        exchanges.seen.append(Exchange(response.request.method, response.status_code,
                                       response.request.headers.get("mcp-session-id"),
                                       response.headers.get("mcp-session-id")))
        if response.request.method == "GET":
            exchanges.get_stream_opened.set()

    route: dict[str, str] = {MCP_PROXY_URL: str(upstream.url)}
    http_client = httpx2.AsyncClient(headers=route, timeout=httpx2.Timeout(30.0),
                                     event_hooks={"response": [record]})
    async with (
        http_client,
        streamable_http_client(str(gateway / "mcp"), http_client=http_client) as (read_stream, write_stream),
        ClientSession(read_stream, write_stream) as session,
    ):
        yield session


def text_of(result: types.CallToolResult) -> str:
    [block] = result.content
    assert isinstance(block, types.TextContent)
    return block.text


async def test_official_client_keeps_one_session_through_gateway_until_delete(
    gateway: URL, streamable_upstream: McpUpstream
) -> None:
    exchanges = Exchanges()
    async with asyncio.timeout(TEST_TIMEOUT_S):
        async with official_streamable_session(gateway, streamable_upstream, exchanges) as session:
            initialized = await session.initialize()
            tools = await session.list_tools()
            added = await session.call_tool("add", {"a": 2, "b": 3})
            seen_upstream = await session.call_tool("request_headers", {})
            # The client opens GET /mcp in the background after `initialized`; let it land before leaving.
            await exchanges.get_stream_opened.wait()

    assert (initialized.protocol_version, initialized.server_info.name) == (HANDSHAKE_VERSION, "aenv-example")
    assert [tool.name for tool in tools.tools] == EXAMPLE_TOOLS
    assert (text_of(added), added.structured_content, added.is_error) == ("5", {"result": 5}, False)
    session_id = exchanges.seen[0].received_session_id
    assert session_id
    # initialize, initialized (202), the standalone GET stream, three calls, and the DELETE on exit:
    # the id came back on the first answer and went out, and came back, on every later exchange.
    assert sorted(exchanges.seen[1:], key=lambda exchange: (exchange.method, exchange.status)) == [
        Exchange("DELETE", 200, session_id, session_id),
        Exchange("GET", 200, session_id, session_id),
        Exchange("POST", 200, session_id, session_id),
        Exchange("POST", 200, session_id, session_id),
        Exchange("POST", 200, session_id, session_id),
        Exchange("POST", 202, session_id, session_id),
    ]
    upstream_headers = seen_upstream.structured_content
    assert upstream_headers is not None
    assert (upstream_headers["mcp-session-id"], upstream_headers["host"]) == (
        session_id, authority(streamable_upstream.url)
    )
    assert MCP_PROXY_URL.lower() not in upstream_headers

    # After the DELETE the server refuses the session, and the gateway relays that refusal as is.
    tools_list = {"jsonrpc": "2.0", "id": 9, "method": "tools/list"}
    session_headers = {**BOTH_ACCEPTED, "Mcp-Session-Id": session_id, "MCP-Protocol-Version": HANDSHAKE_VERSION}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async with http.post(gateway / "mcp", json=tools_list,
                             headers={**session_headers, MCP_PROXY_URL: str(streamable_upstream.url)}) as via_gateway:
            refusal = (via_gateway.status, via_gateway.headers["Content-Type"], await via_gateway.json())
        async with http.post(streamable_upstream.url / "mcp", json=tools_list, headers=session_headers) as direct:
            direct_refusal = (direct.status, direct.headers["Content-Type"], await direct.json())
    assert refusal == direct_refusal == (
        404, "application/json",
        {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "Session not found"}},
    )


async def test_progress_notifications_reach_the_official_client_while_the_tool_runs(
    gateway: URL, streamable_upstream: McpUpstream
) -> None:
    loop = asyncio.get_running_loop()
    arrivals: list[tuple[float, float | None, str | None, float]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        arrivals.append((progress, total, message, loop.time()))

    async with asyncio.timeout(TEST_TIMEOUT_S):
        async with official_streamable_session(gateway, streamable_upstream) as session:
            await session.initialize()
            result = await session.call_tool("count", {"n": 4, "delay_s": 0.3}, progress_callback=on_progress)
            finished = loop.time()

    assert text_of(result) == "counted to 4"
    assert [arrival[:3] for arrival in arrivals] == [(float(step), 4.0, f"step {step} of 4") for step in (1, 2, 3, 4)]
    # Three more 0.3 s steps followed the first notification: had the gateway held the stream back,
    # all four would have arrived together with the result. Bounds are half the ideal, for a busy box.
    first_at, last_at = arrivals[0][3], arrivals[-1][3]
    assert finished - first_at >= 0.45
    assert last_at - first_at >= 0.45


async def test_fastmcp_client_with_the_platform_sdk_headers(gateway: URL, streamable_upstream: McpUpstream) -> None:
    # As the aenv SDK builds it: the gateway's /mcp, the instance's base URL and its id as headers.
    sdk_headers = {"AEnvCore-MCPProxy-URL": str(streamable_upstream.url), "AEnvCore-EnvInstance-ID": "inst-42"}
    client = Client(transport=StreamableHttpTransport(str(gateway / "mcp"), headers=sdk_headers), timeout=10)
    reported: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        reported.append((progress, total, message))

    async with asyncio.timeout(TEST_TIMEOUT_S):
        async with client:
            negotiated = client.protocol_version
            tools = await client.list_tools()
            added = await client.call_tool_mcp(name="add", arguments={"a": 40, "b": 2}, timeout=10)
            counted = await client.call_tool_mcp(name="count", arguments={"n": 2, "delay_s": 0.05},
                                                 progress_handler=on_progress, timeout=10)
            seen_upstream = await client.call_tool_mcp(name="request_headers", arguments={}, timeout=10)

    # fastmcp probes server/discover first and lands on the sessionless 2026 protocol: no
    # Mcp-Session-Id on this path (the official client's handshake covers sessions above).
    assert negotiated == "2026-07-28"
    assert [tool.name for tool in tools] == EXAMPLE_TOOLS
    assert (text_of(added), added.is_error) == ("42", False)
    assert (text_of(counted), reported) == ("counted to 2", [(1.0, 2.0, "step 1 of 2"), (2.0, 2.0, "step 2 of 2")])
    upstream_headers = seen_upstream.structured_content
    assert upstream_headers is not None
    assert (upstream_headers[ENV_INSTANCE_ID.lower()], upstream_headers["host"]) == (
        "inst-42", authority(streamable_upstream.url)
    )
    assert MCP_PROXY_URL.lower() not in upstream_headers


async def test_standalone_get_stream_stays_open_and_carries_server_notifications(
    gateway: URL, streamable_upstream: McpUpstream
) -> None:
    route: dict[str, str] = {MCP_PROXY_URL: str(streamable_upstream.url)}
    async with asyncio.timeout(TEST_TIMEOUT_S), aiohttp.ClientSession() as http:
        async with http.post(gateway / "mcp", json=INITIALIZE, headers={**BOTH_ACCEPTED, **route}) as initialize:
            assert (initialize.status, initialize.content_type) == (200, "text/event-stream")
            session_id = initialize.headers["Mcp-Session-Id"]
            assert (await next_event(initialize)).json()["result"]["serverInfo"]["name"] == "aenv-example"
        in_session = {**route, "Mcp-Session-Id": session_id, "MCP-Protocol-Version": HANDSHAKE_VERSION}
        async with http.post(gateway / "mcp", json=INITIALIZED, headers={**BOTH_ACCEPTED, **in_session}) as initialized:
            assert (initialized.status, initialized.headers["Mcp-Session-Id"], await initialized.read()) == (
                202, session_id, b""
            )

        async with http.get(gateway / "mcp", headers={"Accept": "text/event-stream", **in_session}) as stream:
            assert (stream.status, stream.content_type, stream.headers["Mcp-Session-Id"]) == (
                200, "text/event-stream", session_id
            )
            # Open and quiet: nothing to read, and not at its end.
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.5):
                    await next_event(stream)
            assert not stream.content.at_eof()

            call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                    "params": {"name": "notify", "arguments": {"message": "hello"}}}
            async with http.post(gateway / "mcp", json=call, headers={**BOTH_ACCEPTED, **in_session}) as notify:
                assert (await next_event(notify)).json()["result"]["structuredContent"] == {"result": "sent"}
            async with asyncio.timeout(5):
                assert await next_event(stream) == Event("message", (
                    '{"jsonrpc":"2.0","method":"notifications/message",'
                    '"params":{"level":"info","logger":"notify","data":"hello"}}'
                ))

            async with http.delete(gateway / "mcp", headers=in_session) as delete:
                assert (delete.status, await delete.read()) == (200, b"")
            # The server ends the stream of a deleted session, and so does the gateway.
            with pytest.raises(EOFError):
                async with asyncio.timeout(5):
                    await next_event(stream)


async def test_leaving_the_get_stream_frees_it_for_the_session(
    gateway: URL, streamable_upstream: McpUpstream
) -> None:
    # The server allows one GET stream per session (409 for a second) and the official client
    # reconnects a dropped one: the gateway must close its upstream side when the client leaves.
    route: dict[str, str] = {MCP_PROXY_URL: str(streamable_upstream.url)}
    async with asyncio.timeout(TEST_TIMEOUT_S), aiohttp.ClientSession() as http:
        async with http.post(gateway / "mcp", json=INITIALIZE, headers={**BOTH_ACCEPTED, **route}) as initialize:
            session_id = initialize.headers["Mcp-Session-Id"]
            await initialize.read()
        in_session = {**route, "Mcp-Session-Id": session_id, "MCP-Protocol-Version": HANDSHAKE_VERSION}
        async with http.post(gateway / "mcp", json=INITIALIZED, headers={**BOTH_ACCEPTED, **in_session}) as initialized:
            await initialized.read()
        stream_headers = {"Accept": "text/event-stream", **in_session}

        async with aiohttp.ClientSession() as first_client:  # its own connection, closed on exit
            async with first_client.get(gateway / "mcp", headers=stream_headers) as first:
                assert first.status == 200
                async with http.get(gateway / "mcp", headers=stream_headers) as second:
                    assert (second.status, (await second.json())["error"]["code"]) == (409, -32600)

        statuses: list[int] = []
        async with asyncio.timeout(5):
            while not statuses or statuses[-1] != 200:
                async with http.get(gateway / "mcp", headers=stream_headers) as reopened:
                    statuses.append(reopened.status)
                await asyncio.sleep(0.05)
    assert set(statuses[:-1]) <= {409}  # refused only while the upstream still held the old stream


async def test_official_client_over_legacy_sse_through_gateway(gateway: URL, sse_upstream: McpUpstream) -> None:
    loop = asyncio.get_running_loop()
    logged: list[Any] = []
    log_arrived = asyncio.Event()
    arrivals: list[float] = []

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logged.append((params.level, params.logger, params.data))
        log_arrived.set()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        arrivals.append(loop.time())

    async with asyncio.timeout(TEST_TIMEOUT_S):
        async with (
            sse_client(str(gateway / "sse"), headers={MCP_PROXY_URL: str(sse_upstream.url)}) as (reader, writer),
            ClientSession(reader, writer, logging_callback=on_log) as session,
        ):
            initialized = await session.initialize()
            tools = await session.list_tools()
            added = await session.call_tool("add", {"a": 2, "b": 3})
            counted = await session.call_tool("count", {"n": 3, "delay_s": 0.3}, progress_callback=on_progress)
            finished = loop.time()
            await session.call_tool("notify", {"message": "over sse"})
            await log_arrived.wait()

    assert initialized.server_info.name == "aenv-example"
    assert [tool.name for tool in tools.tools] == EXAMPLE_TOOLS
    assert (text_of(added), text_of(counted)) == ("5", "counted to 3")
    assert len(arrivals) == 3
    assert finished - arrivals[0] >= 0.3  # two more 0.3 s steps ran after the first notification arrived
    assert logged == [("info", "notify", "over sse")]


async def test_legacy_sse_endpoint_stays_on_the_gateway_and_messages_get_202(
    gateway: URL, sse_upstream: McpUpstream
) -> None:
    route: dict[str, str] = {MCP_PROXY_URL: str(sse_upstream.url)}
    sse_url = str(gateway / "sse")
    async with asyncio.timeout(TEST_TIMEOUT_S), aiohttp.ClientSession() as http:
        async with http.get(sse_url, headers=route) as stream:
            assert (stream.status, stream.content_type) == (200, "text/event-stream")
            endpoint = await next_event(stream)
            assert endpoint.event == "endpoint"
            # What a legacy client does with it: resolve against the URL it connected to, then refuse
            # any other scheme or host. A relative path keeps the client on the gateway.
            messages_url = urljoin(sse_url, endpoint.data)
            assert endpoint.data.startswith("/messages/?session_id=")
            assert urlsplit(messages_url)[:3] == (urlsplit(sse_url).scheme, urlsplit(sse_url).netloc, "/messages/")

            initialize = {**INITIALIZE, "params": {**INITIALIZE["params"], "protocolVersion": "2024-11-05"}}
            async with http.post(messages_url, json=initialize, headers=route) as accepted:
                assert (accepted.status, await accepted.read()) == (202, b"Accepted")
            async with asyncio.timeout(5):
                answer = await next_event(stream)
    assert (answer.event, answer.json()["id"], answer.json()["result"]["protocolVersion"]) == (
        "message", 1, "2024-11-05"
    )
    assert answer.json()["result"]["serverInfo"]["name"] == "aenv-example"
