"""Wiring: the data-plane and admin applications, their routes, handlers and shared resources."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, Final

from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway import admin, proxy
from gateway.admin import READINESS, Readiness
from gateway.auth import bearer_auth
from gateway.config import Settings, read_tokens
from gateway.dataplane import data_plane_handler
from gateway.deadlines import Deadlines
from gateway.engines import Engine, build_engine
from gateway.http1 import Http1Client
from gateway.limits import LIMITS, Limits
from gateway.log import AccessLog
from gateway.metrics import METRICS, Metrics
from gateway.policy import TargetPolicy
from gateway.upstream import AiohttpClient, UpstreamClient
from gateway.via import VIA_MARK, new_mark

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
    authenticate = None
    if settings.auth_token_file:
        tokens = read_tokens(settings.auth_token_file)
        authenticate = bearer_auth(tokens, engine.routing_headers, settings.forward_authorization)
    app = web.Application()
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
    access_log = AccessLog(settings, metrics, engine.name)
    app.router.add_route("*", "/{tail:.*}", data_plane_handler(access_log, limits, app[VIA_MARK], authenticate))
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
