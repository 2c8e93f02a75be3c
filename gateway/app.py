"""Wiring: the data-plane and admin applications, their routes, middleware and shared resources."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from gateway import admin, proxy
from gateway.admin import READINESS, Readiness
from gateway.config import Settings
from gateway.deadlines import Deadlines
from gateway.engines import Engine, build_engine
from gateway.errors import error_middleware
from gateway.http1 import Http1Client
from gateway.upstream import AiohttpClient, UpstreamClient


def build_gateway_app(settings: Settings, engine: Engine | None = None) -> web.Application:
    app = web.Application(middlewares=[error_middleware])
    app[proxy.SETTINGS] = settings
    app[proxy.ENGINE] = engine or build_engine(settings)

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
    return Http1Client(settings)


def build_admin_app(readiness: Readiness) -> web.Application:
    app = web.Application()
    app[READINESS] = readiness
    app.router.add_get("/healthz", admin.healthz)
    app.router.add_get("/readyz", admin.readyz)
    app.router.add_get("/metrics", admin.metrics)
    return app
