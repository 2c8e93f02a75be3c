"""OpenTelemetry traces: the OTEL_* settings, one server span per request, W3C trace context upstream.

Optional twice over: the `otel` extra brings the SDK, and the standard environment switches it on
(OTEL_TRACES_EXPORTER=otlp). Off, nothing of OpenTelemetry is imported and the data plane pays one
`is not None` test per hook; on, spans go to an OTLP/HTTP endpoint through a batch span processor
(a thread of the SDK's), never on the request's own path. The caller's `traceparent` is parsed
here too, for the access line, whether tracing is on or not.
"""

from __future__ import annotations

import importlib.util
import logging
import random
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from time import time_ns
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote

from multidict import CIMultiDict, istr
from yarl import URL

from gateway.config import TRACE_SAMPLERS, Settings
from gateway.errors import ConfigError
from gateway.headers import ENV_INSTANCE_ID
from gateway.jsonrpc import PEEK_BYTES, rpc_requests
from gateway.messages import Request

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Status, Tracer

    from gateway.trace_ids import ChosenTraceIds

TRACEPARENT: Final = istr("traceparent")
TRACESTATE: Final = istr("tracestate")
MCP_SESSION_ID: Final = istr("Mcp-Session-Id")
MCP_PROTOCOL_VERSION: Final = istr("MCP-Protocol-Version")

# At exit, queued spans get this long to leave (less if OTEL_BSP_EXPORT_TIMEOUT is shorter): with the
# collector gone the exporter would retry for its whole timeout, and a supervisor or kubelet waits for no one.
SHUTDOWN_TIMEOUT_S: Final = 5.0
DEFAULT_SERVICE_NAME: Final = "mcp-gateway"
DEFAULT_ENDPOINT: Final = "http://localhost:4318"
TRACES_PATH: Final = "/v1/traces"
SUPPORTED_PROTOCOL: Final = "http/protobuf"
# The packages of the `otel` extra that tracing needs, by the module it imports from each.
_NEEDED_MODULES: Final = ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http.trace_exporter")
# Caller-chosen strings are cut to this length in an attribute, as in the access line.
_MAX_ATTRIBUTE_CHARS: Final = 256
_HEX: Final = frozenset("0123456789abcdef")
_HTTP_METHODS: Final = frozenset({"GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class TraceParent:
    """A valid W3C `traceparent`: ids as lowercase hex, and the flags byte."""

    trace_id: str
    span_id: str
    flags: int


def parse_traceparent(value: str) -> TraceParent | None:
    """The caller's `traceparent` (W3C Trace Context §3.2), or None when it is not a valid one.

    Version 00 is exactly 55 characters; a later version may carry more after a `-`, which is
    ignored (§3.2.4); `ff` is forbidden, and all-zero ids are invalid.
    """
    value = value.strip(" \t")
    if len(value) < 55 or (len(value) > 55 and (value[:2] == "00" or value[55] != "-")):
        return None
    version, trace_id, span_id, flags = value[:2], value[3:35], value[36:52], value[53:55]
    if value[2] != "-" or value[35] != "-" or value[52] != "-" or version == "ff":
        return None
    if not _HEX.issuperset(version + trace_id + span_id + flags):
        return None
    if trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return TraceParent(trace_id, span_id, int(flags, 16))


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """Where spans go and which are kept: the OTEL_* environment, with the --trace-* flags over it."""

    endpoint: str
    service_name: str
    sampler: str
    sampler_arg: float
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)  # may carry an API key
    compression: str = "none"
    timeout_s: float = 10.0
    schedule_delay_ms: float = 5000.0
    max_queue_size: int = 2048
    max_export_batch_size: int = 512
    export_timeout_ms: float = 30000.0


def _first(environ: Mapping[str, str], *names: str) -> tuple[str, str] | None:
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            return name, value
    return None


def _number(environ: Mapping[str, str], name: str, default: float, *, whole: bool = False) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if whole else float(raw)
    except ValueError:
        value = -1
    if not value >= 0 or (whole and not value > 0):
        raise ConfigError(f"{name}: {raw!r} must be a {'whole number above 0' if whole else 'number, 0 or more'}")
    return value


def _key_values(name: str, raw: str) -> dict[str, str]:
    """`key=value,key=value` with percent-encoded values (OTEL_EXPORTER_OTLP_HEADERS, OTEL_RESOURCE_ATTRIBUTES)."""
    pairs: dict[str, str] = {}
    for item in raw.split(","):
        if not item.strip():
            continue
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise ConfigError(f"{name}: each entry must be key=value")  # the value may be a secret: not echoed
        pairs[key.strip()] = unquote(value.strip())
    return pairs


def tracing_config(settings: Settings, environ: Mapping[str, str]) -> TracingConfig | None:
    """The tracing configuration, None when tracing is off; ConfigError (exit 2) on a value the gateway
    cannot honour: an exporter or protocol other than OTLP over HTTP, or the `otel` extra missing."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    exporter = settings.trace_exporter or environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() or "none"
    source = "--trace-exporter" if settings.trace_exporter else "OTEL_TRACES_EXPORTER"
    if exporter == "none":
        return None
    if exporter != "otlp":
        raise ConfigError(f"{source}: {exporter!r} is not supported (otlp or none)")
    protocol = _first(environ, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
    if protocol is not None and protocol[1] != SUPPORTED_PROTOCOL:
        raise ConfigError(f"{protocol[0]}: {protocol[1]!r} is not supported: the gateway exports OTLP over HTTP "
                          f"({SUPPORTED_PROTOCOL}, the collector's port 4318)")
    missing = [name for name in _NEEDED_MODULES if not _importable(name)]
    if missing:
        raise ConfigError(f"{source}=otlp needs the otel extra (pip install 'aenv-mcp-gateway[otel]'): "
                          f"{missing[0]} is not installed")
    signal_endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if settings.trace_endpoint:
        endpoint = settings.trace_endpoint.rstrip("/") + TRACES_PATH
    elif signal_endpoint:
        endpoint = signal_endpoint  # the signal's own variable is used as is (OTLP exporter spec)
    else:
        endpoint = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip().rstrip("/") or DEFAULT_ENDPOINT
        endpoint += TRACES_PATH
    url = URL(endpoint)
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(f"trace endpoint: {endpoint!r} must be an http:// or https:// URL with a host")
    sampler = settings.trace_sampler or environ.get("OTEL_TRACES_SAMPLER", "").strip() or "parentbased_always_on"
    if sampler not in TRACE_SAMPLERS:
        raise ConfigError(f"OTEL_TRACES_SAMPLER: {sampler!r} is not supported (one of {', '.join(TRACE_SAMPLERS)})")
    raw_arg = settings.trace_sampler_arg or environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    sampler_arg = 1.0
    if raw_arg and sampler.endswith("traceidratio"):
        try:
            sampler_arg = float(raw_arg)
        except ValueError:
            sampler_arg = -1.0
        if not 0.0 <= sampler_arg <= 1.0:
            raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG: {raw_arg!r} must be a ratio from 0 to 1")
    headers = _first(environ, "OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS")
    compression = _first(environ, "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "OTEL_EXPORTER_OTLP_COMPRESSION")
    if compression is not None and compression[1] not in ("none", "gzip"):
        raise ConfigError(f"{compression[0]}: {compression[1]!r} is not supported (gzip or none)")
    timeout_name = "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT" if environ.get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT") \
        else "OTEL_EXPORTER_OTLP_TIMEOUT"
    resource = _key_values("OTEL_RESOURCE_ATTRIBUTES", environ.get("OTEL_RESOURCE_ATTRIBUTES", ""))
    return TracingConfig(
        endpoint=endpoint,
        service_name=environ.get("OTEL_SERVICE_NAME", "").strip() or resource.get("service.name")
        or DEFAULT_SERVICE_NAME,
        sampler=sampler,
        sampler_arg=sampler_arg,
        headers=_key_values(headers[0], headers[1]) if headers else {},
        compression=compression[1] if compression else "none",
        timeout_s=_number(environ, timeout_name, 10000.0) / 1000,
        schedule_delay_ms=_number(environ, "OTEL_BSP_SCHEDULE_DELAY", 5000.0),
        max_queue_size=int(_number(environ, "OTEL_BSP_MAX_QUEUE_SIZE", 2048, whole=True)),
        max_export_batch_size=int(_number(environ, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512, whole=True)),
        export_timeout_ms=_number(environ, "OTEL_BSP_EXPORT_TIMEOUT", 30000.0),
    )


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package is missing
        return False


class Tracing:
    """This process's TracerProvider, batch processor and OTLP/HTTP exporter, and the spans it starts.

    Built once per process (each --workers worker has its own), after the settings were checked by
    tracing_config(); the SDK's export thread starts here.

    Sampling is decided here, before the SDK is called, by the rules of the SDK's samplers (its
    TraceIdRatioBased bound on the trace id's low 64 bits; ParentBased: a valid caller's sampled flag):
    a request sampled out costs no SDK call at all (callgrind, in process: 72,000 instructions per
    request sampled out through the SDK, 20,000 without it). The SDK records what it is given (ALWAYS_ON).
    """

    def __init__(self, config: TracingConfig, engine: str) -> None:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http import Compression
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON, TraceIdRatioBased
        from opentelemetry.trace import (
            NonRecordingSpan,
            SpanContext,
            SpanKind,
            Status,
            StatusCode,
            TraceFlags,
            TraceState,
        )

        from gateway import __version__
        from gateway.trace_ids import ChosenTraceIds

        exporter = OTLPSpanExporter(
            endpoint=config.endpoint, headers=dict(config.headers), timeout=config.timeout_s,
            compression=Compression.Gzip if config.compression == "gzip" else Compression.NoCompression,
        )
        # The engine is the same for every span of the process: said once, on the resource.
        resource = Resource.create({"service.name": config.service_name, "service.version": __version__,
                                    "aenv.engine": engine})
        self._ids: ChosenTraceIds = ChosenTraceIds()
        self._provider: TracerProvider = TracerProvider(sampler=ALWAYS_ON, resource=resource, id_generator=self._ids,
                                                        shutdown_on_exit=False)
        self._provider.add_span_processor(BatchSpanProcessor(
            exporter, max_queue_size=config.max_queue_size, schedule_delay_millis=config.schedule_delay_ms,
            max_export_batch_size=config.max_export_batch_size, export_timeout_millis=config.export_timeout_ms,
        ))
        self._tracer: Tracer = self._provider.get_tracer("gateway", __version__)
        self._shutdown_timeout_s = min(SHUTDOWN_TIMEOUT_S, config.export_timeout_ms / 1000)
        # The API warns on stderr about each malformed tracestate member: a caller could write a line per
        # request. Such a tracestate is dropped, as the API drops it, without the line.
        logging.getLogger("opentelemetry.trace.span").setLevel(logging.ERROR)
        self._server_kind = SpanKind.SERVER
        self._set_span_in_context = trace.set_span_in_context
        self._non_recording_span = NonRecordingSpan
        self._span_context = SpanContext
        self._trace_flags = TraceFlags
        self._trace_state = TraceState
        self.error_status: Status = Status(StatusCode.ERROR)
        sampler = config.sampler
        self._parent_based = sampler.startswith("parentbased_")
        root = sampler.removeprefix("parentbased_")
        # Kept when the trace id's low 64 bits are below this (always_on: all, always_off: none).
        self._bound = {"always_on": 1 << 64, "always_off": 0}.get(
            root, TraceIdRatioBased.get_bound_for_rate(config.sampler_arg))
        self._low_bits = TraceIdRatioBased.TRACE_ID_LIMIT

    def start(self, request: Request) -> RequestSpan:
        """The server span of a request that has just arrived, a child of the caller's traceparent if valid."""
        start_ns = time_ns()
        headers = request.headers
        caller: TraceParent | None = None
        traceparent = headers.get(TRACEPARENT)
        if traceparent is not None:
            caller = parse_traceparent(traceparent)  # an invalid one starts a new trace (W3C §3.2.2.3)
        if caller is not None:
            trace_id = int(caller.trace_id, 16)
            sampled = bool(caller.flags & 1) if self._parent_based else trace_id & self._low_bits < self._bound
        else:
            trace_id = random.getrandbits(128) or 1
            sampled = trace_id & self._low_bits < self._bound
        if not sampled:
            return RequestSpan.dropped(self, start_ns, caller, trace_id, ",".join(headers.getall(TRACESTATE, ())))
        parent: Context | None = None
        if caller is not None:
            parent = self._parent(caller, headers.getall(TRACESTATE, ()))
        else:
            self._ids.next_trace_id = trace_id
        method = request.method
        # The SDK checks every attribute in Python (~2 µs each here, and as much again to encode it):
        # constants (url.scheme http, network.transport tcp) are left out, and the engine is on the resource.
        attributes: dict[str, Any] = {
            "http.request.method": method if method in _HTTP_METHODS else "_OTHER",
            "url.path": request.path[:_MAX_ATTRIBUTE_CHARS],
            "network.protocol.version": request.version,
        }
        if method not in _HTTP_METHODS:
            attributes["http.request.method_original"] = method[:_MAX_ATTRIBUTE_CHARS]
        for header, name in ((ENV_INSTANCE_ID, "aenv.env_instance_id"), (MCP_SESSION_ID, "mcp.session.id"),
                             (MCP_PROTOCOL_VERSION, "mcp.protocol.version")):
            value = headers.get(header)
            if value:
                attributes[name] = value[:_MAX_ATTRIBUTE_CHARS]
        span = self._tracer.start_span(method, context=parent, kind=self._server_kind, attributes=attributes,
                                       start_time=start_ns)
        self._ids.next_trace_id = 0
        return RequestSpan.recorded(self, span, start_ns)

    def _parent(self, caller: TraceParent, tracestate: Iterable[str]) -> Context:
        context = self._span_context(int(caller.trace_id, 16), int(caller.span_id, 16), is_remote=True,
                                     trace_flags=self._trace_flags(caller.flags & 0xFF),
                                     trace_state=self._trace_state.from_header(list(tracestate)))
        return self._set_span_in_context(self._non_recording_span(context))

    def shutdown(self) -> None:
        """Export what is queued, then stop the export thread; after SHUTDOWN_TIMEOUT_S the process goes
        on exiting without them (the SDK's export thread is a daemon)."""
        stopping = threading.Thread(target=self._provider.shutdown, name="otel-shutdown", daemon=True)
        stopping.start()
        stopping.join(self._shutdown_timeout_s)


class RequestSpan:
    """One request's server span, and what the access line and the upstream request take from it."""

    __slots__ = ("forwarded_ns", "span", "span_id", "start_ns", "target", "trace_id", "traceparent",
                 "tracestate", "tracing")

    def __init__(self, tracing: Tracing, span: Span | None, start_ns: int, trace_id: str, span_id: str,
                 flags: int, tracestate: str) -> None:
        self.tracing = tracing
        self.span = span  # None when sampled out: nothing to record, only ids to pass on
        self.start_ns = start_ns
        self.forwarded_ns = 0
        self.target: URL | None = None
        self.trace_id = trace_id
        self.span_id = span_id
        self.traceparent = f"00-{trace_id}-{span_id}-{flags:02x}"
        self.tracestate = tracestate

    @classmethod
    def recorded(cls, tracing: Tracing, span: Span, start_ns: int) -> RequestSpan:
        context = span.get_span_context()
        return cls(tracing, span, start_ns, f"{context.trace_id:032x}", f"{context.span_id:016x}",
                   int(context.trace_flags), context.trace_state.to_header())

    @classmethod
    def dropped(cls, tracing: Tracing, start_ns: int, caller: TraceParent | None, trace_id: int,
                tracestate: str) -> RequestSpan:
        """Sampled out: a span id of its own all the same, so the upstream's parent is this hop, with the
        sampled flag off so that it records nothing either; the caller's tracestate passes as sent."""
        trace_hex = caller.trace_id if caller is not None else f"{trace_id:032x}"
        return cls(tracing, None, start_ns, trace_hex, f"{random.getrandbits(64) or 1:016x}", 0,
                   tracestate if caller is not None else "")

    def forwarding(self, upstream_headers: CIMultiDict[str], target: URL) -> None:
        """The request goes upstream: its traceparent names this span, replacing the caller's."""
        self.forwarded_ns = time_ns()
        self.target = target
        upstream_headers[TRACEPARENT] = self.traceparent
        if self.tracestate:
            upstream_headers[TRACESTATE] = self.tracestate
        else:
            upstream_headers.popall(TRACESTATE, None)

    def responded(self, connected_ns: int) -> None:
        """The upstream's response head arrived; connected_ns as UpstreamResponse.connected_ns() says."""
        span = self.span
        if span is None:
            return
        now = time_ns()
        if connected_ns > 0:
            span.add_event("upstream connected", {"aenv.connection.reused": False}, connected_ns)
        elif connected_ns == 0:
            span.add_event("upstream connected", {"aenv.connection.reused": True}, self.forwarded_ns)
        span.add_event("first response byte", None, now)

    def end(self, status: int, method: str, rpc_method: str, outcome: str, error_code: str, upstream_error: str,
            is_stream: bool, endpoint: str, body: bytes | bytearray, elapsed_ms: float) -> None:
        """The request finished (a stream: when it ended): what its access line says becomes attributes.

        body: the request body, or its first bytes, for the JSON-RPC id of a single request.
        """
        span = self.span
        if span is None:
            return
        end_ns = self.start_ns + int(elapsed_ms * 1e6)
        attributes: dict[str, Any] = {
            "http.response.status_code": status,
            "aenv.endpoint": endpoint,
            "aenv.outcome": outcome,
        }
        target = self.target
        if target is not None:  # the upstream: the gateway has one span, so its server.* name the target
            attributes["server.address"] = target.host or ""
            attributes["server.port"] = target.port or 0
        if rpc_method and rpc_method not in ("other", "batch"):
            attributes["mcp.method.name"] = rpc_method
            span.update_name(rpc_method)
        else:
            span.update_name(f"{method} {endpoint}")
        if rpc_method and rpc_method != "batch" and len(body) < PEEK_BYTES:  # a large body is not whole
            requests = rpc_requests(body)
            if requests is not None:
                attributes["jsonrpc.request.id"] = str(requests.ids[0])[:_MAX_ATTRIBUTE_CHARS]
        if is_stream:
            attributes["aenv.stream"] = True
        if upstream_error:
            attributes["aenv.upstream_error"] = upstream_error
        if error_code:
            attributes["aenv.error_code"] = error_code
            attributes["error.type"] = error_code
        elif status >= 500:
            attributes["error.type"] = str(status)
        span.set_attributes(attributes)
        if status >= 500:  # a server span's 4xx is the caller's error, not ours (HTTP semconv)
            span.set_status(self.tracing.error_status)
        span.end(end_ns)
