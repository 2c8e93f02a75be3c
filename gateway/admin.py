"""The admin port: liveness, readiness and metrics, apart from the data plane."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from aiohttp import web


@dataclass(slots=True)
class Readiness:
    """Whether the data plane takes traffic: false while starting and once draining."""

    ready: bool = False


READINESS: Final = web.AppKey("readiness", Readiness)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    if request.app[READINESS].ready:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "not ready"}, status=503)


async def metrics(request: web.Request) -> web.Response:
    # TODO(#4): Prometheus metrics.
    return web.Response(text="# metrics arrive with issue #4\n", content_type="text/plain")
