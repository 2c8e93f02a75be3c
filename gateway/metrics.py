"""Prometheus metrics: their definitions on an injected registry, one observation per request.

Observations of the per-request series are tallied in plain ints and exported by flush(): by
/metrics before it answers, and with several workers once per event-loop pass (batch_done), since
another process may answer the scrape. prometheus_client takes a lock per inc, and a histogram
walks its buckets in Python per observation.

Names and labels of the request series match the reference gateway's dashboards. Labels are
bounded sets (normalised endpoint, allow-listed rpc_method, HTTP method, status), never a path or id.
Several worker processes share one view through prometheus_client's multiprocess mode.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import values as prometheus_values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from gateway.capacity import SYNC_EVERY_S, CapacityMetrics
from gateway.errors import ConfigError, GatewayError, TargetForbidden, UpstreamFailed
from gateway.exchange import Exchange

# The reference system's buckets: 1, 2, 4, ... 2^19 ms (about 8.7 minutes).
DURATION_BUCKETS_MS: Final = tuple(float(2**power) for power in range(20))
_BUCKET_COUNT: Final = len(DURATION_BUCKETS_MS) + 1  # and +Inf

# Endpoint label by the last path segment, so the set stays bounded whatever paths callers send.
_ENDPOINTS: Final = {"mcp": "/mcp", "sse": "/sse", "message": "/message", "messages": "/message",
                     "health": "/health"}
_HTTP_METHODS: Final = frozenset({"GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"})

# Kinds of upstream failure, the `kind` label of aenv_gateway_upstream_errors_total.
UPSTREAM_ERROR_KINDS: Final = (
    "connect_refused",   # nothing listens at the target
    "dns",               # the target host does not resolve
    "unreachable",       # any other failure before a response (reset, no route)
    "timeout",           # no connection or no response headers in time
    "bad_response",      # the upstream answered with something that is not HTTP
    "reset_mid_stream",  # the upstream broke after the response started (SSE or not)
    "idle_timeout",      # a non-SSE response body stalled longer than --idle-timeout
    "policy",            # the gateway refused the target itself (403)
)


# The sandbox label of aenv_gateway_sandbox_errors_total: the first this many sandboxes to fail get
# their own series, later ones are counted under "other", so a storm of failures cannot grow the
# label set without bound. A restart starts a fresh set.
MAX_SANDBOX_LABELS: Final = 200
OTHER_SANDBOXES: Final = "other"


def endpoint(path: str) -> str:
    return _ENDPOINTS.get(path.rstrip("/").rpartition("/")[2], "/other")


class _Buckets:
    """Observations of one histogram series, bucketed as prometheus_client would, not yet exported."""

    __slots__ = ("count", "counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * _BUCKET_COUNT
        self.total = 0.0
        self.count = 0

    def add(self, value: float) -> None:
        self.counts[bisect_left(DURATION_BUCKETS_MS, value)] += 1  # index len(...) is +Inf
        self.total += value
        self.count += 1

    def move_into(self, histogram: Histogram) -> None:
        # prometheus_client has no call to observe many values at once: its histogram keeps one
        # value per bucket (non-cumulative) and a sum, both with inc(); a test pins the equivalence.
        buckets = histogram._buckets
        for index, count in enumerate(self.counts):
            if count:
                buckets[index].inc(count)
        histogram._sum.inc(self.total)


@dataclass(slots=True)
class _Tally:
    """What the hot series observed since the last flush: plain ints and lists, no lock taken."""

    requests: dict[tuple[str, str, str, int], int] = field(default_factory=dict)
    durations: dict[tuple[str, str, str, int], _Buckets] = field(default_factory=dict)
    upstream_ms: _Buckets = field(default_factory=_Buckets)
    upstream_bytes: int = 0
    downstream_bytes: int = 0


# The reason label of aenv_gateway_tls_handshake_failures_total (handshake.py classifies).
TLS_FAILURE_REASONS: Final = ("no_client_certificate", "untrusted_client_certificate", "client_rejected_certificate",
                              "not_tls", "protocol_version", "no_shared_cipher", "closed", "other")


@dataclass(slots=True)
class OperationMetrics:
    """The operator's series: refused TLS handshakes and configuration reloads (handshake.py, reload.py)."""

    tls_handshake_failures: Counter
    config_reloads: Counter
    config_loaded_at: Gauge

    @classmethod
    def build(cls, registry: CollectorRegistry) -> OperationMetrics:
        operations = cls(
            tls_handshake_failures=Counter("aenv_gateway_tls_handshake_failures_total",
                                           "TLS handshakes on the proxy port that failed, by reason",
                                           ("reason",), registry=registry),
            config_reloads=Counter("aenv_gateway_config_reloads_total",
                                   "Configuration reloads (SIGHUP or a changed file), by result: ok or failed",
                                   ("result",), registry=registry),
            # livemin: with --workers, the oldest configuration any live worker runs.
            config_loaded_at=Gauge("aenv_gateway_config_last_reload_success_timestamp_seconds",
                                   "Unix time the running configuration was loaded (startup or last good reload)",
                                   registry=registry, multiprocess_mode="livemin"),
        )
        for reason in TLS_FAILURE_REASONS:  # every series exported from the start, at 0
            operations.tls_handshake_failures.labels(reason)
        for result in ("ok", "failed"):
            operations.config_reloads.labels(result)
        return operations


@dataclass(slots=True)
class Metrics:
    """Every series the gateway exports, built on the registry the caller passes in."""

    registry: CollectorRegistry
    requests: Counter
    duration_ms: Histogram
    active_streams: Gauge
    draining: Gauge
    upstream_errors: Counter
    refused: Counter
    relayed_bytes: Counter
    upstream_response_ms: Histogram
    sandbox_errors: Counter
    capacity: CapacityMetrics
    operations: OperationMetrics
    multiproc_dir: str = ""
    _upstream_bytes: Counter | None = None
    _downstream_bytes: Counter | None = None
    # .labels() costs a lock, a tuple and a dict lookup; each label set is resolved once.
    _counted: dict[tuple[str, str, str, int], Counter] = field(default_factory=dict)
    _timed: dict[tuple[str, str, str, int], Histogram] = field(default_factory=dict)
    _refused_children: dict[tuple[str, int], Counter] = field(default_factory=dict)
    _error_children: dict[str, Counter] = field(default_factory=dict)
    _sandbox_children: dict[tuple[str, str], Counter] = field(default_factory=dict)
    _sandboxes: set[str] = field(default_factory=set)
    _tally: _Tally = field(default_factory=lambda: _Tally())

    @classmethod
    def build(cls, registry: CollectorRegistry, multiproc_dir: str = "") -> Metrics:
        request_labels = ("method", "endpoint", "rpc_method", "status")
        metrics = cls(
            registry=registry,
            requests=Counter("aenv_api_mcp_requests_total", "Requests handled, SSE streams included",
                             request_labels, registry=registry),
            duration_ms=Histogram("aenv_api_mcp_request_duration_ms",
                                  "Request duration in milliseconds, SSE streams excluded",
                                  request_labels, registry=registry, buckets=DURATION_BUCKETS_MS),
            active_streams=Gauge("aenv_gateway_active_streams", "SSE streams being relayed now",
                                 registry=registry, multiprocess_mode="livesum"),
            draining=Gauge("aenv_gateway_draining",
                           "1 from SIGTERM/SIGINT until the process exits (the drain), else 0",
                           registry=registry, multiprocess_mode="livemax"),
            upstream_errors=Counter("aenv_gateway_upstream_errors_total", "Upstream failures by kind",
                                    ("kind",), registry=registry),
            refused=Counter("aenv_gateway_refused_requests_total",
                            "Requests the gateway answered itself without forwarding, by reason",
                            ("reason", "status"), registry=registry),
            relayed_bytes=Counter("aenv_gateway_relayed_bytes_total",
                                  "Body bytes relayed: direction=upstream from callers, downstream to them",
                                  ("direction",), registry=registry),
            upstream_response_ms=Histogram("aenv_gateway_upstream_response_ms",
                                           "Milliseconds from forwarding a request to the upstream's "
                                           "response headers (connect included)",
                                           registry=registry, buckets=DURATION_BUCKETS_MS),
            sandbox_errors=Counter("aenv_gateway_sandbox_errors_total",
                                   "Upstream failures by sandbox (AEnvCore-EnvInstance-ID, else the target "
                                   f"host:port) and kind; after {MAX_SANDBOX_LABELS} sandboxes, sandbox=other",
                                   ("sandbox", "kind"), registry=registry),
            capacity=CapacityMetrics.build(registry),
            operations=OperationMetrics.build(registry),
            multiproc_dir=multiproc_dir,
        )
        metrics._upstream_bytes = metrics.relayed_bytes.labels("upstream")
        metrics._downstream_bytes = metrics.relayed_bytes.labels("downstream")
        for kind in UPSTREAM_ERROR_KINDS:  # every kind exported from the start, at 0
            metrics._error_children[kind] = metrics.upstream_errors.labels(kind)
        return metrics

    def observe(self, method: str, path: str, status: int, rpc_method: str, elapsed_ms: float,
                exchange: Exchange, bytes_in: int, refused_reason: str = "", sandbox: str = "") -> None:
        """One finished request: its counter, its duration unless a stream, bytes and failures.

        Relayed bytes count bodies that crossed the gateway, not the gateway's own answers. The request,
        duration, bytes and upstream time series are exported at the next flush(); failures at once.
        """
        key = (method if method in _HTTP_METHODS else "OTHER", endpoint(path), rpc_method, status)
        tally = self._tally
        tally.requests[key] = tally.requests.get(key, 0) + 1
        if not exchange.is_stream:  # a stream's series is never created, as in the reference gateway
            durations = tally.durations.get(key)
            if durations is None:
                durations = tally.durations[key] = _Buckets()
            durations.add(elapsed_ms)
        if bytes_in and exchange.target:
            tally.upstream_bytes += bytes_in
        tally.downstream_bytes += exchange.bytes_out
        if exchange.upstream_ms is not None:
            tally.upstream_ms.add(exchange.upstream_ms)
        if exchange.upstream_error:
            self._error_children[exchange.upstream_error].inc()
            if exchange.upstream_error != "policy":
                self._sandbox_failed(sandbox or exchange.target, exchange.upstream_error)
        if refused_reason:
            refused = self._refused_children.get((refused_reason, status))
            if refused is None:
                refused = self._refused_children[refused_reason, status] = self.refused.labels(
                    refused_reason, str(status))
            refused.inc()

    def batch_done(self) -> None:
        """The access log observed a loop pass's requests. With several workers another process may
        answer the next scrape, so the tally goes to the shared files now; alone, the scrape flushes."""
        if self.multiproc_dir:
            self.flush()
            self.capacity.sync(every_s=SYNC_EVERY_S)

    def flush(self) -> None:
        """Move the tallied observations into the exported series (one inc per series and bucket)."""
        tally, self._tally = self._tally, _Tally()
        for key, count in tally.requests.items():
            counted = self._counted.get(key)
            if counted is None:
                counted = self._counted[key] = self.requests.labels(*key[:3], str(key[3]))
            counted.inc(count)
        for key, durations in tally.durations.items():
            timed = self._timed.get(key)
            if timed is None:
                timed = self._timed[key] = self.duration_ms.labels(*key[:3], str(key[3]))
            durations.move_into(timed)
        if tally.upstream_bytes and self._upstream_bytes is not None:
            self._upstream_bytes.inc(tally.upstream_bytes)
        if tally.downstream_bytes and self._downstream_bytes is not None:
            self._downstream_bytes.inc(tally.downstream_bytes)
        if tally.upstream_ms.count:
            tally.upstream_ms.move_into(self.upstream_response_ms)

    def _sandbox_failed(self, sandbox: str, kind: str) -> None:
        if sandbox not in self._sandboxes:
            if len(self._sandboxes) >= MAX_SANDBOX_LABELS:
                sandbox = OTHER_SANDBOXES
            else:
                self._sandboxes.add(sandbox)
        child = self._sandbox_children.get((sandbox, kind))
        if child is None:
            child = self._sandbox_children[sandbox, kind] = self.sandbox_errors.labels(sandbox, kind)
        child.inc()

    @contextmanager
    def open_stream(self, exchange: Exchange) -> Iterator[None]:
        """Count an SSE stream as active while it is relayed, and keep it out of the histogram."""
        exchange.is_stream = True
        self.active_streams.inc()
        try:
            yield
        finally:
            self.active_streams.dec()

    def exposition(self) -> bytes:
        """The Prometheus text for /metrics: this process's registry, or every worker's files."""
        self.flush()
        self.capacity.sync()
        if not self.multiproc_dir:
            return generate_latest(self.registry)
        scrape = CollectorRegistry()
        MultiProcessCollector(scrape, path=self.multiproc_dir)  # type: ignore[no-untyped-call]
        return generate_latest(scrape)

    def retire(self) -> None:
        """At process exit in multiprocess mode: drop this process's live gauges from the sum."""
        if self.multiproc_dir:
            mark_process_dead(os.getpid(), self.multiproc_dir)  # type: ignore[no-untyped-call]


def use_multiprocess_dir(directory: str, environ: MutableMapping[str, str]) -> None:
    """Switch prometheus_client to multiprocess mode, writing under `directory`; before any Metrics.build.

    prometheus_client reads PROMETHEUS_MULTIPROC_DIR when first imported, to choose how values are
    stored, and again when a process opens its files. We were imported before the settings were
    read, so the CLI passes its environment here: the variable is set from --metrics-multiproc-dir
    and the value class chosen again, so the setting, not whatever the environment said, decides.
    """
    if not Path(directory).is_dir():
        raise ConfigError(f"--metrics-multiproc-dir: {directory!r} is not a directory")
    environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    prometheus_values.ValueClass = prometheus_values.get_value_class()  # type: ignore[no-untyped-call]


METRICS: Final = web.AppKey("metrics", Metrics)
EXPOSITION_CONTENT_TYPE: Final = CONTENT_TYPE_LATEST


def upstream_error_kind(error: GatewayError) -> str:
    """The `kind` of an error answered before any response byte, or "" if the upstream is not to blame."""
    if isinstance(error, UpstreamFailed):
        return error.kind
    return "policy" if error.code == TargetForbidden.code else ""  # not Origin or Host: no target involved
