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
from typing import Any, Final

from gateway.auth import Authenticate
from gateway.errors import BodyTooLarge, GatewayError
from gateway.exchange import CLIENT_CLOSED, INTERNAL_ERROR, Exchange
from gateway.headers import REQUEST_ID
from gateway.jsonrpc import rpc_requests
from gateway.log import AccessLog
from gateway.messages import Request, Response, StreamResponse, json_response
from gateway.proxy import SMALL_BODY_BYTES, Proxy
from gateway.via import refuse_loops

DataPlaneHandler = Callable[[Request], Awaitable[Response | StreamResponse]]

# How long a refusal waits for the rest of a small request body, to answer a JSON-RPC request with its id.
REFUSAL_BODY_WAIT_S: Final = 0.5


async def error_response(error: GatewayError, request: Request, exchange: Exchange) -> Response:
    """A GatewayError as the JSON answer with its status: a JSON-RPC error response (an array for a batch)
    when the body is a JSON-RPC request, since that is all MCP clients show; else its own body."""
    body = b"" if error.status == BodyTooLarge.status else await _small_body(request, exchange)
    requests = rpc_requests(body) if body else None
    if requests is None:
        data: Any = error.body()
    elif requests.batch:
        data = [error.rpc_error(request_id) for request_id in requests.ids]
    else:
        data = error.rpc_error(requests.ids[0])
    return json_response(data, status=error.status, headers=error.response_headers())


async def _small_body(request: Request, exchange: Exchange) -> bytes | bytearray:
    """The request body if it is small (what the proxy would read whole anyway), else nothing.

    Most refusals come before the body is read, and clients write the head and the body separately
    (httpx does): across processes the body had arrived for 1 refusal in 40 of the fastmcp client's.
    So the rest of a small body is awaited, for REFUSAL_BODY_WAIT_S at most; never one held back for
    100 Continue, which it will not get, and never a large one (those keep the plain answer).
    """
    length = request.content_length
    if length is None or length > SMALL_BODY_BYTES:
        return b""
    if exchange.body_head:  # the proxy read it whole (Proxy._request_body)
        return exchange.body_head
    content = request.content
    if content.complete:
        return content.arrived()
    if request.expects_continue() and not content.total_bytes:
        return b""
    try:
        async with asyncio.timeout(REFUSAL_BODY_WAIT_S):
            return await content.read()
    except (TimeoutError, OSError, GatewayError):  # slow, gone, or a broken chunked body: the plain answer
        return b""


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
            refusal: GatewayError | None = None
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
                refusal = error
            if refusal is not None:  # answered outside the except: no await in one (gateway/retry.py says why)
                exchange.error = refusal
                response = await error_response(refusal, request, exchange)
                if refusal.closes_connection:
                    request.connection.keep_alive = False
            assert response is not None
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
