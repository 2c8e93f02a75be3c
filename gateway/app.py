"""Wiring: the data-plane and admin applications, their routes, middleware and shared resources."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway import admin, proxy
from gateway.admin import READINESS, Readiness
from gateway.auth import bearer_auth
from gateway.config import Settings, read_tokens
from gateway.engines import Engine, build_engine
from gateway.errors import error_middleware
from gateway.limits import LIMITS, Limits
from gateway.upstream import AiohttpClient
from gateway.via import VIA_MARK, loop_guard, new_mark


def build_gateway_app(settings: Settings, engine: Engine | None = None) -> web.Application:
    engine = engine or build_engine(settings)
    limits = Limits(settings)
    middlewares: list[Middleware] = [error_middleware, limits.middleware, loop_guard]
    if settings.auth_token_file:
        # Before limits: auth hands inner layers a clone of the request, and limits must count and
        # release on the same object the proxy admits.
        tokens = read_tokens(settings.auth_token_file)
        middlewares.insert(1, bearer_auth(tokens, engine.routing_headers, settings.forward_authorization))
    app = web.Application(middlewares=middlewares)
    app[proxy.SETTINGS] = settings
    app[proxy.ENGINE] = engine
    app[LIMITS] = limits
    app[VIA_MARK] = new_mark()

    async def client_session(app: web.Application) -> AsyncIterator[None]:
        app[proxy.UPSTREAM] = AiohttpClient(settings)
        yield
        await app[proxy.UPSTREAM].close()

    app.cleanup_ctx.append(client_session)
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    return app


def build_admin_app(readiness: Readiness) -> web.Application:
    app = web.Application()
    app[READINESS] = readiness
    app.router.add_get("/healthz", admin.healthz)
    app.router.add_get("/readyz", admin.readyz)
    app.router.add_get("/metrics", admin.metrics)
    return app
