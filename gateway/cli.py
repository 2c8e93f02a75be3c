"""The program: read argv and the environment, build the apps, serve both ports until a signal."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import importlib.machinery
import os
import platform
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Final

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry
from yarl import URL

from gateway import __version__
from gateway.admin import Readiness
from gateway.app import LIMITS, PARTS, DataPlaneRunner, build_admin_app, build_gateway_app
from gateway.capacity import raise_fd_limit
from gateway.config import Settings
from gateway.configuration import Configuration, build_configuration, load_configuration
from gateway.engines import Engine
from gateway.errors import ConfigError
from gateway.http1 import connection_budget
from gateway.limits import Limits
from gateway.log import configure_logging, shown_settings
from gateway.metrics import Metrics, use_multiprocess_dir
from gateway.reload import Reloader
from gateway.supervisor import SUPERVISOR_PID_ENV, supervise
from gateway.tracing import Tracing, TracingConfig, tracing_config

log = structlog.get_logger(__name__)

# Seconds handlers get after the drain (streams write their last chunk) before aiohttp cancels them.
CLOSE_GRACE_S: Final = 1.0


# Python's cycle collector scans every tracked object of a generation each time it runs. Left at its
# defaults, under load it ran ~150 times a second and a full collection over the startup heap
# (modules, aiohttp, prometheus_client) stalled every request for up to 22 ms (docs/performance.md).
# Request objects are freed by reference counting; the collector only needs to find rare cycles.
GC_THRESHOLDS: Final = (50_000, 20, 100)


def settle_garbage_collector() -> None:
    """Once the program is built: startup objects are never scanned again, and young ones less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def serve(settings: Settings, engine: Engine, reuse_port: bool = False,
                configuration: Configuration | None = None, argv: Sequence[str] | None = None,
                environ: Mapping[str, str] | None = None, trace_config: TracingConfig | None = None) -> None:
    """Serve the proxy and admin ports until SIGTERM or SIGINT, then drain (docs/security.md).

    reuse_port when a supervisor runs several workers on the same ports (docs/scaling.md). With the
    argv and environment it started with, SIGHUP and changed files reload the configuration (reload.py).
    trace_config: tracing is on; the span exporter of this process starts here (docs/observability.md).
    """
    fd_limit = raise_fd_limit()  # before the pool sizes its budget from it
    readiness = Readiness()
    metrics = Metrics.build(CollectorRegistry(), settings.metrics_multiproc_dir)
    configuration = configuration or dataclasses.replace(build_configuration(settings), engine=engine)
    tracing = Tracing(trace_config, engine.name) if trace_config is not None else None
    gateway_app = build_gateway_app(settings, metrics=metrics, configuration=configuration, tracing=tracing)
    reloader = None
    if argv is not None:
        reloader = Reloader(argv, environ or {}, configuration, gateway_app[PARTS], metrics.operations)
    # shutdown_timeout is what is left after our own drain: requests still running then are cancelled.
    gateway_runner = DataPlaneRunner(gateway_app, shutdown_timeout=CLOSE_GRACE_S)
    admin_runner = web.AppRunner(build_admin_app(readiness, metrics), access_log=None,
                                 shutdown_timeout=CLOSE_GRACE_S)
    await gateway_runner.setup()
    await admin_runner.setup()
    settle_garbage_collector()
    try:
        await web.TCPSite(gateway_runner, settings.host, settings.port, backlog=1024, reuse_port=reuse_port,
                          ssl_context=gateway_app[PARTS].tls).start()
        await web.TCPSite(admin_runner, settings.host, settings.admin_port, reuse_port=reuse_port).start()
        signalled = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, signalled.set)
        watch = None
        if reloader is not None:
            loop.add_signal_handler(signal.SIGHUP, reloader.reload, "SIGHUP")
            watch = asyncio.ensure_future(reloader.watch())
        readiness.ready = True
        log.info("gateway_started", host=settings.host, port=settings.port,
                 admin_port=settings.admin_port, engine=settings.schedule_type, fd_limit=fd_limit,
                 upstream_max_connections=connection_budget(settings), tls=configuration.tls is not None,
                 client_certificates=settings.tls_client_ca is not None, version=__version__, form=build_form())
        if trace_config is not None:
            log.info("tracing_started", endpoint=str(URL(trace_config.endpoint).with_user(None)),
                     service_name=trace_config.service_name, sampler=trace_config.sampler)
        await signalled.wait()
        readiness.ready = False
        metrics.draining.set(1)  # still scraped: the admin port serves until the drain is over
        if watch is not None:
            watch.cancel()
        running = reloader.configuration.settings if reloader is not None else settings
        await _drain(gateway_app[LIMITS], running.drain_timeout_s, signalled)
        log.info("gateway_stopping")
    finally:
        await gateway_runner.cleanup()
        await admin_runner.cleanup()
        metrics.retire()
        if tracing is not None:
            await asyncio.sleep(0)  # the last requests' spans end in the access log's next pass
            tracing.shutdown()


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


def describe(configuration: Configuration) -> str:
    """The --check-config line: what the configuration amounts to, no secret in it."""
    settings = configuration.settings
    tls = "plain HTTP"
    if configuration.tls is not None:
        tls = "TLS with client certificates" if settings.tls_client_ca else "TLS"
    tokens = f"{len(configuration.tokens)} bearer token(s)" if configuration.tokens else "no inbound auth"
    source = settings.config_path or "flags and environment"
    return (f"{source}: engine {settings.schedule_type}, proxy {settings.host}:{settings.port} ({tls}), "
            f"admin port {settings.admin_port}, {tokens}, {len(settings.target_allow)} target_allow and "
            f"{len(settings.target_deny)} target_deny rule(s)")


def _event_loop_factory() -> type[asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.Loop


def build_form() -> str:
    """Which form of the gateway runs: "compiled" (mypyc, setup.py) or "pure" Python, and how many modules."""
    modules = [module for name, module in sys.modules.items()
               if name.startswith("gateway.") and not name.endswith("__mypyc")]  # not mypyc's shared library
    compiled = sum(1 for module in modules if (getattr(module, "__file__", None) or "").endswith(_EXTENSIONS))
    return f"compiled: {compiled} of {len(modules)} modules" if compiled else "pure"


_EXTENSIONS: Final = tuple(importlib.machinery.EXTENSION_SUFFIXES)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        from gateway.config import build_parser

        build_parser().print_help()
        return 0
    if "--version" in argv:
        print(f"mcp-gateway {__version__} ({build_form()}; Python {platform.python_version()})")
        return 0
    try:
        configuration = load_configuration(argv, os.environ)
        settings = configuration.settings
        trace_config = tracing_config(settings, os.environ)
        if settings.metrics_multiproc_dir:
            use_multiprocess_dir(settings.metrics_multiproc_dir, os.environ)
    except ConfigError as exc:
        print(f"mcp-gateway: error: {exc}", file=sys.stderr)
        return 2
    if "--check-config" in argv:
        print(f"mcp-gateway: configuration OK: {describe(configuration)}")
        return 0
    # Until the loop's handler is installed, a SIGHUP (a supervisor forwarding one early) must not kill us.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Loggers are not cached, so that a reload's --log-level reaches every module's (reload.py); the
    # access log, the one logger per request, holds its own.
    configure_logging(settings.log_format, settings.log_level, cache=False)
    log.info("effective_settings", **shown_settings(settings))
    try:
        if settings.workers > 1:
            return supervise(settings, argv, os.environ)
        with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
            runner.run(serve(settings, configuration.engine, reuse_port=SUPERVISOR_PID_ENV in os.environ,
                             configuration=configuration, argv=argv, environ=dict(os.environ),
                             trace_config=trace_config))
    except OSError as exc:  # a port already in use, an address we cannot bind
        print(f"mcp-gateway: error: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0
