"""Wiring: the data-plane and admin applications, their routes, middleware and shared resources."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, Final

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CollectorRegistry

from gateway import admin, proxy
from gateway.admin import READINESS, Readiness
from gateway.auth import bearer_auth
from gateway.config import Settings, read_tokens
from gateway.deadlines import Deadlines
from gateway.engines import Engine, build_engine
from gateway.errors import error_middleware
from gateway.http1 import Http1Client
from gateway.limits import LIMITS, Limits
from gateway.log import access_middleware
from gateway.metrics import METRICS, Metrics
from gateway.policy import TargetPolicy
from gateway.upstream import AiohttpClient, UpstreamClient
from gateway.via import VIA_MARK, loop_guard, new_mark

# How the data plane must be served (AppRunner / TestServer keyword arguments):
# - handler_cancellation: web.run_app and AppRunner leave it off, and then a handler relaying a silent
#   SSE stream never learns that its downstream went away.
# - auto_decompress: aiohttp's server inflates gzip request bodies by default; we forward bytes as sent.
# - access_log: one structured line per request is ours to write, not aiohttp's.
GATEWAY_SERVER_OPTIONS: Final[Mapping[str, Any]] = {
    "handler_cancellation": True,
    "auto_decompress": False,
    "access_log": None,
}


def build_gateway_app(
    settings: Settings, engine: Engine | None = None, metrics: Metrics | None = None
) -> web.Application:
    engine = engine or build_engine(settings)
    limits = Limits(settings)
    metrics = metrics or Metrics.build(CollectorRegistry())
    # Outermost first. The access line wraps everything so refusals are logged and counted too.
    layers: list[Middleware] = [access_middleware(settings, metrics, engine.name), error_middleware,
                                limits.middleware, loop_guard]
    if settings.auth_token_file:
        # Before limits: auth hands inner layers a clone of the request, and limits must count and
        # release on the same object the proxy admits.
        tokens = read_tokens(settings.auth_token_file)
        layers.insert(2, bearer_auth(tokens, engine.routing_headers, settings.forward_authorization))
    app = web.Application(middlewares=layers)
    app[proxy.SETTINGS] = settings
    app[proxy.ENGINE] = engine
    app[LIMITS] = limits
    app[VIA_MARK] = new_mark()
    app[METRICS] = metrics

    async def client_session(app: web.Application) -> AsyncIterator[None]:
        app[proxy.UPSTREAM] = _upstream_client(settings)
        yield
        await app[proxy.UPSTREAM].close()

    app.cleanup_ctx.append(client_session)
    # Idle timeouts are checked by one tick, at a tenth of their length (at most every second).
    deadlines = Deadlines(resolution_s=min(1.0, settings.idle_timeout_s / 10))
    app[proxy.DEADLINES] = deadlines
    app.cleanup_ctx.append(lambda _: deadlines.run())
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    return app


def _upstream_client(settings: Settings) -> UpstreamClient:
    if settings.upstream_client == "aiohttp":
        return AiohttpClient(settings)
    return Http1Client(settings, resolve=TargetPolicy.from_settings(settings).resolve_allowed)


def build_admin_app(readiness: Readiness, metrics: Metrics | None = None) -> web.Application:
    app = web.Application()
    app[READINESS] = readiness
    app[METRICS] = metrics or Metrics.build(CollectorRegistry())
    app.router.add_get("/healthz", admin.healthz)
    app.router.add_get("/readyz", admin.readyz)
    app.router.add_get("/metrics", admin.metrics)
    return app
