"""The proxied call: resolve the target, make one upstream call, stream both bodies.

Chooses no targets (engines do), edits no header lists inline (headers does) and speaks to the
upstream only through the UpstreamClient interface (upstream does).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Final

from gateway import sse
from gateway.config import Settings
from gateway.deadlines import Deadlines, IdleTimeout
from gateway.engines.base import Engine
from gateway.errors import UpstreamErrors, authority
from gateway.exchange import Exchange
from gateway.headers import (
    CONTENT_TYPE,
    REQUEST_ID,
    downstream_response_headers,
    is_event_stream,
    upstream_request_headers,
)
from gateway.limits import Limits
from gateway.messages import NO_BODY_STATUSES, Request, Response, StreamResponse, json_response
from gateway.metrics import Metrics
from gateway.upstream import Body, UpstreamClient, UpstreamResponse
from gateway.via import VIA

# Bodies up to this size are read whole and sent in one write; larger ones stream.
SMALL_BODY_BYTES: Final = 64 * 1024


@dataclass(slots=True)
class Proxy:
    """What a proxied call needs, held once: no per-request lookups in the app's state."""

    settings: Settings
    engine: Engine
    limits: Limits
    metrics: Metrics
    deadlines: Deadlines
    via_mark: str
    upstream: UpstreamClient | None = None  # made when the app starts (it needs the running loop)

    async def handle(self, request: Request, exchange: Exchange) -> Response | StreamResponse:
        engine = self.engine
        if request.path == "/health" and request.method == "GET" and not _is_routed(request, engine):
            return json_response({"status": "ok", "engine": engine.name})

        target = engine.resolve(request.headers, request.raw_path)
        exchange.target = target.authority or authority(target.url)
        self.limits.admit(exchange, target)  # 429 over --max-inflight-per-target
        upstream_headers = upstream_request_headers(request.headers, target.added_headers)
        upstream_headers[REQUEST_ID] = exchange.request_id
        upstream_headers.add(VIA, self.via_mark)  # the loop guard's mark (via.py)
        span = exchange.span
        if span is not None:  # tracing: the upstream's traceparent names the gateway's span
            span.forwarding(upstream_headers, target.url)
        assert self.upstream is not None, "the app has not started"
        if request.body_exists and request.expects_continue() and not request.content.total_bytes:
            # RFC 9110 §10.1.1: sent once the request is going to be forwarded, so that a refusal
            # (401, 413, 400, 429...) costs the caller no upload. The Expect field still goes upstream.
            request.connection.send_continue()
        forwarded_at = time.perf_counter()
        with UpstreamErrors(target.url), self.deadlines.within(self.settings.idle_timeout_s):
            upstream_response = await self.upstream.request(
                request.method, target.url, upstream_headers, await self._request_body(request, exchange)
            )
        exchange.upstream_ms = (time.perf_counter() - forwarded_at) * 1000
        if span is not None:
            span.responded(upstream_response.connected_ns())
        try:  # a downstream gone mid-response raises ConnectionResetError: the access line records it
            return await self._relay_response(request, exchange, upstream_response)
        finally:
            upstream_response.release()

    async def _request_body(self, request: Request, exchange: Exchange) -> Body:
        """Small bodies whole (one write upstream), large or unknown-length ones as a stream."""
        if not request.body_exists:
            return None
        length = request.content_length
        content = request.content
        if length is not None and length <= SMALL_BODY_BYTES:
            # A small body usually arrived with the head: taken as is.
            body = exchange.body_head = content.arrived() if content.complete else await content.read()
            return body
        return self.limits.limited(content.chunks(), exchange)  # 413 past --max-body-size

    async def _relay_response(
        self, request: Request, exchange: Exchange, upstream_response: UpstreamResponse
    ) -> Response | StreamResponse:
        # The status line goes on the wire at prepare(): from here on a failure is logged and ends
        # the response, and never becomes a JSON error.
        event_stream = is_event_stream(upstream_response.headers.get(CONTENT_TYPE))
        stream = self.limits.admit_stream(exchange) if event_stream else None  # 503 over --max-streams
        downstream_headers = downstream_response_headers(upstream_response.headers)
        if not event_stream and request.method != "HEAD" and upstream_response.status not in NO_BODY_STATUSES:
            body = upstream_response.arrived_body()
            if body is not None:  # a small reply, complete: head and body go out in one write
                exchange.status = upstream_response.status
                exchange.bytes_out = len(body)
                if exchange.log_body_bytes:
                    exchange.keep_response_chunk(body)
                # Returned unprepared: the data plane adds X-Request-ID, as to its own answers.
                return Response(body, upstream_response.status, upstream_response.reason, downstream_headers)
        downstream_headers[REQUEST_ID] = exchange.request_id  # prepared here: the data plane comes too late
        # A non-SSE head leaves with the first body bytes (one send() for a short reply); an event
        # stream's at once.
        downstream_response = StreamResponse(upstream_response.status, upstream_response.reason, downstream_headers,
                                             send_head_now=event_stream)
        await downstream_response.prepare(request)
        exchange.status = upstream_response.status
        if stream is not None:
            with self.metrics.open_stream(exchange):
                await sse.relay(upstream_response, downstream_response, exchange, stream,
                                self.settings.sse_keepalive_s)
            return downstream_response
        idle_timeout = self.deadlines.within(self.settings.idle_timeout_s)
        if not await _pump_body(upstream_response, downstream_response, idle_timeout, exchange):
            # Close the downstream connection mid-body, so the client cannot take a truncated reply as whole.
            request.connection.abort()
            return downstream_response
        await downstream_response.write_eof()
        return downstream_response


def _is_routed(request: Request, engine: Engine) -> bool:
    return any(name in request.headers for name in engine.routing_headers)


async def _pump_body(
    upstream_response: UpstreamResponse, downstream_response: StreamResponse, idle_timeout: IdleTimeout,
    exchange: Exchange,
) -> bool:
    """Copy a non-SSE body; False once it broke or the upstream sent nothing for the idle timeout.

    Only waits on the upstream count: the clock pauses while a slow downstream drains.
    """
    writing = False
    try:
        with idle_timeout:
            while chunk := await upstream_response.read_chunk():
                idle_timeout.pause()
                exchange.bytes_out += len(chunk)
                if exchange.log_body_bytes:
                    exchange.keep_response_chunk(chunk)
                writing = True
                await downstream_response.write(chunk)
                writing = False
                idle_timeout.progressed()
    except (TimeoutError, OSError) as exc:
        if writing:
            raise  # the downstream went away: the access line records it
        exchange.upstream_failed("idle_timeout" if isinstance(exc, TimeoutError) else "reset_mid_stream")
        return False
    return True
