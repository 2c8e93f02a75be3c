"""The arca engine end to end: a gateway on 127.0.0.1 in front of a fake Arca gateway and a decoy.

The fake Arca gateway records what reaches it; the decoy is what AEnvCore-MCPProxy-URL names and
must never be reached under arca. The official mcp client runs sessions through to a FastMCP server.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx2
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from pytest_aiohttp import AiohttpClient, AiohttpServer
from yarl import URL

from gateway.app import build_gateway_app
from gateway.engines.arca import REJECT_MESSAGE
from gateway.headers import ENV_INSTANCE_ID, MCP_PROXY_URL, SANDBOX_API_KEY, SANDBOX_ID, without_hop_by_hop
from tests.conftest import Seen, Upstream, gateway_settings

KEY = "sk-arca-5ecret-5d1e0b7c"
SANDBOX = "/arca/api/v1/sandbox"
REJECTED = {"success": False, "code": 501, "message": REJECT_MESSAGE, "data": None}


@dataclass(slots=True)
class FakeArca:
    """An Arca gateway stand-in: records every request; .../sse streams two events, gated."""

    url: URL
    seen: list[Seen] = field(default_factory=list)
    second_event: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
async def arca(aiohttp_server: AiohttpServer) -> FakeArca:
    fake = FakeArca(url=URL("http://127.0.0.1"))

    async def record(request: web.Request) -> web.StreamResponse:
        fake.seen.append(Seen(request.method, request.raw_path, request.headers.copy(), await request.read()))
        if not request.path.endswith("/sse"):
            return web.json_response({"ok": True})
        stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await stream.prepare(request)
        await stream.write(b"event: endpoint\ndata: /messages/?session_id=1\n\n")
        await asyncio.wait_for(fake.second_event.wait(), 10)
        await stream.write(b"data: second\n\n")
        await stream.write_eof()
        return stream

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    fake.url = (await aiohttp_server(app)).make_url("")
    return fake


def arca_gateway(base_url: URL | str, data_plane: str = "proxy") -> web.Application:
    """The gateway app under --schedule-type arca, with KEY as its key."""
    return build_gateway_app(gateway_settings(
        schedule_type="arca", arca_base_url=str(base_url), arca_api_key=KEY, arca_data_plane=data_plane,
    ))


def sdk_headers(decoy: Upstream, instance_id: str = "sbx-1") -> dict[str, str]:
    """What the aenv SDK sends: the instance id and a proxy URL, here the decoy's."""
    return {ENV_INSTANCE_ID: instance_id, MCP_PROXY_URL: str(decoy.url)}


# Proxy mode


@pytest.mark.parametrize(
    ("method", "path_qs", "upstream_path_qs"),
    [
        ("POST", "/mcp", f"{SANDBOX}/sbx-1/mcp"),
        ("GET", "/a/b?x=1", f"{SANDBOX}/sbx-1/a/b?x=1"),
        ("DELETE", "/mcp?", f"{SANDBOX}/sbx-1/mcp"),
        ("GET", "/health", f"{SANDBOX}/sbx-1/health"),
        ("POST", "/messages/?session_id=1", f"{SANDBOX}/sbx-1/messages/?session_id=1"),
    ],
)
async def test_proxy_mode_forwards_to_the_sandbox_path(
    arca: FakeArca, upstream: Upstream, aiohttp_client: AiohttpClient,
    method: str, path_qs: str, upstream_path_qs: str,
) -> None:
    gateway = await aiohttp_client(arca_gateway(arca.url))

    downstream_response = await gateway.request(method, path_qs, headers=sdk_headers(upstream), data=b'{"id":1}')

    assert (downstream_response.status, await downstream_response.json()) == (200, {"ok": True})
    [seen] = arca.seen
    assert (seen.method, seen.path_qs, seen.body) == (method, upstream_path_qs, b'{"id":1}')
    assert upstream.seen == []


async def test_base_url_path_prefix_is_kept(arca: FakeArca, upstream: Upstream, aiohttp_client: AiohttpClient) -> None:
    gateway = await aiohttp_client(arca_gateway(arca.url / "gw" / "v2" / ""))

    downstream_response = await gateway.get("/sse", headers=sdk_headers(upstream, "sbx.2_B"))
    arca.second_event.set()

    assert downstream_response.status == 200
    assert [(s.method, s.path_qs) for s in arca.seen] == [("GET", f"/gw/v2{SANDBOX}/sbx.2_B/sse")]


async def test_sandbox_headers_are_injected_and_replace_the_callers(
    arca: FakeArca, upstream: Upstream, aiohttp_client: AiohttpClient
) -> None:
    gateway = await aiohttp_client(arca_gateway(arca.url))
    headers = [
        *sdk_headers(upstream).items(),
        ("X-Agent-Sandbox-Api-Key", "forged"), ("x-agent-sandbox-api-key", "forged-again"),
        ("X-AGENT-SANDBOX-ID", "sbx-other"), ("Authorization", "Bearer caller-5ecret"), ("Mcp-Session-Id", "s-1"),
    ]

    downstream_response = await gateway.post("/mcp", headers=headers, data=b"{}")

    assert downstream_response.status == 200
    [seen] = arca.seen
    forwarded = {name.lower(): seen.headers.getall(name) for name in seen.headers}
    assert forwarded[SANDBOX_API_KEY.lower()] == [KEY]
    assert forwarded[SANDBOX_ID.lower()] == ["sbx-1"]
    assert forwarded["authorization"] == ["Bearer caller-5ecret"]
    assert forwarded["mcp-session-id"] == ["s-1"]
    assert forwarded["aenvcore-envinstance-id"] == ["sbx-1"]
    assert MCP_PROXY_URL not in seen.headers
    assert upstream.seen == []


async def test_sse_events_arrive_one_by_one(arca: FakeArca, upstream: Upstream, aiohttp_client: AiohttpClient) -> None:
    gateway = await aiohttp_client(arca_gateway(arca.url))

    downstream_response = await gateway.get("/sse", headers=sdk_headers(upstream))
    # The fake holds the second event until we have the first: a buffering proxy would hang here.
    first = await asyncio.wait_for(downstream_response.content.readuntil(b"\n\n"), 10)
    arca.second_event.set()
    rest = await asyncio.wait_for(downstream_response.content.read(), 10)

    assert (downstream_response.status, downstream_response.headers["Content-Type"]) == (200, "text/event-stream")
    assert (first, rest) == (b"event: endpoint\ndata: /messages/?session_id=1\n\n", b"data: second\n\n")


async def test_headerless_health_is_the_gateways_own(arca: FakeArca, aiohttp_client: AiohttpClient) -> None:
    gateway = await aiohttp_client(arca_gateway(arca.url))

    downstream_response = await gateway.get("/health")

    assert (downstream_response.status, await downstream_response.json()) == (200, {"status": "ok", "engine": "arca"})
    assert arca.seen == []


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ({}, {"error": "AEnvCore-EnvInstance-ID header is required", "code": "missing_header"}),
        ({MCP_PROXY_URL: "http://127.0.0.1:1"}, {"error": "AEnvCore-EnvInstance-ID header is required",
                                                   "code": "missing_header"}),
        *[
            ({ENV_INSTANCE_ID: bad}, {
                "error": 'AEnvCore-EnvInstance-ID header must be 1 to 128 characters of A-Za-z0-9._- other than "." '
                         'and ".."',
                "code": "malformed_header",
            })
            for bad in (".", "..", "a/b", "a%2Fb", "%2e%2e", "sbx 1", "x" * 129, "a?b", "a#b", "a\\b")
        ],
    ],
)
async def test_bad_or_missing_id_is_a_400_and_nothing_is_forwarded(
    arca: FakeArca, upstream: Upstream, aiohttp_client: AiohttpClient, headers: dict[str, str], error: dict[str, str]
) -> None:
    gateway = await aiohttp_client(arca_gateway(arca.url))
    headers = {MCP_PROXY_URL: str(upstream.url), **headers}

    downstream_response = await gateway.post("/mcp", headers=headers, data=b"{}")

    assert (downstream_response.status, await downstream_response.json()) == (400, error)
    assert (arca.seen, upstream.seen) == ([], [])


async def raw_request(client: TestClient[web.Request, web.Application], request: bytes) -> bytes:
    """Send bytes as they are (aiohttp's client would normalise dot segments and %2F away); read the reply."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_percent_encodings_reach_arca_byte_for_byte(
    arca: FakeArca, aiohttp_client: AiohttpClient
) -> None:
    gateway = await aiohttp_client(arca_gateway(arca.url))

    reply = await raw_request(gateway, f"GET /a%2Fb/%41?session_id=a%2Fb&q=%20 HTTP/1.1\r\nHost: gw\r\n"
                                       f"{ENV_INSTANCE_ID}: sbx-1\r\nConnection: close\r\n\r\n".encode())

    assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
    assert [seen.path_qs for seen in arca.seen] == [f"{SANDBOX}/sbx-1/a%2Fb/%41?session_id=a%2Fb&q=%20"]


@pytest.mark.parametrize("path", ["/../../openapi/v1/sandbox", "/mcp/%2e%2e/%2E%2E/x", "/a/..%2f..%2fb"])
async def test_dot_segments_cannot_climb_out_of_the_sandbox(
    arca: FakeArca, aiohttp_client: AiohttpClient, path: str
) -> None:
    gateway = await aiohttp_client(arca_gateway(arca.url))

    reply = await raw_request(gateway, f"GET {path} HTTP/1.1\r\nHost: gw\r\n{ENV_INSTANCE_ID}: sbx-1\r\n"
                                       "Connection: close\r\n\r\n".encode())

    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert json.loads(body) == {"error": 'the path must not contain "." or ".." segments', "code": "malformed_path"}
    assert arca.seen == []


async def test_unreachable_arca_is_a_502_without_the_key(upstream: Upstream, aiohttp_client: AiohttpClient) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    gateway = await aiohttp_client(arca_gateway(f"http://127.0.0.1:{closed_port}"))

    downstream_response = await gateway.post("/mcp", headers=sdk_headers(upstream), data=b"{}")

    assert (downstream_response.status, await downstream_response.json()) == (502, {
        "error": f"cannot connect to upstream 127.0.0.1:{closed_port}: connection refused",
        "code": "upstream_unreachable",
    })
    assert upstream.seen == []


# Reject mode


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/health"), ("POST", "/mcp"), ("GET", "/mcp"), ("DELETE", "/mcp"), ("GET", "/sse"),
     ("POST", "/messages/?session_id=1"), ("GET", "/some/random"), ("PUT", "/some/random?x=1")],
)
@pytest.mark.parametrize("routing", ["both", "id", "proxy-url"])
async def test_reject_mode_answers_501_and_forwards_nothing(
    arca: FakeArca, upstream: Upstream, aiohttp_client: AiohttpClient, method: str, path: str, routing: str
) -> None:
    gateway = await aiohttp_client(arca_gateway(arca.url, data_plane="reject"))
    by_routing: dict[str, dict[str, str]] = {
        "both": sdk_headers(upstream),
        "id": {ENV_INSTANCE_ID: "sbx-1"},
        "proxy-url": {MCP_PROXY_URL: str(upstream.url)},
    }
    headers = by_routing[routing]

    downstream_response = await gateway.request(method, path, headers=headers, data=b'{"jsonrpc":"2.0"}')

    assert downstream_response.status == 501
    assert downstream_response.content_type == "application/json"
    assert await downstream_response.read() == json.dumps(REJECTED).encode()
    assert (arca.seen, upstream.seen) == ([], [])


@pytest.mark.parametrize(("method", "path"), [("POST", "/mcp"), ("GET", "/sse"), ("GET", "/"), ("POST", "/health")])
async def test_reject_mode_refuses_requests_without_headers_too(
    arca: FakeArca, aiohttp_client: AiohttpClient, method: str, path: str
) -> None:
    gateway = await aiohttp_client(arca_gateway(arca.url, data_plane="reject"))

    downstream_response = await gateway.request(method, path)

    assert (downstream_response.status, await downstream_response.json()) == (501, REJECTED)
    assert arca.seen == []


async def test_reject_mode_keeps_headerless_health_up(arca: FakeArca, aiohttp_client: AiohttpClient) -> None:
    gateway = await aiohttp_client(arca_gateway(arca.url, data_plane="reject"))

    downstream_response = await gateway.get("/health", headers={"User-Agent": "kube-probe/1.30"})

    assert (downstream_response.status, await downstream_response.json()) == (200, {"status": "ok", "engine": "arca"})
    assert arca.seen == []


# Startup, as a newcomer runs it


def run_gateway(*args: str, environ: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", ""), **(environ or {})}
    return subprocess.run([sys.executable, "-m", "gateway", *args], env=env, capture_output=True, text=True,
                          timeout=30, check=False)


@pytest.mark.parametrize(
    ("args", "environ", "stderr"),
    [
        (["--schedule-type", "arca"], {"ARCA_API_KEY": KEY},
         "mcp-gateway: error: --schedule-type arca needs --arca-base-url (or ARCA_BASE_URL, or arca_base_url)"),
        (["--schedule-type", "arca", "--arca-base-url", "http://127.0.0.1:1"], {},
         "mcp-gateway: error: --schedule-type arca needs an API key: --arca-api-key, ARCA_API_KEY or "
         "--arca-api-key-file"),
        (["--schedule-type", "arca"], {"ARCA_BASE_URL": "127.0.0.1:8080", "ARCA_API_KEY": KEY},
         "mcp-gateway: error: --arca-base-url: '127.0.0.1:8080' from ARCA_BASE_URL must be an http:// or https:// "
         "URL with a host"),
        (["--schedule-type", "arca", "--arca-base-url", "http://a:1", "--arca-api-key", f"{KEY} x"], {},
         "mcp-gateway: error: --arca-api-key: <redacted> from --arca-api-key must be printable ASCII without spaces"),
        (["--schedule-type", "arca", "--arca-base-url", "http://a:1", "--arca-api-key-file", "/nonexistent/key"],
         {}, "mcp-gateway: error: --arca-api-key-file: cannot read /nonexistent/key: No such file or directory"),
        (["--schedule-type", "arca", "--arca-base-url", "http://a:1", "--arca-data-plane", "on"],
         {"ARCA_API_KEY": KEY},
         "mcp-gateway: error: --arca-data-plane: 'on' from --arca-data-plane must be one of reject, proxy"),
    ],
    ids=["no-base-url", "no-key", "base-url-without-scheme", "key-with-space", "key-file-missing", "bad-data-plane"],
)
def test_bad_arca_startup_exits_2_with_one_line(args: list[str], environ: dict[str, str], stderr: str) -> None:
    finished = run_gateway(*args, environ=environ)

    assert (finished.returncode, finished.stdout, finished.stderr) == (2, "", stderr + "\n")
    assert KEY not in finished.stderr


def test_help_shows_no_key_even_when_one_is_set() -> None:
    finished = run_gateway("--help", environ={"ARCA_API_KEY": KEY})

    assert finished.returncode == 0
    assert "--arca-api-key-file" in finished.stdout
    assert KEY not in finished.stdout + finished.stderr


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def gateway_process(arca: FakeArca, tmp_path: Path) -> AsyncIterator[tuple[URL, asyncio.subprocess.Process]]:
    """python -m gateway in proxy mode, the key read from a file, stopped at the end of the test."""
    key_file = tmp_path / "arca.key"
    key_file.write_text(KEY + "\n")
    port, admin_port = free_port(), free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "--schedule-type", "arca", "--arca-data-plane", "proxy",
        "--arca-base-url", str(arca.url), "--arca-api-key-file", str(key_file),
        "--host", "127.0.0.1", "--port", str(port), "--admin-port", str(admin_port),
        env={"PATH": os.environ.get("PATH", "")}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(150):
                try:
                    async with session.get(f"http://127.0.0.1:{admin_port}/readyz") as ready:
                        if ready.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)
            else:
                pytest.fail("the gateway did not become ready in 15 s")
        yield URL(f"http://127.0.0.1:{port}"), process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


async def test_the_key_never_reaches_a_log_line(
    arca: FakeArca, gateway_process: tuple[URL, asyncio.subprocess.Process]
) -> None:
    url, process = gateway_process
    async with aiohttp.ClientSession() as session:
        for headers, path in [({ENV_INSTANCE_ID: "sbx-1"}, "/mcp"), ({ENV_INSTANCE_ID: "../x"}, "/mcp"),
                              ({}, "/mcp"), ({ENV_INSTANCE_ID: "sbx-1", SANDBOX_API_KEY: "forged"}, "/a?b=1")]:
            async with session.post(url / path.lstrip("/"), headers=headers, data=b"{}") as response:
                await response.read()
    process.send_signal(signal.SIGTERM)
    stdout, stderr = await asyncio.wait_for(process.communicate(), 10)

    assert process.returncode == 0
    assert [s.headers[SANDBOX_API_KEY] for s in arca.seen] == [KEY, KEY]  # the key was in use
    log = (stdout + stderr).decode()
    assert '"status":400' in log and "gateway_started" in log  # the log lines we inspect exist
    assert KEY not in log


# The official mcp client, through the gateway, the fake Arca gateway and a FastMCP server

FASTMCP_SERVER = """
import socket, sys
from functools import partial

import anyio
from fastmcp import FastMCP

mcp = FastMCP("arca-sandbox")


@mcp.tool
def add(a: int, b: int) -> int:
    \"\"\"Add two integers.\"\"\"
    return a + b


sock = socket.socket()
sock.bind(("127.0.0.1", 0))
sock.listen(64)
print(sock.getsockname()[1], flush=True)
anyio.run(partial(mcp.run_http_async, show_banner=False, sockets=[sock], log_level="warning"))
"""


@pytest.fixture(scope="module")
def fastmcp_url() -> Iterator[URL]:
    """A FastMCP server in a subprocess on 127.0.0.1, its streamable-HTTP endpoint at /mcp."""
    with subprocess.Popen([sys.executable, "-c", FASTMCP_SERVER], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True, env={"PATH": os.environ.get("PATH", "")}) as process:
        try:
            assert process.stdout is not None
            port = int(process.stdout.readline())  # printed once the socket listens; the test timeout bounds it
            yield URL(f"http://127.0.0.1:{port}")
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


@dataclass(slots=True)
class Forwarder:
    url: URL
    seen: list[Seen] = field(default_factory=list)
    content_types: list[str] = field(default_factory=list)


@pytest.fixture
async def arca_to_fastmcp(aiohttp_server: AiohttpServer, fastmcp_url: URL) -> AsyncIterator[Forwarder]:
    """A fake Arca gateway that forwards {SANDBOX}/{id}/{path} to the FastMCP server, streaming replies."""
    forwarder = Forwarder(url=URL("http://127.0.0.1"))
    session = aiohttp.ClientSession(auto_decompress=False)

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        forwarder.seen.append(Seen(request.method, request.raw_path, request.headers.copy(), body))
        headers = without_hop_by_hop(request.headers)
        headers.popall("Host", None)
        async with session.request(
            request.method, fastmcp_url.with_path("/" + request.match_info["tail"], encoded=True)
            .with_query(request.query_string), headers=headers, data=body, allow_redirects=False,
        ) as sandbox_response:
            forwarder.content_types.append(sandbox_response.content_type)
            downstream = web.StreamResponse(status=sandbox_response.status,
                                            headers=without_hop_by_hop(sandbox_response.headers))
            await downstream.prepare(request)
            async for chunk in sandbox_response.content.iter_any():
                await downstream.write(chunk)
            await downstream.write_eof()
            return downstream

    app = web.Application()
    app.router.add_route("*", SANDBOX + "/{id}/{tail:.*}", forward)
    forwarder.url = (await aiohttp_server(app)).make_url("")
    yield forwarder
    await session.close()


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_mcp_client_session_through_arca_proxy_mode(
    arca_to_fastmcp: Forwarder, upstream: Upstream, aiohttp_server: AiohttpServer, mode: str
) -> None:
    gateway = await aiohttp_server(arca_gateway(arca_to_fastmcp.url))
    headers = sdk_headers(upstream, "sbx-mcp")

    async with (
        httpx2.AsyncClient(headers=headers, timeout=20) as http_client,
        Client(streamable_http_client(str(gateway.make_url("/mcp")), http_client=http_client), mode=mode) as client,
    ):
        tools = await client.list_tools()
        result = await client.call_tool("add", {"a": 2, "b": 3})

    assert [tool.name for tool in tools.tools] == ["add"]
    assert (result.is_error, result.structured_content) == (False, {"result": 5})
    assert {(s.method, s.path_qs) for s in arca_to_fastmcp.seen} <= {
        ("POST", f"{SANDBOX}/sbx-mcp/mcp"), ("GET", f"{SANDBOX}/sbx-mcp/mcp"), ("DELETE", f"{SANDBOX}/sbx-mcp/mcp"),
    }
    assert {(s.headers[SANDBOX_API_KEY], s.headers[SANDBOX_ID]) for s in arca_to_fastmcp.seen} == {(KEY, "sbx-mcp")}
    if mode == "legacy":  # the handshake opened a session; it travelled in Mcp-Session-Id and was closed
        assert "text/event-stream" in arca_to_fastmcp.content_types  # streamed answers crossed the gateway
        assert "Mcp-Session-Id" in arca_to_fastmcp.seen[-1].headers
        assert arca_to_fastmcp.seen[-1].method == "DELETE"
    assert upstream.seen == []
