"""The data plane's one handler: the checks, the proxy call, our own error answers and the accounting.

Plain calls in one coroutine rather than a stack of aiohttp middleware, whose layers cost a
coroutine and a partial each per request (docs/performance.md). The order is the contract:

    access log and metrics   every request once it finished, refusals included
    parser refusals          400, 431 (server.py: malformed requests, heads far over the limit)
    Origin and Host          403 (origin.py: DNS-rebinding protection), before any credential is looked at
    authentication           401 (--auth-token-file); header-less GET /health stays open
    size limits              413, 431; from here on the request counts as in flight for the drain
    loop guard               508
    proxy                    engine, per-target limit, upstream call, relay (proxy.py)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from gateway.auth import Authenticate
from gateway.errors import GatewayError
from gateway.exchange import CLIENT_CLOSED, INTERNAL_ERROR, Exchange
from gateway.headers import REQUEST_ID
from gateway.jsonrpc import rpc_requests
from gateway.log import AccessLog
from gateway.proxy import SMALL_BODY_BYTES, Proxy
from gateway.server import Request, Response, StreamResponse, json_response
from gateway.via import refuse_loops

DataPlaneHandler = Callable[[Request], Awaitable[Response | StreamResponse]]


def error_response(error: GatewayError, request: Request, exchange: Exchange) -> Response:
    """A GatewayError as the JSON answer with its status: a JSON-RPC error response (an array for a batch)
    when the body is a JSON-RPC request, since that is all MCP clients show; else its own body."""
    requests = rpc_requests(body) if (body := _small_body(request, exchange)) else None
    if requests is None:
        data: Any = error.body()
    elif requests.batch:
        data = [error.rpc_error(request_id) for request_id in requests.ids]
    else:
        data = error.rpc_error(requests.ids[0])
    return json_response(data, status=error.status, headers=error.response_headers())


def _small_body(request: Request, exchange: Exchange) -> bytes | bytearray:
    """The request body if it is small and has arrived whole, else nothing: a refusal never waits for
    a body or buffers a large one (those are answered before they are read, in their own form)."""
    length = request.content_length
    if length is None or length > SMALL_BODY_BYTES:
        return b""
    if exchange.body_head:  # the proxy read it whole (Proxy._request_body)
        return exchange.body_head
    content = request.content
    return content.arrived() if content.complete else b""


def data_plane_handler(
    proxy: Proxy, access_log: AccessLog, authenticate: Authenticate | None = None,
    check_origin: Callable[[Mapping[str, str]], None] | None = None,
) -> DataPlaneHandler:
    """The handler server.Server calls for every request."""
    limits, via_mark = proxy.limits, proxy.via_mark

    async def serve(request: Request) -> Response | StreamResponse:
        exchange = access_log.exchange(request)
        response: Response | StreamResponse | None = None
        try:
            try:
                if request.refusal is not None:
                    raise request.refusal
                if check_origin is not None:
                    check_origin(request.headers)
                forwarded = request if authenticate is None else authenticate(request)
                limits.check(forwarded)
                limits.enter()
                try:
                    refuse_loops(forwarded.headers, via_mark)
                    response = await proxy.handle(forwarded, exchange)
                finally:
                    limits.release(exchange)
            except GatewayError as error:
                exchange.error = error
                response = error_response(error, request, exchange)
                if error.closes_connection:
                    request.connection.keep_alive = False
            if not response.prepared:  # our own answers and small replies; the proxy sets it on what it streams
                response.headers[REQUEST_ID] = exchange.request_id
            return response
        except (ConnectionResetError, asyncio.CancelledError):  # the downstream went away
            exchange.outcome = CLIENT_CLOSED
            raise
        except Exception:
            exchange.outcome = INTERNAL_ERROR
            exchange.status = 500
            raise
        finally:
            access_log.finished(request, exchange, response)

    return serve
