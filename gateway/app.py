"""Wiring: the data-plane and admin applications, their routes, handlers and shared resources."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Final, cast

from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway import admin
from gateway.admin import READINESS, Readiness
from gateway.auth import bearer_auth
from gateway.capacity import watch_fds
from gateway.config import Settings
from gateway.configuration import Configuration, build_configuration
from gateway.dataplane import DataPlaneHandler, data_plane_handler
from gateway.deadlines import Deadlines
from gateway.engines import Engine
from gateway.handshake import HandshakeFailures, ServingContext
from gateway.http1 import Http1Client
from gateway.limits import Limits
from gateway.log import AccessLog
from gateway.metrics import METRICS, Metrics
from gateway.policy import TargetPolicy
from gateway.proxy import Proxy
from gateway.server import Server
from gateway.tracing import Tracing
from gateway.upstream import AiohttpClient, UpstreamClient
from gateway.via import new_mark

# The server of the data plane (server.py), calling its one handler (dataplane.py) for every request.
DATA_PLANE: Final[web.AppKey[Server]] = web.AppKey("data_plane")
# Its Limits, for the drain (cli) and the tests; limits.py itself knows nothing of aiohttp.
LIMITS: Final = web.AppKey("limits", Limits)


@dataclass(slots=True)
class DataPlane:
    """The data plane's long-lived parts. A reload (reload.py) reconfigures them in place: a request in
    flight keeps the handler and objects it started with, the next one sees the new settings."""

    server: Server
    proxy: Proxy
    limits: Limits
    deadlines: Deadlines
    metrics: Metrics
    tracing: Tracing | None = None  # the spans of requests, when tracing is on (tracing.py); kept across reloads
    tls: ServingContext | None = None  # what the proxy port listens with when it speaks TLS

    def serve_with(self, configuration: Configuration) -> None:
        """The next request is handled with this configuration's tokens, Origin and Host rules, log settings."""
        self.server.handler = _handler(self.proxy, self.metrics, configuration, self.tracing)


def _handler(proxy: Proxy, metrics: Metrics, configuration: Configuration, tracing: Tracing | None
             ) -> DataPlaneHandler:
    settings, engine = configuration.settings, configuration.engine
    authenticate = None
    if configuration.tokens:
        authenticate = bearer_auth(configuration.tokens, engine.routing_headers, settings.forward_authorization)
    origins = configuration.origins
    return data_plane_handler(proxy, AccessLog(settings, metrics, engine.name, tracing), authenticate,
                              origins.check if origins.checks_anything else None)


PARTS: Final = web.AppKey("parts", DataPlane)


def build_gateway_app(
    settings: Settings, engine: Engine | None = None, metrics: Metrics | None = None,
    configuration: Configuration | None = None, tracing: Tracing | None = None,
) -> web.Application:
    if configuration is None:
        configuration = build_configuration(settings)
        if engine is not None:
            configuration = dataclasses.replace(configuration, engine=engine)
    settings, engine = configuration.settings, configuration.engine
    limits = Limits(settings)
    metrics = metrics or Metrics.build(CollectorRegistry())
    # Idle timeouts are checked by one tick, at a tenth of their length (at most every second).
    deadlines = Deadlines(resolution_s=deadline_resolution_s(settings))
    proxy = Proxy(settings, engine, limits, metrics, deadlines, via_mark=new_mark())
    app = web.Application()
    app[LIMITS] = limits
    app[METRICS] = metrics
    policy = configuration.policy

    async def upstream_client(_: web.Application) -> AsyncIterator[None]:
        proxy.upstream = upstream = _upstream_client(settings, policy)
        metrics.capacity.source = upstream.stats
        yield
        metrics.capacity.source = None
        await upstream.close()

    app.cleanup_ctx.append(upstream_client)
    app.cleanup_ctx.append(_watching_fds)
    app.cleanup_ctx.append(lambda _: _ticking(deadlines))
    server = Server(_handler(proxy, metrics, configuration, tracing), max_head_bytes=settings.max_header_size)
    parts = DataPlane(server, proxy, limits, deadlines, metrics, tracing)
    if configuration.tls is not None:
        parts.tls = ServingContext(configuration.tls, HandshakeFailures(metrics.operations.tls_handshake_failures))
    app[DATA_PLANE] = server
    app[PARTS] = parts
    return app


def deadline_resolution_s(settings: Settings) -> float:
    return min(1.0, settings.idle_timeout_s / 10)


class DataPlaneRunner(web.BaseRunner):
    """Runs the gateway app as AppRunner does, its sites listening with the data plane's own server
    (server.py) instead of aiohttp's: the app still starts and cleans up its resources with the
    runner, and TCPSite and the drain work as for any aiohttp app. aiohttp's server options
    (handler_cancellation, access_log...) do not apply: ours always cancels a handler whose client
    left, writes its own access log, and never decompresses.
    """

    __slots__ = ("_app",)

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._app = app

    async def shutdown(self) -> None:
        await self._app.shutdown()

    async def _make_server(self) -> web.Server:
        self._app.on_startup.freeze()
        await self._app.startup()
        self._app.freeze()
        return cast(web.Server, self._app[DATA_PLANE])  # a protocol factory with pre_shutdown() and shutdown()

    async def _cleanup_server(self) -> None:
        await self._app.cleanup()


async def _watching_fds(_: web.Application) -> AsyncIterator[None]:
    watch = asyncio.ensure_future(watch_fds())
    yield
    watch.cancel()
    with suppress(asyncio.CancelledError):
        await watch


async def _ticking(deadlines: Deadlines) -> AsyncIterator[None]:
    deadlines.start()
    yield
    deadlines.stop()


def _upstream_client(settings: Settings, policy: TargetPolicy) -> UpstreamClient:
    if settings.upstream_client == "aiohttp":
        return AiohttpClient(settings, policy=policy)
    return Http1Client(settings, resolve=policy.resolve_allowed)


def build_admin_app(readiness: Readiness, metrics: Metrics | None = None) -> web.Application:
    app = web.Application()
    app[READINESS] = readiness
    app[METRICS] = metrics or Metrics.build(CollectorRegistry())
    app.router.add_get("/healthz", admin.healthz)
    app.router.add_get("/readyz", admin.readyz)
    app.router.add_get("/metrics", admin.metrics)
    return app
