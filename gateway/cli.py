"""The program: read argv and the environment, build the apps, serve both ports until a signal."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from typing import Final

import structlog
from aiohttp import web

from gateway.admin import Readiness
from gateway.app import build_admin_app, build_gateway_app
from gateway.config import Settings, load_settings
from gateway.engines import Engine, build_engine
from gateway.errors import ConfigError
from gateway.limits import LIMITS, Limits, server_limits
from gateway.log import configure_logging

log = structlog.get_logger(__name__)

# Seconds handlers get after the drain (streams write their last chunk) before aiohttp cancels them.
CLOSE_GRACE_S: Final = 1.0


async def serve(settings: Settings, engine: Engine) -> None:
    """Serve the proxy and admin ports until SIGTERM or SIGINT, then drain (docs/security.md)."""
    readiness = Readiness()
    gateway_app = build_gateway_app(settings, engine)
    # web.run_app and AppRunner leave handler_cancellation off: without it a handler relaying a
    # silent SSE stream never learns that its downstream went away. shutdown_timeout is what is
    # left after our own drain: requests still running by then are cancelled.
    gateway_runner = web.AppRunner(gateway_app, handler_cancellation=True, access_log=None,
                                   shutdown_timeout=CLOSE_GRACE_S, **server_limits(settings))
    admin_runner = web.AppRunner(build_admin_app(readiness), access_log=None, shutdown_timeout=CLOSE_GRACE_S)
    await gateway_runner.setup()
    await admin_runner.setup()
    try:
        await web.TCPSite(gateway_runner, settings.host, settings.port, backlog=1024).start()
        await web.TCPSite(admin_runner, settings.host, settings.admin_port).start()
        signalled = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, signalled.set)
        readiness.ready = True
        log.info("gateway_started", host=settings.host, port=settings.port,
                 admin_port=settings.admin_port, engine=settings.schedule_type)
        await signalled.wait()
        readiness.ready = False
        await _drain(gateway_app[LIMITS], settings.drain_timeout_s, signalled)
        log.info("gateway_stopping")
    finally:
        await gateway_runner.cleanup()
        await admin_runner.cleanup()


async def _drain(limits: Limits, timeout_s: float, signalled: asyncio.Event) -> None:
    """Keep serving while in-flight requests finish (up to timeout_s); a second signal cuts it short."""
    log.info("gateway_draining", timeout_s=timeout_s, inflight=limits.inflight, streams=len(limits.streams))
    signalled.clear()
    drained = asyncio.ensure_future(limits.drain(timeout_s))
    second_signal = asyncio.ensure_future(signalled.wait())
    await asyncio.wait((drained, second_signal), return_when=asyncio.FIRST_COMPLETED)
    second_signal.cancel()
    if not drained.done():
        log.warning("gateway_drain_cut_short", inflight=limits.inflight)
        drained.cancel()
        await limits.drain(0)
    log.info("gateway_drained", inflight=limits.inflight)


def _event_loop_factory() -> type[asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.Loop


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        from gateway.config import build_parser

        build_parser().print_help()
        return 0
    try:
        settings = load_settings(argv, os.environ)
        engine = build_engine(settings)
    except ConfigError as exc:
        print(f"mcp-gateway: error: {exc}", file=sys.stderr)
        return 2
    configure_logging()
    try:
        with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
            runner.run(serve(settings, engine))
    except OSError as exc:  # a port already in use, an address we cannot bind
        print(f"mcp-gateway: error: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0
