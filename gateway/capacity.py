"""How close the gateway is to its own limits: file descriptors and the upstream connection budget.

Read when /metrics is scraped (and, with several workers, at most once a second), never per request:
the pool keeps plain counts and this module turns them into series. Also raises the fd limit at
startup, as Go's runtime and nginx's worker_rlimit_nofile do.
"""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from gateway.pool import CLOSE_REASONS, PoolStats

log = structlog.get_logger(__name__)

# With several workers, pool series go to the shared files at most this often (a scrape reads them).
SYNC_EVERY_S: Final = 1.0
# The fd watch: how often it looks, and the share of the limit in use that it warns at. Connections a
# caller opens once no fd is left are accepted and closed by the event loop itself, unseen by us: the
# watch is what puts that episode in the log.
WATCH_EVERY_S: Final = 1.0
WARN_AT_SHARE: Final = 0.9


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # a hard limit the kernel will not grant (above fs.nr_open)
            pass
    return soft


def open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir opened
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):  # not one left to look with: all in use
            return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return 0  # no procfs (not Linux)


@dataclass(slots=True)
class CapacityMetrics:
    connections: Gauge
    budget: Gauge
    opened: Counter
    closed: Counter
    fds: Gauge
    fd_limit: Gauge
    source: Callable[[], PoolStats | None] | None = None
    _opened_seen: int = 0
    _closed_seen: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLOSE_REASONS, 0))
    _synced_at: float = 0.0

    @classmethod
    def build(cls, registry: CollectorRegistry) -> CapacityMetrics:
        metrics = cls(
            connections=Gauge("aenv_gateway_upstream_connections",
                              "Pooled upstream connections by state: idle (kept for reuse) or busy (in an "
                              "exchange, or opening)", ("state",), registry=registry, multiprocess_mode="livesum"),
            budget=Gauge("aenv_gateway_upstream_connection_budget",
                         "Upstream connections the pool may hold open at once (--upstream-max-connections)",
                         registry=registry, multiprocess_mode="livesum"),
            opened=Counter("aenv_gateway_upstream_connections_opened_total", "Upstream connections opened",
                           registry=registry),
            closed=Counter("aenv_gateway_upstream_connections_closed_total",
                           "Upstream connections closed, by reason: idle_timeout, evicted (budget, idle cap, "
                           "out of fds), upstream_closed, error, shutdown", ("reason",), registry=registry),
            fds=Gauge("aenv_gateway_open_fds", "File descriptors the gateway has open",
                      registry=registry, multiprocess_mode="livesum"),
            fd_limit=Gauge("aenv_gateway_fd_limit", "The gateway's RLIMIT_NOFILE (per process)",
                           registry=registry, multiprocess_mode="max"),
        )
        for reason in CLOSE_REASONS:  # every reason exported from the start, at 0
            metrics.closed.labels(reason)
        return metrics

    def sync(self, now: float | None = None, every_s: float = 0.0) -> None:
        """Bring the series up to date with the pool and the process; skipped if done within every_s."""
        now = time.monotonic() if now is None else now
        if every_s and now - self._synced_at < every_s:
            return
        self._synced_at = now
        self.fds.set(open_fds())
        self.fd_limit.set(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        stats = self.source() if self.source is not None else None
        if stats is None:
            return
        self.connections.labels("idle").set(stats.idle)
        self.connections.labels("busy").set(stats.busy)
        self.budget.set(stats.max_connections)
        if stats.opened > self._opened_seen:
            self.opened.inc(stats.opened - self._opened_seen)
            self._opened_seen = stats.opened
        for reason, count in stats.closed.items():
            if count > self._closed_seen[reason]:
                self.closed.labels(reason).inc(count - self._closed_seen[reason])
                self._closed_seen[reason] = count


async def watch_fds(every_s: float = WATCH_EVERY_S) -> None:
    """Log once when open fds reach WARN_AT_SHARE of the limit, and once when they fall back below it."""
    warned = False
    while True:
        await asyncio.sleep(every_s)
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        used = open_fds()
        if not warned and used >= WARN_AT_SHARE * limit:
            warned = True
            log.warning("fds_nearly_exhausted", open_fds=used, fd_limit=limit,
                        hint="callers beyond the limit are disconnected at once; raise the limit, or lower "
                             "--upstream-max-connections / --upstream-max-idle")
        elif warned and used < WARN_AT_SHARE * limit * 0.9:
            warned = False
            log.info("fds_recovered", open_fds=used, fd_limit=limit)
