"""The data plane's one handler: the checks, the proxy call, our own error answers and the accounting.

Plain calls in one coroutine rather than a stack of aiohttp middleware, whose layers cost a
coroutine and a partial each per request (docs/performance.md). The order is the contract:

    access log and metrics   every request once it finished, refusals included
    parser refusals          400, 431 (server.py: malformed requests, heads far over the limit)
    authentication           401 (--auth-token-file); header-less GET /health stays open
    size limits              413, 431; from here on the request counts as in flight for the drain
    loop guard               508
    proxy                    engine, per-target limit, upstream call, relay (proxy.py)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from gateway.auth import Authenticate
from gateway.errors import GatewayError
from gateway.exchange import CLIENT_CLOSED, INTERNAL_ERROR
from gateway.headers import REQUEST_ID
from gateway.log import AccessLog
from gateway.proxy import Proxy
from gateway.server import Request, Response, StreamResponse, json_response
from gateway.via import refuse_loops

DataPlaneHandler = Callable[[Request], Awaitable[Response | StreamResponse]]


def error_response(error: GatewayError) -> Response:
    """A GatewayError as the JSON answer with its status."""
    return json_response(error.body(), status=error.status, headers=error.response_headers())


def data_plane_handler(
    proxy: Proxy, access_log: AccessLog, authenticate: Authenticate | None = None
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
                response = error_response(error)
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
