"""Traces: W3C trace context across the gateway, and its OpenTelemetry spans received over real OTLP/HTTP.

The receiver is an aiohttp app decoding ExportTraceServiceRequest with opentelemetry-proto; the
gateway runs as the real program (tests/process.py) with the OTEL_* environment pointing at it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, web
from google.protobuf.json_format import MessageToDict
from multidict import CIMultiDict, CIMultiDictProxy
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from pytest_aiohttp import AiohttpClient, AiohttpServer
from yarl import URL

from gateway.config import Settings, load_settings
from gateway.errors import ConfigError
from gateway.headers import ENV_INSTANCE_ID, MCP_PROXY_URL
from gateway.messages import Request
from gateway.tracing import DEFAULT_ENDPOINT, TraceParent, Tracing, parse_traceparent, tracing_config
from tests.conftest import SECRET_MARKER, UPSTREAM_CLIENTS, serve_gateway
from tests.process import GatewayProcess, free_port, gateway_process

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
CALLER_TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
TRACESTATE = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
BAGGAGE = "userId=alice,rollout=17"
TOOL_CALL = b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo","arguments":{}}}'
SSE_EVENTS = 3
SSE_GAP_S = 0.1
# Switched on with the standard variables; a short batch delay so that spans leave at once.
OTEL_ON = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_EXPORTER_OTLP_TIMEOUT": "2000"}


def _without_otel(env: Mapping[str, str]) -> dict[str, str]:
    return {name: value for name, value in env.items() if not name.startswith("OTEL_")}


# --- traceparent ---------------------------------------------------------------------------------

def test_a_valid_traceparent_gives_its_ids() -> None:
    assert parse_traceparent(CALLER_TRACEPARENT) == TraceParent(CALLER_TRACE, CALLER_SPAN, 1)
    assert parse_traceparent(f" 00-{CALLER_TRACE}-{CALLER_SPAN}-00\t") == TraceParent(CALLER_TRACE, CALLER_SPAN, 0)
    # A later version may append fields after a dash (W3C Trace Context §3.2.4).
    assert parse_traceparent(f"cc-{CALLER_TRACE}-{CALLER_SPAN}-01-what-comes") == TraceParent(
        CALLER_TRACE, CALLER_SPAN, 1)


@pytest.mark.parametrize("value", [
    "",
    f"00-{CALLER_TRACE}-{CALLER_SPAN}-01-extra",   # version 00 is exactly 55 characters
    f"ff-{CALLER_TRACE}-{CALLER_SPAN}-01",         # version ff is forbidden
    f"00-{CALLER_TRACE.upper()}-{CALLER_SPAN}-01",  # uppercase hex
    f"00-{'0' * 32}-{CALLER_SPAN}-01",             # all-zero trace id
    f"00-{CALLER_TRACE}-{'0' * 16}-01",            # all-zero parent id
    f"00_{CALLER_TRACE}_{CALLER_SPAN}_01",
    f"00-{CALLER_TRACE}-{CALLER_SPAN}-0g",
    f'00-{CALLER_TRACE[:-1]}"-{CALLER_SPAN}-01',   # nothing but hex reaches a log line
    f"cc-{CALLER_TRACE}-{CALLER_SPAN}-01x",
])
def test_an_invalid_traceparent_is_ignored(value: str) -> None:
    assert parse_traceparent(value) is None


# --- configuration -----------------------------------------------------------------------------

def test_tracing_is_off_unless_the_otlp_exporter_is_named() -> None:
    assert tracing_config(Settings(), {}) is None
    assert tracing_config(Settings(), {"OTEL_TRACES_EXPORTER": "none"}) is None
    assert tracing_config(Settings(), {**OTEL_ON, "OTEL_SDK_DISABLED": "true"}) is None
    assert tracing_config(Settings(trace_exporter="none"), OTEL_ON) is None  # the flag wins


def test_the_standard_variables_configure_the_exporter() -> None:
    config = tracing_config(Settings(), {
        "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/",
        "OTEL_EXPORTER_OTLP_HEADERS": "api-key=abc%3D%3D,x-team = rl", "OTEL_SERVICE_NAME": "gw-a",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25",
        "OTEL_BSP_SCHEDULE_DELAY": "200", "OTEL_EXPORTER_OTLP_TIMEOUT": "3000",
    })
    assert config is not None
    assert (config.endpoint, config.service_name, config.sampler, config.sampler_arg) == (
        "http://collector:4318/v1/traces", "gw-a", "parentbased_traceidratio", 0.25)
    assert (dict(config.headers), config.schedule_delay_ms, config.timeout_s) == (
        {"api-key": "abc==", "x-team": "rl"}, 200.0, 3.0)
    assert "abc==" not in repr(config)


def test_defaults_and_the_signal_endpoint() -> None:
    default = tracing_config(Settings(), {"OTEL_TRACES_EXPORTER": "otlp"})
    assert default is not None
    assert (default.endpoint, default.service_name, default.sampler) == (
        DEFAULT_ENDPOINT + "/v1/traces", "mcp-gateway", "parentbased_always_on")
    signal_only = tracing_config(Settings(), {"OTEL_TRACES_EXPORTER": "otlp",
                                              "OTEL_EXPORTER_OTLP_ENDPOINT": "http://base:4318",
                                              "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:9/custom"})
    assert signal_only is not None and signal_only.endpoint == "http://t:9/custom"  # used as is
    flags = tracing_config(Settings(trace_exporter="otlp", trace_endpoint="https://otel.example",
                                    trace_sampler="traceidratio", trace_sampler_arg="0.5"),
                           {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:9/custom"})
    assert flags is not None
    assert (flags.endpoint, flags.sampler, flags.sampler_arg) == ("https://otel.example/v1/traces", "traceidratio", 0.5)


def test_the_trace_flags_parse_and_stop_on_a_bad_value() -> None:
    settings = load_settings(["--trace-exporter", "otlp", "--trace-endpoint", "http://collector:4318",
                              "--trace-sampler", "parentbased_traceidratio", "--trace-sampler-arg", "0.1"], {})
    config = tracing_config(settings, {"OTEL_TRACES_EXPORTER": "none", "OTEL_TRACES_SAMPLER": "always_off"})
    assert config is not None
    assert (config.endpoint, config.sampler, config.sampler_arg) == (
        "http://collector:4318/v1/traces", "parentbased_traceidratio", 0.1)
    for argv, message in ((["--trace-sampler-arg", "1.5"], "--trace-sampler-arg: '1.5' from --trace-sampler-arg"),
                          (["--trace-exporter", "grpc"], "--trace-exporter: 'grpc'"),
                          (["--trace-sampler", "sometimes"], "--trace-sampler: 'sometimes'")):
        with pytest.raises(ConfigError, match=message):
            load_settings(argv, {})


@pytest.mark.parametrize(("environ", "message"), [
    ({"OTEL_TRACES_EXPORTER": "console"}, "OTEL_TRACES_EXPORTER: 'console' is not supported"),
    ({**OTEL_ON, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "OTEL_EXPORTER_OTLP_PROTOCOL: 'grpc' is not supported"),
    ({**OTEL_ON, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"}, "'http/json' is not supported"),
    ({**OTEL_ON, "OTEL_TRACES_SAMPLER": "jaeger_remote"}, "OTEL_TRACES_SAMPLER: 'jaeger_remote'"),
    ({**OTEL_ON, "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"}, "ratio from 0 to 1"),
    ({**OTEL_ON, "OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}, "must be an http:// or https:// URL"),
    ({**OTEL_ON, "OTEL_BSP_SCHEDULE_DELAY": "soon"}, "OTEL_BSP_SCHEDULE_DELAY"),
    ({**OTEL_ON, "OTEL_EXPORTER_OTLP_HEADERS": f"key{SECRET_MARKER}"}, "each entry must be key=value"),
])
def test_what_the_gateway_cannot_honour_stops_startup(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        tracing_config(Settings(), environ)
    assert SECRET_MARKER not in str(caught.value)


def test_the_program_says_in_one_line_what_is_missing(tmp_path: Path) -> None:
    # The extra is installed here: a child interpreter that cannot import opentelemetry stands in for
    # a `pip install .` without [otel].
    script = ("import sys; sys.modules['opentelemetry'] = None; from gateway.cli import main; "
              "sys.exit(main(['--port', '0', '--admin-port', '0']))")
    env = {**_without_otel(os.environ), "OTEL_TRACES_EXPORTER": "otlp"}
    missing = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=20, env=env)
    grpc = subprocess.run([sys.executable, "-m", "gateway", "--port", "0", "--admin-port", "0"], capture_output=True,
                          text=True, timeout=20, env={**env, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})

    assert (missing.returncode, missing.stdout, missing.stderr) == (2, "", (
        "mcp-gateway: error: OTEL_TRACES_EXPORTER=otlp needs the otel extra "
        "(pip install 'aenv-mcp-gateway[otel]'): opentelemetry.sdk.trace is not installed\n"))
    assert (grpc.returncode, grpc.stdout) == (2, "")
    assert grpc.stderr.startswith("mcp-gateway: error: OTEL_EXPORTER_OTLP_PROTOCOL: 'grpc' is not supported")
    assert grpc.stderr.count("\n") == 1


# --- sampling ----------------------------------------------------------------------------------

def _request(*headers: tuple[str, str]) -> Request:
    return Request(None, "POST", "/mcp", "1.1", CIMultiDictProxy(CIMultiDict(headers)), 0, True)  # type: ignore[arg-type]


async def test_sampling_is_decided_before_the_sdk_and_a_dropped_span_still_propagates(receiver: Receiver) -> None:
    def tracing(sampler: str, ratio: str) -> Tracing:
        config = tracing_config(Settings(), {**OTEL_ON, "OTEL_EXPORTER_OTLP_ENDPOINT": str(receiver.url),
                                             "OTEL_TRACES_SAMPLER": sampler, "OTEL_TRACES_SAMPLER_ARG": ratio})
        assert config is not None
        return Tracing(config, "k8s")

    unsampled = f"00-{CALLER_TRACE}-{CALLER_SPAN}-00"
    never = tracing("parentbased_traceidratio", "0")  # roots never; a caller's flag decides
    always = tracing("traceidratio", "1")  # every trace, whatever the caller's flag
    kept, spans = [], []
    for tracer, headers in ((never, [("traceparent", CALLER_TRACEPARENT)]),
                            (never, [("traceparent", unsampled), ("tracestate", "a=1"), ("tracestate", "b=2")]),
                            (never, []),
                            (always, [("traceparent", unsampled)]),
                            (always, [("traceparent", "garbage")])):
        span = tracer.start(_request(*headers))
        forwarded: CIMultiDict[str] = CIMultiDict(headers)
        span.forwarding(forwarded, URL("http://127.0.0.1:9000/mcp"))
        span.end(200, "POST", "", "ok", "", "", False, "/mcp", b"", 1.0)
        spans.append((span, forwarded))
        if span.span is not None:
            kept.append(span)
    for tracer in (never, always):
        await asyncio.to_thread(tracer.shutdown)

    (parent_sampled, _), (parent_unsampled, unsampled_headers), (root, _), (ratio_one, _), (new_trace, _) = spans
    assert [span is not None for span in (parent_sampled.span, parent_unsampled.span, root.span, ratio_one.span,
                                          new_trace.span)] == [True, False, False, True, True]
    # Dropped: the caller's trace, a span id of the gateway's own, not sampled; tracestate as sent.
    assert unsampled_headers["traceparent"] == f"00-{CALLER_TRACE}-{parent_unsampled.span_id}-00"
    assert parent_unsampled.span_id != CALLER_SPAN and len(parent_unsampled.span_id) == 16
    assert unsampled_headers.getall("tracestate") == ["a=1,b=2"]
    assert root.traceparent.endswith("-00") and root.trace_id != CALLER_TRACE
    # Kept: exported with the trace ids the access line shows (a new trace: the id that was sampled).
    assert sorted((span.trace_id.hex(), span.span_id.hex()) for span in receiver.spans) == sorted(
        (span.trace_id, span.span_id) for span in kept)
    assert ratio_one.traceparent == f"00-{CALLER_TRACE}-{ratio_one.span_id}-01"
    assert new_trace.trace_id != CALLER_TRACE and new_trace.traceparent.endswith("-01")


# --- end to end --------------------------------------------------------------------------------

@dataclass(slots=True)
class Receiver:
    """An OTLP/HTTP trace receiver: every export request's raw bytes, and the spans decoded from them."""

    url: URL
    bodies: list[bytes] = field(default_factory=list)
    resources: list[dict[str, Any]] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)


async def _serve(app: web.Application) -> tuple[URL, web.AppRunner]:
    """An aiohttp app on 127.0.0.1: not through the aiohttp_server fixture, which runs a test once per
    transport (conftest.py); the tests below that need both say so."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return URL(f"http://127.0.0.1:{port}"), runner


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver(URL("http://127.0.0.1"))

    async def export(request: web.Request) -> web.Response:
        assert request.headers["Content-Type"] == "application/x-protobuf"
        body = await request.read()
        found.bodies.append(body)
        for resource_spans in ExportTraceServiceRequest.FromString(body).resource_spans:
            found.resources.append(MessageToDict(resource_spans.resource))
            for scope_spans in resource_spans.scope_spans:
                found.spans.extend(scope_spans.spans)
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", export)
    found.url, runner = await _serve(app)
    yield found
    await runner.cleanup()


@dataclass(slots=True)
class TracedUpstream:
    url: URL
    headers: list[Mapping[str, str]] = field(default_factory=list)  # what each request carried, in order
    last_event_ns: int = 0  # when the SSE stream's last event was written


@pytest.fixture
async def traced_upstream() -> AsyncIterator[TracedUpstream]:
    """Records the headers of every request; GET /sse streams SSE_EVENTS events, POST answers JSON, /fail 503."""
    upstream = TracedUpstream(URL("http://127.0.0.1"))

    async def answer(request: web.Request) -> web.StreamResponse:
        upstream.headers.append(request.headers.copy())
        await request.read()
        if request.path.endswith("/fail"):
            return web.json_response({"error": "sandbox is down"}, status=503)
        if request.method != "GET":
            return web.json_response({"jsonrpc": "2.0", "id": 7, "result": {"content": []}})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for number in range(SSE_EVENTS):
            await asyncio.sleep(SSE_GAP_S)
            await response.write(f"event: message\ndata: {number}\n\n".encode())
        upstream.last_event_ns = time.time_ns()
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    upstream.url, runner = await _serve(app)
    yield upstream
    await runner.cleanup()


def _attributes(span: Span) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for attribute in span.attributes:
        kind = attribute.value.WhichOneof("value")
        values[attribute.key] = getattr(attribute.value, kind)
    return values


async def _stop(gateway: GatewayProcess, stderr: list[str] | None = None) -> list[dict[str, Any]]:
    """SIGTERM (the exporter flushes on the way out), then the access lines the program wrote (and,
    into `stderr`, what it wrote there)."""
    gateway.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(gateway.process.wait, 15) == 0
    assert gateway.process.stdout is not None and gateway.process.stderr is not None
    if stderr is not None:
        stderr.append(gateway.process.stderr.read())
    lines = [json.loads(line) for line in gateway.process.stdout.read().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") in ("request", "tracing_started")]


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"tok-{SECRET_MARKER}-bearer\n")
    return path


@pytest.mark.parametrize("transport", UPSTREAM_CLIENTS)
async def test_each_request_is_a_server_span_joined_to_the_caller_and_the_upstream(
    receiver: Receiver, traced_upstream: TracedUpstream, token_file: Path, transport: str,
) -> None:
    closed_port = free_port()
    route = {MCP_PROXY_URL: str(traced_upstream.url), "Authorization": f"Bearer tok-{SECRET_MARKER}-bearer"}
    caller = {"traceparent": CALLER_TRACEPARENT, "tracestate": TRACESTATE, "baggage": BAGGAGE}
    env = {**_without_otel(os.environ), **OTEL_ON, "OTEL_EXPORTER_OTLP_ENDPOINT": str(receiver.url)}
    with gateway_process("--upstream-client", transport, "--auth-token-file", str(token_file),
                         "--connect-retry-budget", "0", env=env) as gateway:
        async with ClientSession() as client:
            called = await client.post(
                gateway.url.with_path("/mcp").with_query(token=f"q-{SECRET_MARKER}"), data=TOOL_CALL,
                headers={**route, **caller, ENV_INSTANCE_ID: "env-7f3a", "Mcp-Session-Id": "sess-42",
                         "MCP-Protocol-Version": "2025-11-25", "Cookie": f"sid=c-{SECRET_MARKER}",
                         "Content-Type": "application/json"})
            assert (called.status, (await called.json())["id"]) == (200, 7)
            stream = await client.get(gateway.url / "sse", headers={**route, "traceparent": CALLER_TRACEPARENT})
            assert stream.status == 200
            streamed = await stream.read()
            stream_read_ns = time.time_ns()
            refused = await client.post(gateway.url / "mcp", data=TOOL_CALL, headers={
                "Authorization": route["Authorization"], "traceparent": CALLER_TRACEPARENT})
            unreachable = await client.post(gateway.url / "mcp", data=b"{}", headers={
                **route, MCP_PROXY_URL: f"http://127.0.0.1:{closed_port}"})
            failing = await client.post(gateway.url / "fail", data=b"{}", headers=route)
            assert (refused.status, unreachable.status, failing.status) == (400, 502, 503)
        log_lines = await _stop(gateway)

    assert streamed.count(b"\n\n") == SSE_EVENTS
    service = {attribute["key"]: attribute["value"] for attribute in receiver.resources[0]["attributes"]}
    assert (service["service.name"], service["aenv.engine"]) == ({"stringValue": "mcp-gateway"}, {"stringValue": "k8s"})
    [sse] = [span for span in receiver.spans if _attributes(span)["url.path"] == "/sse"]
    by_status = {_attributes(span)["http.response.status_code"]: span for span in receiver.spans if span != sse}
    assert (len(receiver.spans), sorted(by_status)) == (5, [200, 400, 502, 503])
    call, refused_span, unreachable_span, failed = by_status[200], by_status[400], by_status[502], by_status[503]

    # The tools/call: a child of the caller's span, named by its MCP method, with its attributes.
    assert (call.name, call.kind, call.trace_id.hex(), call.parent_span_id.hex()) == (
        "tools/call", Span.SPAN_KIND_SERVER, CALLER_TRACE, CALLER_SPAN)
    assert call.trace_state == TRACESTATE
    attributes = _attributes(call)
    assert attributes == {
        "http.request.method": "POST", "url.path": "/mcp", "network.protocol.version": "1.1",
        "aenv.env_instance_id": "env-7f3a", "mcp.session.id": "sess-42", "mcp.protocol.version": "2025-11-25",
        "server.address": "127.0.0.1", "server.port": traced_upstream.url.port,
        "http.response.status_code": 200, "aenv.endpoint": "/mcp", "aenv.outcome": "ok",
        "mcp.method.name": "tools/call", "jsonrpc.request.id": "7",
    }
    assert call.status.code == Status.STATUS_CODE_UNSET
    events = [(event.name, _attributes(event)) for event in call.events]
    if transport == "lean":  # aiohttp's client does not say when it connected
        assert events == [("upstream connected", {"aenv.connection.reused": False}), ("first response byte", {})]
        assert call.start_time_unix_nano < call.events[0].time_unix_nano <= call.events[1].time_unix_nano
    else:
        assert events == [("first response byte", {})]
    assert call.events[-1].time_unix_nano <= call.end_time_unix_nano

    # The upstream's traceparent names the gateway's span; tracestate and baggage went on unchanged.
    forwarded = traced_upstream.headers[0]
    assert forwarded["traceparent"] == f"00-{CALLER_TRACE}-{call.span_id.hex()}-01"
    assert (forwarded["tracestate"], forwarded["baggage"]) == (TRACESTATE, BAGGAGE)

    # The SSE stream's span ends when the stream does: after its last event was written.
    assert (sse.name, sse.parent_span_id.hex(), _attributes(sse)["aenv.stream"]) == ("GET /sse", CALLER_SPAN, True)
    # (The gateway notes the end just after writing it: the client may have read it a moment before.)
    assert traced_upstream.last_event_ns <= sse.end_time_unix_nano <= stream_read_ns + 500_000_000
    assert sse.end_time_unix_nano - sse.start_time_unix_nano >= SSE_EVENTS * SSE_GAP_S * 1e9 * 0.9
    assert traced_upstream.headers[1]["traceparent"] == f"00-{CALLER_TRACE}-{sse.span_id.hex()}-01"
    assert "tracestate" not in traced_upstream.headers[1]

    # A refusal: the gateway's code, not an error of the server (4xx); an upstream failure: an error.
    assert (refused_span.name, refused_span.parent_span_id.hex(), refused_span.status.code) == (
        "POST /mcp", CALLER_SPAN, Status.STATUS_CODE_UNSET)  # refused before its body was read: no method
    assert {key: _attributes(refused_span)[key] for key in ("http.response.status_code", "error.type")} == {
        "http.response.status_code": 400, "error.type": "missing_header"}
    unreachable_attributes = _attributes(unreachable_span)
    assert (unreachable_attributes["aenv.upstream_error"], unreachable_attributes["aenv.error_code"],
            unreachable_attributes["error.type"], unreachable_attributes["http.response.status_code"]) == (
        "connect_refused", "upstream_unreachable", "upstream_unreachable", 502)
    assert unreachable_span.status.code == Status.STATUS_CODE_ERROR
    assert len(unreachable_span.parent_span_id) == 0  # no traceparent: a new trace
    assert (failed.status.code, _attributes(failed)["error.type"]) == (Status.STATUS_CODE_ERROR, "503")

    # No secret in any exported byte: the bearer token, the cookie, the query string.
    exported = b"".join(receiver.bodies)
    assert SECRET_MARKER.encode() not in exported
    assert b"sid=" not in exported and b"token=" not in exported

    # The access line carries the trace and span ids of the gateway's span.
    requests = [line for line in log_lines if line["event"] == "request"]
    assert [(line["path"], line["trace_id"], line["span_id"]) for line in requests[:2]] == [
        ("/mcp", CALLER_TRACE, call.span_id.hex()), ("/sse", CALLER_TRACE, sse.span_id.hex())]
    assert all(line["trace_id"] == span.trace_id.hex() for line in requests
               for span in receiver.spans if span.span_id.hex() == line["span_id"])


async def test_the_arca_key_never_reaches_a_span(receiver: Receiver, traced_upstream: TracedUpstream) -> None:
    key = f"arca-{SECRET_MARKER}-key"
    env = {**_without_otel(os.environ), **OTEL_ON, "OTEL_EXPORTER_OTLP_ENDPOINT": str(receiver.url),
           "ARCA_API_KEY": key}
    with gateway_process("--schedule-type", "arca", "--arca-base-url", str(traced_upstream.url),
                         "--arca-data-plane", "proxy", env=env) as gateway:
        async with ClientSession() as client:
            called = await client.post(gateway.url / "mcp", data=TOOL_CALL, headers={ENV_INSTANCE_ID: "sbx-9"})
            assert called.status == 200
        await _stop(gateway)

    assert traced_upstream.headers[0]["x-agent-sandbox-api-key"] == key  # the key did go upstream
    [span] = receiver.spans
    assert _attributes(span)["aenv.env_instance_id"] == "sbx-9"
    assert {"key": "aenv.engine", "value": {"stringValue": "arca"}} in receiver.resources[0]["attributes"]
    assert SECRET_MARKER.encode() not in b"".join(receiver.bodies)


def _threads(pid: int) -> list[str]:
    """The names of a process's threads (Linux): Python's own are all "python", libuv's "libuv-worker"."""
    return sorted(Path(f"/proc/{pid}/task/{task}/comm").read_text().strip() for task in os.listdir(f"/proc/{pid}/task"))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc")
async def test_tracing_off_starts_no_exporter_and_still_logs_the_callers_ids(
    traced_upstream: TracedUpstream, receiver: Receiver,
) -> None:
    env = _without_otel(os.environ)
    on_env = {**env, **OTEL_ON, "OTEL_EXPORTER_OTLP_ENDPOINT": str(receiver.url)}
    threads: dict[str, list[str]] = {}
    stderr: list[str] = []
    for mode, environment in (("off", env), ("on", on_env)):
        with gateway_process(env=environment) as gateway:
            async with ClientSession() as client:
                called = await client.post(gateway.url / "mcp", data=TOOL_CALL, headers={
                    MCP_PROXY_URL: str(traced_upstream.url), "traceparent": CALLER_TRACEPARENT})
                assert called.status == 200
                if mode == "on":  # a malformed tracestate: dropped, and no line on stderr per request
                    bad = await client.post(gateway.url / "mcp", data=TOOL_CALL, headers={
                        MCP_PROXY_URL: str(traced_upstream.url), "traceparent": CALLER_TRACEPARENT,
                        "tracestate": 'bad"member,,a=1'})
                    assert bad.status == 200
            threads[mode] = _threads(gateway.process.pid)
            log_lines = await _stop(gateway, stderr)
        if mode == "off":
            [line] = log_lines
            assert (line["trace_id"], line["span_id"]) == (CALLER_TRACE, CALLER_SPAN)

    assert threads["off"].count("python") == 1  # the main thread alone: no export thread
    assert threads["on"].count("python") == 2  # and the batch span processor's
    assert len(receiver.spans) == 2  # only from the run with tracing on
    assert traced_upstream.headers[0]["traceparent"] == CALLER_TRACEPARENT  # off: untouched
    assert "tracestate" not in traced_upstream.headers[2]
    assert stderr == ["", ""]


# --- trace context when tracing is off, both transports, SSE included ---------------------------

@pytest.fixture
async def context_upstream(aiohttp_server: AiohttpServer) -> AsyncIterator[TracedUpstream]:
    upstream = TracedUpstream(URL("http://127.0.0.1"))

    async def answer(request: web.Request) -> web.StreamResponse:
        upstream.headers.append(request.headers.copy())
        if request.method == "POST":
            return web.json_response({"ok": True})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: 1\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    upstream.url = (await aiohttp_server(app)).make_url("")
    yield upstream


async def test_trace_context_passes_untouched_when_tracing_is_off(
    aiohttp_client: AiohttpClient, context_upstream: TracedUpstream,
) -> None:
    gateway = await serve_gateway(aiohttp_client)
    # Two tracestate fields and odd spacing: forwarded byte for byte, none merged or rewritten.
    caller = [("traceparent", CALLER_TRACEPARENT), ("tracestate", "rojo=00f067aa0ba902b7"),
              ("tracestate", "congo=t61rcWkgMzE"), ("baggage", "userId=alice,  rollout=17;p=1")]

    posted = await gateway.post("/mcp", data=b"{}", headers=[(MCP_PROXY_URL, str(context_upstream.url)), *caller])
    streamed = await gateway.get("/sse", headers=[(MCP_PROXY_URL, str(context_upstream.url)), *caller])

    assert (posted.status, streamed.status, await streamed.read()) == (200, 200, b"data: 1\n\n")
    for seen in context_upstream.headers:
        assert [(name, seen.getall(name)) for name in ("traceparent", "tracestate", "baggage")] == [
            ("traceparent", [CALLER_TRACEPARENT]), ("tracestate", ["rojo=00f067aa0ba902b7", "congo=t61rcWkgMzE"]),
            ("baggage", ["userId=alice,  rollout=17;p=1"])]
