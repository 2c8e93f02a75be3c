"""structlog configuration (once, by the CLI) and the access log: one line and one metrics
observation per finished request, a stream's when it ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
from collections.abc import Iterable
from json.encoder import encode_basestring_ascii as json_string
from typing import Any, Final, TextIO

import structlog

from gateway.config import OPTIONS, Settings
from gateway.exchange import (
    CLIENT_CLOSED,
    INTERNAL_ERROR,
    OK,
    REFUSED,
    UPSTREAM_ERROR,
    Exchange,
    new_request_id,
)
from gateway.headers import ENV_INSTANCE_ID, REQUEST_ID
from gateway.jsonrpc import rpc_method
from gateway.messages import Request, Response, StreamResponse
from gateway.metrics import Metrics, endpoint, upstream_error_kind
from gateway.tracing import TRACEPARENT, Tracing, parse_traceparent

# nginx's code for a request whose client left before the response started.
CLIENT_CLOSED_STATUS: Final = 499
# Caller-chosen strings are cut to this length in a log line.
_MAX_FIELD_CHARS: Final = 256


def configure_logging(
    log_format: str = "auto", level: str = "info", stream: TextIO | None = None, cache: bool = True
) -> None:
    """JSON lines when stdout is not a terminal (containers), a readable console otherwise."""
    stream = stream or sys.stdout
    json_format = not stream.isatty() if log_format == "auto" else log_format == "json"
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json_format else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=cache,
    )


def shown_settings(settings: Settings) -> dict[str, Any]:
    """The settings for the startup line, every secret replaced."""
    shown: dict[str, Any] = {"config_path": settings.config_path}
    for option in OPTIONS:
        value = getattr(settings, option.name)
        shown[option.name] = "<redacted>" if option.secret and value else value
    return shown


def secret_values(settings: Settings) -> tuple[str, ...]:
    return tuple(value for option in OPTIONS if option.secret and (value := getattr(settings, option.name)))


# A JSON member whose name says it holds a secret, and a bearer token anywhere.
_SECRET_MEMBER: Final = re.compile(
    r'("[^"]*(?:authorization|api[_-]?key|apikey|token|secret|password|passwd|cookie|credential)[^"]*"\s*:\s*)'
    r'"(?:[^"\\]|\\.)*"',
    re.IGNORECASE,
)
_BEARER: Final = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")


def redact_body(head: bytes | bytearray, secrets: Iterable[str]) -> str:
    """Body bytes as text for a log line: secret-looking members, bearer tokens and our secrets masked."""
    text = bytes(head).decode("utf-8", errors="replace")
    text = _BEARER.sub(r"\1 <redacted>", _SECRET_MEMBER.sub(r'\1"<redacted>"', text))
    for secret in secrets:
        text = text.replace(secret, "<redacted>")
    return text


class AccessLine:
    """Writes the access line. Under the JSON configuration above it is rendered here, at a fifth of
    structlog's cost per request (#6 budgets the whole proxy at ~50 µs); otherwise through structlog.
    Either way the line has the same fields, and only the access line takes the short cut.
    """

    def __init__(self) -> None:
        self._log = structlog.get_logger("gateway.access").bind()
        config = structlog.get_config()
        processors = config["processors"]
        # configure_logging's JSON chain ends in JSONRenderer; anything else (console, a test's
        # capture_logs, structlog's defaults) gets the line through structlog.
        is_ours = len(processors) == 4 and isinstance(processors[-1], structlog.processors.JSONRenderer)
        self._raw = config["logger_factory"]() if is_ours else None
        # Lines wait for the end of the event loop's current pass and leave in one write: under load
        # one syscall carries many lines instead of one each.
        self._file: TextIO | None = getattr(self._raw, "_file", None)
        self._pending: list[str] = []
        self._info = self._log.is_enabled_for(logging.INFO) if self._raw is not None else True
        self._warning = self._log.is_enabled_for(logging.WARNING) if self._raw is not None else True
        self._second = -1
        self._second_text = ""

    def write(self, level: str, fields: dict[str, Any], timestamp: str | None = None) -> None:
        """One line, written at the end of this event-loop pass."""
        if self.add(level, fields, timestamp) and len(self._pending) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop (a synchronous caller): write at once
                self.flush()

    @property
    def fast(self) -> bool:
        """Lines go out through the JSON short cut, batched: add_request() takes them rendered."""
        return self._file is not None

    def add_request(self, line: str, level: str) -> None:
        """A line rendered as add() would render it (log._request_line), written at the next flush()."""
        if self._warning if level == "warning" else self._info:
            self._pending.append(line)

    def add(self, level: str, fields: dict[str, Any], timestamp: str | None = None) -> bool:
        """One line; True if it waits for flush() (the JSON short cut), False if it is written already."""
        if self._raw is None:
            getattr(self._log, level)("request", **fields)
            return False
        if not (self._warning if level == "warning" else self._info):
            return False
        members = [f'"{name}":{json_string(value) if value.__class__ is str else _json_value(value)}'
                   for name, value in fields.items()]
        line = (f'{{"timestamp":"{timestamp or self.timestamp()}","level":"{level}","event":"request",'
                f'{",".join(members)}}}\n')
        if self._file is None:
            self._raw.msg(line[:-1])
            return False
        self._pending.append(line)
        return True

    def flush(self) -> None:
        """Write the waiting lines in one write."""
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        assert self._file is not None
        self._file.write("".join(lines))
        self._file.flush()

    def timestamp(self) -> str:
        """Like structlog's TimeStamper(fmt="iso", utc=True), formatting the date once a second."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second, self._second_text = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int((now - second) * 1e6):06d}Z"


def _json_value(value: Any) -> str:
    if value.__class__ is int or value.__class__ is float:
        return repr(value)  # as json.dumps writes them, without its call overhead
    return json.dumps(value)


class AccessLog:
    """One access line and one metrics observation per finished request, a stream's when it ends.

    Finished requests wait for the end of the event loop's current pass, then are counted and logged
    together: the same work, done in one warm loop instead of between two requests.
    """

    def __init__(self, settings: Settings, metrics: Metrics, engine: str, tracing: Tracing | None = None) -> None:
        self._line = AccessLine()
        self._tracing = tracing
        self._metrics = metrics
        self._engine = engine
        self._engine_json = json_string(engine)
        self._log_body_bytes = settings.log_bodies
        self._secrets = secret_values(settings)
        self._finished: list[tuple[Request, Exchange, Response | StreamResponse | None]] = []

    def exchange(self, request: Request) -> Exchange:
        """The record of a request that has just arrived; its id is the caller's X-Request-ID or a new one."""
        request_id = request.headers.get(REQUEST_ID) or new_request_id()
        exchange = Exchange(request_id[:_MAX_FIELD_CHARS], self._log_body_bytes)
        if self._tracing is not None:
            exchange.span = self._tracing.start(request)
        return exchange

    def finished(self, request: Request, exchange: Exchange, response: Response | StreamResponse | None) -> None:
        """The handler returned or raised: the request is accounted at the end of this loop pass."""
        exchange.finished()
        self._finished.append((request, exchange, response))
        if len(self._finished) == 1:
            request.connection.loop.call_soon(self._account_finished)

    def _account_finished(self) -> None:
        batch, self._finished = self._finished, []
        timestamp = self._line.timestamp()  # the lines of one pass are written in the same microseconds
        for request, exchange, response in batch:
            try:
                self._account(request, exchange, response, timestamp)
            except Exception:  # a bug in accounting must not cost the other requests their lines
                structlog.get_logger(__name__).exception("access_accounting_failed")
        self._line.flush()
        self._metrics.batch_done()

    def _account(self, request: Request, exchange: Exchange, response: Response | StreamResponse | None,
                 timestamp: str) -> None:
        status = exchange.status
        bytes_out = exchange.bytes_out
        if response is not None:
            status = response.status
            if isinstance(response, Response) and response.body:
                bytes_out = len(response.body)
        elif not status:
            status = CLIENT_CLOSED_STATUS if exchange.outcome == CLIENT_CLOSED else 500
        error = exchange.error
        refused_reason = ""
        if error is not None:
            kind = upstream_error_kind(error)
            if kind and kind != "policy":
                exchange.upstream_failed(kind)
            else:
                exchange.outcome = REFUSED
                exchange.upstream_error = kind
                refused_reason = error.code
        elif status >= 400 and exchange.outcome == OK and not exchange.target:
            exchange.outcome = REFUSED  # aiohttp's own answers (413 and the like)
        method = request.method
        label = rpc_method(exchange.body_head) if method == "POST" and exchange.body_head else ""
        bytes_in = request.content.total_bytes
        instance_id = request.headers.get(ENV_INSTANCE_ID, "")[:_MAX_FIELD_CHARS]
        elapsed_ms = exchange.elapsed_ms
        self._metrics.observe(method, request.path, status, label, elapsed_ms, exchange, bytes_in, refused_reason,
                              instance_id)
        level = "warning" if exchange.outcome in (UPSTREAM_ERROR, INTERNAL_ERROR) else "info"
        trace_id = span_id = ""
        span = exchange.span
        if span is not None:
            span.end(status, method, label, exchange.outcome, error.code if error is not None else "",
                     exchange.upstream_error, exchange.is_stream, endpoint(request.path), exchange.body_head,
                     elapsed_ms)
            trace_id, span_id = span.trace_id, span.span_id
        else:
            traceparent = request.headers.get(TRACEPARENT)
            if traceparent is not None:  # no span of ours: the caller's ids join the line to its trace
                caller = parse_traceparent(traceparent)
                if caller is not None:
                    trace_id, span_id = caller.trace_id, caller.span_id
        if self._line.fast and not self._log_body_bytes:
            self._line.add_request(_request_line(
                timestamp, level, exchange, method, request.path[:_MAX_FIELD_CHARS], status, elapsed_ms, bytes_in,
                bytes_out, instance_id, label, self._engine_json, trace_id, span_id), level)
            return
        fields: dict[str, Any] = {
            "request_id": exchange.request_id,
            "method": method,
            "path": request.path[:_MAX_FIELD_CHARS],
            "status": status,
            "latency_ms": round(elapsed_ms, 3),
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "instance_id": instance_id,
            "target": exchange.target,
            "rpc_method": label,
            "engine": self._engine,
            "outcome": exchange.outcome,
        }
        if exchange.is_stream:
            fields["stream"] = True
        if exchange.upstream_error:
            fields["upstream_error"] = exchange.upstream_error
        if error is not None:
            fields["code"] = error.code
            fields["error"] = error.message
        if trace_id:
            fields["trace_id"], fields["span_id"] = trace_id, span_id
        if self._log_body_bytes:
            if exchange.body_head:
                fields["request_body"] = redact_body(exchange.body_head[:self._log_body_bytes], self._secrets)
            if exchange.response_head is not None and not exchange.is_stream:
                fields["response_body"] = redact_body(exchange.response_head, self._secrets)
        self._line.add(level, fields, timestamp)


_OPEN: Final = "{"
_CLOSE: Final = "}"


def _request_line(timestamp: str, level: str, exchange: Exchange, method: str, path: str, status: int,
                  elapsed_ms: float, bytes_in: int, bytes_out: int, instance_id: str, rpc_method: str,
                  engine_json: str, trace_id: str = "", span_id: str = "") -> str:
    """The access line as AccessLine.add writes it from the fields dict, member for member, in one string:
    about half the instructions of building the dict and joining its members (docs/performance.md)."""
    tail = ',"stream":true' if exchange.is_stream else ""
    if exchange.upstream_error:
        tail += f',"upstream_error":{json_string(exchange.upstream_error)}'
    error = exchange.error
    if error is not None:
        tail += f',"code":{json_string(error.code)},"error":{json_string(error.message)}'
    if trace_id:  # lowercase hex, checked by tracing.parse_traceparent or made by the gateway: nothing to escape
        tail += f',"trace_id":"{trace_id}","span_id":"{span_id}"'
    latency_ms = repr(round(elapsed_ms, 3))  # as json.dumps writes a float
    # No {{ in these f-strings: mypyc compiles one with an escaped brace into a str.format() call per field.
    return (f'{_OPEN}"timestamp":"{timestamp}","level":"{level}","event":"request",'
            f'"request_id":{json_string(exchange.request_id)},"method":{json_string(method)},'
            f'"path":{json_string(path)},"status":{status},"latency_ms":{latency_ms},'
            f'"bytes_in":{bytes_in},"bytes_out":{bytes_out},"instance_id":{json_string(instance_id)},'
            f'"target":{json_string(exchange.target)},"rpc_method":{json_string(rpc_method)},"engine":{engine_json},'
            f'"outcome":{json_string(exchange.outcome)}{tail}{_CLOSE}\n')
