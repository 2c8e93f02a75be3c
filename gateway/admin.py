"""The admin port: liveness, readiness and metrics, apart from the data plane."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from aiohttp import web

from gateway.metrics import EXPOSITION_CONTENT_TYPE, METRICS


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
    exposition = request.app[METRICS].exposition()
    return web.Response(body=exposition, headers={"Content-Type": EXPOSITION_CONTENT_TYPE})
