"""Metrics and access log, end to end: real requests through the gateway, then /metrics and the log lines."""

from __future__ import annotations

import asyncio
import io
import json
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import structlog
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient, AiohttpServer
from yarl import URL

from gateway.admin import Readiness
from gateway.app import build_admin_app, build_gateway_app
from gateway.config import Settings
from gateway.errors import Unauthorized
from gateway.exchange import Exchange
from gateway.headers import ENV_INSTANCE_ID, MCP_PROXY_URL, REQUEST_ID
from gateway.log import AccessLine, _request_line, configure_logging
from gateway.metrics import MAX_SANDBOX_LABELS, UPSTREAM_ERROR_KINDS, Metrics
from tests.conftest import Upstream, gateway_settings

Labels = tuple[tuple[str, str], ...]


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """The JSON log lines written while the test runs."""
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream, cache=False)
    yield stream
    structlog.reset_defaults()


def log_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def access_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [line for line in log_lines(stream) if line["event"] == "request"]


def samples(text: str, name: str) -> dict[Labels, float]:
    """The samples called `name` in Prometheus text, by their sorted labels."""
    found: dict[Labels, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def request_labels(method: str, endpoint: str, rpc_method: str, status: int) -> Labels:
    return (("endpoint", endpoint), ("method", method), ("rpc_method", rpc_method), ("status", str(status)))


@dataclass
class Observed:
    gateway: Any  # TestClient of the data plane
    admin: Any  # TestClient of the admin port

    async def metrics(self) -> str:
        scrape = await self.admin.get("/metrics")
        assert scrape.status == 200
        assert scrape.headers["Content-Type"].startswith("text/plain")
        return await scrape.text()


async def observed_gateway(aiohttp_client: AiohttpClient, settings: Settings | None = None) -> Observed:
    metrics = Metrics.build(CollectorRegistry())
    gateway = await aiohttp_client(build_gateway_app(settings or gateway_settings(), metrics=metrics))
    admin = await aiohttp_client(build_admin_app(Readiness(ready=True), metrics))
    return Observed(gateway, admin)


@dataclass
class SseUpstream:
    url: URL
    release: asyncio.Event


@pytest.fixture
async def sse_upstream(aiohttp_server: AiohttpServer) -> SseUpstream:
    """An upstream answering every request with an event stream: one event, then a second once released.

    With an X-Break header it aborts its connection after the first event instead.
    """
    release = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        await request.read()
        answer = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await answer.prepare(request)
        await answer.write(b"data: one\n\n")
        if "X-Break" in request.headers:
            assert request.transport is not None
            request.transport.abort()
            return answer
        await release.wait()
        await answer.write(b"data: two\n\n")
        await answer.write_eof()
        return answer

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", stream)
    return SseUpstream((await aiohttp_server(app)).make_url(""), release)


def rpc(method: str, request_id: int = 1) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": {}}).encode()


async def test_counters_and_histogram_count_each_request_once_with_bounded_labels(
    upstream: Upstream, aiohttp_client: AiohttpClient, log_stream: io.StringIO
) -> None:
    observed = await observed_gateway(aiohttp_client)
    routed = {MCP_PROXY_URL: str(upstream.url)}

    statuses = [
        (await observed.gateway.post("/mcp", data=rpc("initialize"), headers=routed)).status,
        (await observed.gateway.post("/mcp", data=rpc("tools/call"), headers=routed)).status,
        (await observed.gateway.post("/mcp/", data=rpc("tools/call", 2), headers=routed)).status,
        (await observed.gateway.post("/messages/?session_id=s1", data=rpc("x/unknown"), headers=routed)).status,
        (await observed.gateway.get("/some/other/path", headers=routed)).status,
        (await observed.gateway.get("/health")).status,
        (await observed.gateway.post("/mcp", data=rpc("tools/call"))).status,  # no routing header
    ]
    text = await observed.metrics()

    assert statuses == [200, 200, 200, 200, 200, 200, 400]
    assert samples(text, "aenv_api_mcp_requests_total") == {
        request_labels("POST", "/mcp", "initialize", 200): 1.0,
        request_labels("POST", "/mcp", "tools/call", 200): 2.0,
        request_labels("POST", "/message", "other", 200): 1.0,
        request_labels("GET", "/other", "", 200): 1.0,
        request_labels("GET", "/health", "", 200): 1.0,
        request_labels("POST", "/mcp", "", 400): 1.0,  # refused before its body was read
    }
    assert samples(text, "aenv_api_mcp_request_duration_ms_count") == samples(text, "aenv_api_mcp_requests_total")
    buckets = samples(text, "aenv_api_mcp_request_duration_ms_bucket")
    assert sorted({dict(labels)["le"] for labels in buckets}, key=float) == [
        *(f"{2.0**power}" for power in range(20)), "+Inf"]
    assert samples(text, "aenv_gateway_refused_requests_total") == {
        (("reason", "missing_header"), ("status", "400")): 1.0}
    forwarded_bytes = sum(len(seen.body) for seen in upstream.seen)
    assert samples(text, "aenv_gateway_relayed_bytes_total") == {
        (("direction", "upstream"),): float(forwarded_bytes),
        (("direction", "downstream"),): 5.0 * len(b'{"ok": true}'),
    }
    assert samples(text, "aenv_gateway_upstream_response_ms_count") == {(): 5.0}
    assert samples(text, "aenv_gateway_upstream_errors_total") == {
        (("kind", kind),): 0.0 for kind in UPSTREAM_ERROR_KINDS}
    assert samples(text, "aenv_gateway_active_streams") == {(): 0.0}
    assert len(access_lines(log_stream)) == 7


async def test_one_access_line_per_request_with_its_fields(
    upstream: Upstream, aiohttp_client: AiohttpClient, log_stream: io.StringIO
) -> None:
    observed = await observed_gateway(aiohttp_client)
    headers = {MCP_PROXY_URL: str(upstream.url), "AEnvCore-EnvInstance-ID": "env-42", REQUEST_ID: "req-abc"}

    forwarded = await observed.gateway.post("/mcp?token=query-secret", data=rpc("tools/call"), headers=headers)
    refused = await observed.gateway.post("/mcp", data=rpc("tools/call"), headers={REQUEST_ID: "req-def"})

    assert (forwarded.status, forwarded.headers[REQUEST_ID]) == (200, "req-abc")
    # A JSON-RPC request is refused in JSON-RPC, the form MCP clients show (#13).
    assert (refused.status, await refused.json(), refused.headers[REQUEST_ID]) == (400, {
        "jsonrpc": "2.0", "id": 1, "error": {"code": -32600, "message": "AEnvCore-MCPProxy-URL header is required",
                                             "data": {"status": 400, "code": "missing_header"}}}, "req-def")
    [line_ok, line_refused] = log_lines(log_stream)  # nothing else: the refusal is logged once
    for line in (line_ok, line_refused):
        assert isinstance(line.pop("timestamp"), str)
        assert 0 <= line.pop("latency_ms") < 10_000
    assert line_ok == {
        "event": "request", "level": "info", "request_id": "req-abc", "method": "POST", "path": "/mcp",
        "status": 200, "bytes_in": len(rpc("tools/call")), "bytes_out": len(b'{"ok": true}'),
        "instance_id": "env-42", "target": f"127.0.0.1:{upstream.url.port}", "rpc_method": "tools/call",
        "engine": "k8s", "outcome": "ok",
    }
    assert line_refused == {
        "event": "request", "level": "info", "request_id": "req-def", "method": "POST", "path": "/mcp",
        "status": 400, "bytes_in": len(rpc("tools/call")), "bytes_out": len(await refused.read()),
        "instance_id": "", "target": "", "rpc_method": "", "engine": "k8s", "outcome": "refused",
        "code": "missing_header", "error": "AEnvCore-MCPProxy-URL header is required",
    }


async def test_request_id_is_kept_or_made_and_reaches_the_upstream_the_client_and_the_log(
    upstream: Upstream, aiohttp_client: AiohttpClient, log_stream: io.StringIO
) -> None:
    observed = await observed_gateway(aiohttp_client)
    routed = {MCP_PROXY_URL: str(upstream.url)}

    kept = await observed.gateway.get("/mcp", headers={**routed, REQUEST_ID: "from-caller"})
    made = [await observed.gateway.get("/mcp", headers=routed) for _ in range(2)]

    made_ids = [response.headers[REQUEST_ID] for response in made]
    assert kept.headers[REQUEST_ID] == "from-caller"
    assert len(set(made_ids)) == 2 and all(len(made_id) >= 16 for made_id in made_ids)
    assert [seen.headers[REQUEST_ID] for seen in upstream.seen] == ["from-caller", *made_ids]
    assert [line["request_id"] for line in access_lines(log_stream)] == ["from-caller", *made_ids]


async def test_an_sse_stream_is_gauged_while_open_counted_once_and_kept_out_of_the_histogram(
    sse_upstream: SseUpstream, aiohttp_client: AiohttpClient, log_stream: io.StringIO
) -> None:
    observed = await observed_gateway(aiohttp_client)
    headers = {MCP_PROXY_URL: str(sse_upstream.url)}

    stream = await observed.gateway.post("/mcp", data=rpc("tools/call"), headers=headers)
    first = await asyncio.wait_for(stream.content.readuntil(b"\n\n"), 5)
    while_open = await observed.metrics()
    sse_upstream.release.set()
    rest = await asyncio.wait_for(stream.content.read(), 5)
    after = await observed.metrics()

    assert (first, rest) == (b"data: one\n\n", b"data: two\n\n")
    assert samples(while_open, "aenv_gateway_active_streams") == {(): 1.0}
    assert samples(while_open, "aenv_api_mcp_requests_total") == {}  # counted when it ends
    assert samples(after, "aenv_gateway_active_streams") == {(): 0.0}
    assert samples(after, "aenv_api_mcp_requests_total") == {request_labels("POST", "/mcp", "tools/call", 200): 1.0}
    assert samples(after, "aenv_api_mcp_request_duration_ms_count") == {}
    [line] = access_lines(log_stream)
    assert (line["stream"], line["outcome"], line["status"], line["bytes_out"]) == (True, "ok", 200, 22)


async def test_a_client_leaving_a_stream_is_logged_once_as_client_closed(
    sse_upstream: SseUpstream, aiohttp_client: AiohttpClient, log_stream: io.StringIO
) -> None:
    observed = await observed_gateway(aiohttp_client)

    stream = await observed.gateway.get("/mcp", headers={MCP_PROXY_URL: str(sse_upstream.url)})
    await asyncio.wait_for(stream.content.readuntil(b"\n\n"), 5)
    stream.close()
    async with asyncio.timeout(5):
        while not access_lines(log_stream):  # noqa: ASYNC110  (a log buffer has no event to await)
            await asyncio.sleep(0.01)
    text = await observed.metrics()

    [line] = access_lines(log_stream)
    assert (line["outcome"], line["status"], line["stream"], line["bytes_out"]) == ("client_closed", 200, True, 11)
    assert samples(text, "aenv_gateway_active_streams") == {(): 0.0}
    assert samples(text, "aenv_api_mcp_requests_total") == {request_labels("GET", "/mcp", "", 200): 1.0}


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_upstream_failures_are_counted_by_kind(
    sse_upstream: SseUpstream, aiohttp_client: AiohttpClient, log_stream: io.StringIO
) -> None:
    observed = await observed_gateway(aiohttp_client)

    port = closed_port()
    refused = await observed.gateway.post(
        "/mcp", data=rpc("initialize"), headers={MCP_PROXY_URL: f"http://127.0.0.1:{port}", ENV_INSTANCE_ID: "env-9"})
    broken = await observed.gateway.get("/mcp", headers={MCP_PROXY_URL: str(sse_upstream.url), "X-Break": "1"})
    broken_body = await asyncio.wait_for(broken.read(), 5)
    text = await observed.metrics()

    assert (refused.status, (await refused.json())["error"]["data"]["code"]) == (502, "upstream_unreachable")
    assert (broken.status, broken_body) == (200, b"data: one\n\n")  # the stream ends; nothing is invented
    errors = samples(text, "aenv_gateway_upstream_errors_total")
    assert {labels[0][1]: value for labels, value in errors.items() if value} == {
        "connect_refused": 1.0, "reset_mid_stream": 1.0}
    assert samples(text, "aenv_gateway_refused_requests_total") == {}  # the upstream failed, not the request
    # Which sandboxes fail: by instance id when the caller names one, else by target host:port.
    assert samples(text, "aenv_gateway_sandbox_errors_total") == {
        (("kind", "connect_refused"), ("sandbox", "env-9")): 1.0,
        (("kind", "reset_mid_stream"), ("sandbox", f"127.0.0.1:{sse_upstream.url.port}")): 1.0}
    assert [(line["outcome"], line.get("upstream_error"), line["level"]) for line in access_lines(log_stream)] == [
        ("upstream_error", "connect_refused", "warning"), ("upstream_error", "reset_mid_stream", "warning")]


async def test_no_secret_reaches_a_log_line_or_a_metric(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, log_stream: io.StringIO
) -> None:
    arca_key = "arca-key-5ecret-0123456789"
    bearer = "Bearer tok-5ecret-abcdef"

    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"authorization": request.headers["Authorization"], "key": arca_key,
                                  "api_key": "k-5ecret"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    upstream_url = (await aiohttp_server(app)).make_url("")
    settings = gateway_settings(arca_api_key=arca_key, log_bodies=4096)
    observed = await observed_gateway(aiohttp_client, settings)
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                       "params": {"token": "t-5ecret", "note": f"see {arca_key}", "h": bearer}}).encode()

    answer = await observed.gateway.post(
        "/mcp?api_key=q-5ecret", data=body,
        headers={MCP_PROXY_URL: str(upstream_url), "Authorization": bearer, "Cookie": "sid=c-5ecret"})
    await observed.gateway.post("/mcp", data=body, headers={"Authorization": bearer})  # refused
    text = await observed.metrics()

    assert (await answer.json())["key"] == arca_key  # bodies themselves pass untouched
    [line, _] = access_lines(log_stream)
    assert "<redacted>" in line["request_body"] and "<redacted>" in line["response_body"]
    assert "5ecret" not in log_stream.getvalue()
    assert "5ecret" not in text


async def test_log_bodies_keeps_the_first_bytes_of_non_stream_bodies_only(
    upstream: Upstream, sse_upstream: SseUpstream, aiohttp_client: AiohttpClient, log_stream: io.StringIO
) -> None:
    observed = await observed_gateway(aiohttp_client, gateway_settings(log_bodies=10))

    await observed.gateway.post("/mcp", data=rpc("ping"), headers={MCP_PROXY_URL: str(upstream.url)})
    stream = await observed.gateway.get("/mcp", headers={MCP_PROXY_URL: str(sse_upstream.url), "X-Break": "1"})
    await asyncio.wait_for(stream.read(), 5)

    plain, streamed = access_lines(log_stream)
    assert (plain["request_body"], plain["response_body"]) == ('{"jsonrpc"', '{"ok": tru')
    assert "response_body" not in streamed and "request_body" not in streamed


@pytest.fixture
async def mcp_upstream(aiohttp_server: AiohttpServer) -> AsyncIterator[URL]:
    """A minimal streamable-HTTP MCP server: JSON answers, tools/call answered as SSE."""

    async def mcp(request: web.Request) -> web.StreamResponse:
        if request.method == "GET":
            return web.Response(status=405)
        if request.method == "DELETE":
            return web.Response(status=200)
        message = await request.json()
        if "id" not in message:
            return web.Response(status=202)
        result: dict[str, Any] = {}
        if message["method"] == "initialize":
            result = {"protocolVersion": message["params"]["protocolVersion"], "capabilities": {"tools": {}},
                      "serverInfo": {"name": "fake", "version": "1"}}
        elif message["method"] == "tools/list":
            result = {"tools": [{"name": "add", "inputSchema": {"type": "object"}}]}
        elif message["method"] == "tools/call":
            answer = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Mcp-Session-Id": "s1"})
            await answer.prepare(request)
            event = {"jsonrpc": "2.0", "id": message["id"], "result": {"content": [{"type": "text", "text": "3"}]}}
            await answer.write(b"event: message\ndata: " + json.dumps(event).encode() + b"\n\n")
            await answer.write_eof()
            return answer
        return web.json_response({"jsonrpc": "2.0", "id": message["id"], "result": result},
                                 headers={"Mcp-Session-Id": "s1"})

    app = web.Application()
    app.router.add_route("*", "/mcp", mcp)
    yield (await aiohttp_server(app)).make_url("")


async def test_an_mcp_client_session_through_the_gateway_is_counted_by_rpc_method(
    mcp_upstream: URL, aiohttp_client: AiohttpClient, log_stream: io.StringIO
) -> None:
    import httpx2
    from mcp.client.session import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    observed = await observed_gateway(aiohttp_client)
    gateway_url = str(observed.gateway.make_url("/mcp"))
    async with (
        httpx2.AsyncClient(headers={MCP_PROXY_URL: str(mcp_upstream)}, timeout=5) as http,
        streamable_http_client(gateway_url, http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        await session.list_tools()
        result = await session.call_tool("add", {"a": 1, "b": 2})
    text = await observed.metrics()

    assert result.content[0].text == "3"  # type: ignore[union-attr]
    counted = samples(text, "aenv_api_mcp_requests_total")
    assert {labels: value for labels, value in counted.items() if dict(labels)["method"] == "POST"} == {
        request_labels("POST", "/mcp", "initialize", 200): 1.0,
        request_labels("POST", "/mcp", "notifications/initialized", 202): 1.0,
        request_labels("POST", "/mcp", "tools/list", 200): 1.0,
        request_labels("POST", "/mcp", "tools/call", 200): 1.0,
    }
    timed = samples(text, "aenv_api_mcp_request_duration_ms_count")
    assert request_labels("POST", "/mcp", "tools/call", 200) not in timed  # answered as a stream
    assert len(access_lines(log_stream)) == sum(counted.values())


async def test_console_format_and_log_level_go_through_structlog_with_the_same_fields(
    upstream: Upstream, aiohttp_client: AiohttpClient
) -> None:
    stream = io.StringIO()
    configure_logging("console", "info", stream=stream, cache=False)
    try:
        observed = await observed_gateway(aiohttp_client)
        await observed.gateway.post("/mcp", data=rpc("ping"), headers={MCP_PROXY_URL: str(upstream.url),
                                                                        REQUEST_ID: "req-console"})
    finally:
        structlog.reset_defaults()

    [line] = stream.getvalue().splitlines()
    assert "request" in line and "request_id=req-console" in line and "rpc_method=ping" in line
    assert "outcome=ok" in line and "status=200" in line


async def test_log_level_warning_keeps_failures_and_drops_successes(
    upstream: Upstream, aiohttp_client: AiohttpClient
) -> None:
    stream = io.StringIO()
    configure_logging("json", "warning", stream=stream, cache=False)
    try:
        observed = await observed_gateway(aiohttp_client)
        await observed.gateway.get("/mcp", headers={MCP_PROXY_URL: str(upstream.url)})
        await observed.gateway.get("/mcp", headers={MCP_PROXY_URL: f"http://127.0.0.1:{closed_port()}"})
    finally:
        structlog.reset_defaults()

    assert [(line["level"], line["outcome"]) for line in log_lines(stream)] == [("warning", "upstream_error")]


async def test_a_streamed_body_is_labelled_from_its_first_bytes_and_forwarded_whole(
    upstream: Upstream, aiohttp_client: AiohttpClient, log_stream: io.StringIO
) -> None:
    observed = await observed_gateway(aiohttp_client)
    large = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                        "params": {"blob": "x" * 200_000}}).encode()

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the gateway streams it
        for start in range(0, len(large), 16_384):
            yield large[start:start + 16_384]

    sized = await observed.gateway.post("/mcp", data=large, headers={MCP_PROXY_URL: str(upstream.url)})
    chunked = await observed.gateway.post("/mcp", data=chunks(), headers={MCP_PROXY_URL: str(upstream.url)})
    text = await observed.metrics()

    assert (sized.status, chunked.status) == (200, 200)
    assert [seen.body for seen in upstream.seen] == [large, large]
    assert samples(text, "aenv_api_mcp_requests_total") == {request_labels("POST", "/mcp", "tools/call", 200): 2.0}
    assert samples(text, "aenv_gateway_relayed_bytes_total")[(("direction", "upstream"),)] == 2.0 * len(large)
    assert [line["bytes_in"] for line in access_lines(log_stream)] == [len(large), len(large)]


def test_the_access_line_short_cut_writes_what_structlog_would(log_stream: io.StringIO) -> None:
    fields = {"request_id": 'a"b\\c\n\u00e9\u2028', "status": 200, "latency_ms": 0.125, "stream": True,
              "path": "/caf\u00e9/\x00"}

    AccessLine().write("warning", fields)
    structlog.get_logger("gateway.access").warning("request", **fields)

    short_cut, through_structlog = log_lines(log_stream)
    assert short_cut.pop("timestamp")[:11] == through_structlog.pop("timestamp")[:11]
    assert short_cut == through_structlog == {"event": "request", "level": "warning", **fields}


texts = st.text(max_size=40)


@given(request_id=texts, path=texts, instance_id=texts, target=texts, message=texts,
       status=st.integers(100, 599), elapsed_ms=st.floats(0, 1e7), bytes_in=st.integers(0, 2**40),
       bytes_out=st.integers(0, 2**40), is_stream=st.booleans(), upstream_error=st.sampled_from(("", "timeout")),
       refused=st.booleans(), traced=st.booleans())
def test_the_rendered_request_line_is_the_one_the_fields_would_make(
    request_id: str, path: str, instance_id: str, target: str, message: str, status: int, elapsed_ms: float,
    bytes_in: int, bytes_out: int, is_stream: bool, upstream_error: str, refused: bool, traced: bool,
) -> None:
    exchange = Exchange(request_id)
    exchange.target, exchange.is_stream, exchange.upstream_error = target, is_stream, upstream_error
    exchange.error = Unauthorized(message) if refused else None
    fields: dict[str, Any] = {
        "request_id": request_id, "method": "POST", "path": path, "status": status,
        "latency_ms": round(elapsed_ms, 3), "bytes_in": bytes_in, "bytes_out": bytes_out,
        "instance_id": instance_id, "target": target, "rpc_method": "tools/call", "engine": "k8s", "outcome": "ok",
    }
    if is_stream:
        fields["stream"] = True
    if upstream_error:
        fields["upstream_error"] = upstream_error
    if refused:
        fields["code"], fields["error"] = "unauthorized", message
    trace_id, span_id = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7") if traced else ("", "")
    if traced:
        fields["trace_id"], fields["span_id"] = trace_id, span_id
    stream = io.StringIO()
    configure_logging("json", stream=stream, cache=False)
    line = AccessLine()
    line.add("info", fields, "2026-12-01T00:00:00.000001Z")
    line.add_request(_request_line("2026-12-01T00:00:00.000001Z", "info", exchange, "POST", path, status, elapsed_ms,
                                   bytes_in, bytes_out, instance_id, "tools/call", json.dumps("k8s"), trace_id,
                                   span_id), "info")
    line.flush()

    from_fields, rendered = stream.getvalue().splitlines()
    assert rendered == from_fields


async def test_a_caller_leaving_before_the_upstream_answers_is_logged_as_499_client_closed(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, log_stream: io.StringIO
) -> None:
    never = asyncio.Event()

    async def silent(request: web.Request) -> web.Response:
        await never.wait()
        return web.Response()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", silent)
    upstream_url = (await aiohttp_server(app)).make_url("")
    observed = await observed_gateway(aiohttp_client)

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await observed.gateway.post("/mcp", data=rpc("tools/call"), headers={MCP_PROXY_URL: str(upstream_url)})
    async with asyncio.timeout(5):
        while not access_lines(log_stream):  # noqa: ASYNC110  (a log buffer has no event to await)
            await asyncio.sleep(0.01)
    text = await observed.metrics()

    [line] = access_lines(log_stream)
    assert (line["status"], line["outcome"], line["rpc_method"]) == (499, "client_closed", "tools/call")
    assert samples(text, "aenv_api_mcp_requests_total") == {request_labels("POST", "/mcp", "tools/call", 499): 1.0}


def test_failing_sandboxes_beyond_the_bound_share_one_series() -> None:
    metrics = Metrics.build(CollectorRegistry())
    for n in range(MAX_SANDBOX_LABELS + 50):
        exchange = Exchange(f"r{n}", 0)
        exchange.target = "10.0.0.1:8081"
        exchange.upstream_failed("timeout")
        metrics.observe("POST", "/mcp", 504, "tools/call", 1.0, exchange, 10, "", f"env-{n}")

    errors = samples(generate_latest(metrics.registry).decode(), "aenv_gateway_sandbox_errors_total")
    assert len(errors) == MAX_SANDBOX_LABELS + 1
    assert errors[(("kind", "timeout"), ("sandbox", "other"))] == 50.0


@given(st.lists(st.floats(min_value=0, max_value=2.0**21, allow_nan=False), max_size=50))
def test_tallied_durations_export_as_prometheus_would_observe_them(durations: list[float]) -> None:
    """flush() writes a batch into prometheus_client's histogram internals; they must match observe()."""
    metrics = Metrics.build(CollectorRegistry())
    reference = Metrics.build(CollectorRegistry())
    for elapsed_ms in durations:
        exchange = Exchange("r", 0)
        exchange.target, exchange.upstream_ms, exchange.bytes_out = "10.0.0.1:8081", elapsed_ms / 2, 7
        metrics.observe("POST", "/mcp", 200, "tools/call", elapsed_ms, exchange, 11)
        reference.requests.labels("POST", "/mcp", "tools/call", "200").inc()
        reference.duration_ms.labels("POST", "/mcp", "tools/call", "200").observe(elapsed_ms)
        reference.upstream_response_ms.observe(elapsed_ms / 2)
        reference.relayed_bytes.labels("upstream").inc(11)
        reference.relayed_bytes.labels("downstream").inc(7)
    metrics.flush()

    def exported(registry: CollectorRegistry) -> dict[str, dict[Labels, float]]:
        text = generate_latest(registry).decode()
        return {family.name: {(*tuple(sorted(s.labels.items())), (s.name, "")): s.value
                              for s in family.samples if not s.name.endswith("_created")}
                for family in text_string_to_metric_families(text)
                if family.name.startswith(("aenv_api", "aenv_gateway_upstream_response", "aenv_gateway_relayed"))}

    assert exported(metrics.registry) == exported(reference.registry)


async def test_metrics_scrape_sees_requests_finished_in_the_same_loop_pass() -> None:
    """Observations wait for flush(); an exposition flushes first, so nothing observed is missing."""
    metrics = Metrics.build(CollectorRegistry())
    exchange = Exchange("r", 0)
    metrics.observe("GET", "/mcp", 200, "", 3.0, exchange, 0)
    text = metrics.exposition().decode()
    assert samples(text, "aenv_api_mcp_requests_total") == {request_labels("GET", "/mcp", "", 200): 1.0}


async def test_a_request_the_parser_refuses_is_answered_logged_and_counted(
    upstream: Upstream, aiohttp_client: AiohttpClient, log_stream: io.StringIO
) -> None:
    observed = await observed_gateway(aiohttp_client)
    reader, writer = await asyncio.open_connection("127.0.0.1", observed.gateway.port)
    try:
        writer.write(b"GET /mcp HTTP/1.1\r\nHost: gw\r\nBad Header: x\r\n\r\n")  # a space in a field name
        async with asyncio.timeout(5):
            reply = await reader.read()  # the gateway closes after answering
    finally:
        writer.close()

    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert json.loads(body)["code"] == "bad_request"
    assert samples(await observed.metrics(), "aenv_gateway_refused_requests_total") == {
        (("reason", "bad_request"), ("status", "400")): 1.0}
    [line] = access_lines(log_stream)
    assert (line["status"], line["outcome"], line["code"]) == (400, "refused", "bad_request")
    assert upstream.seen == []
