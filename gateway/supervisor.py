"""The supervisor behind `--workers N`: N worker processes share both ports with SO_REUSEPORT.

It starts the workers, restarts one that dies (with a bounded back-off), forwards SIGTERM/SIGINT for a
graceful drain and SIGHUP for a reload (each worker reloads itself: reload.py), and owns the metrics
directory the workers share. It never handles a request.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import structlog
from prometheus_client.multiprocess import mark_process_dead

from gateway.config import Settings, load_settings
from gateway.errors import ConfigError

log = structlog.get_logger(__name__)

# Set in each worker's environment: the worker binds its ports with SO_REUSEPORT.
SUPERVISOR_PID_ENV: Final = "GATEWAY_SUPERVISOR_PID"
# prometheus_client picks its multiprocess value class from this variable when it is imported.
PROMETHEUS_MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"

# A worker that lived this long was healthy: its death restarts it at once and resets the back-off.
HEALTHY_AFTER_S: Final = 10.0
FIRST_BACKOFF_S: Final = 0.5
MAX_BACKOFF_S: Final = 30.0
# Drain bound when the settings carry none (--drain-timeout arrives with issue #5), and the margin on top.
DEFAULT_DRAIN_TIMEOUT_S: Final = 30.0
STOP_MARGIN_S: Final = 5.0
_STOP_SIGNALS: Final = frozenset({signal.SIGTERM, signal.SIGINT})
_PR_SET_PDEATHSIG: Final = 1


def restart_delay_s(quick_deaths: int) -> float:
    """Seconds to wait before restarting a worker after this many deaths in a row, each too soon after start."""
    if quick_deaths <= 0:
        return 0.0
    return min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2.0 ** (quick_deaths - 1))


@dataclass(slots=True)
class Worker:
    """One slot of the pool: the process in it now, and how often it died young in a row."""

    slot: int
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    quick_deaths: int = 0
    restart_at: float | None = field(default=None)


def supervise(settings: Settings, argv: Sequence[str], environ: Mapping[str, str]) -> int:
    """Run settings.workers workers until SIGTERM or SIGINT; 0 once all drained, 1 if some had to be killed."""
    with _reserved_ports(settings) as (port, admin_port), _signal_pipe() as wakeup_fd:
        metrics_dir = tempfile.mkdtemp(prefix="mcp-gateway-metrics-")
        try:
            command = [sys.executable, "-m", "gateway", *argv, "--workers", "1", "--port", str(port),
                       "--admin-port", str(admin_port), "--metrics-multiproc-dir", metrics_dir]
            env = {**environ, SUPERVISOR_PID_ENV: str(os.getpid()), PROMETHEUS_MULTIPROC_ENV: metrics_dir}
            pool = [Worker(slot) for slot in range(settings.workers)]
            for worker in pool:
                _start(worker, command, env)
            log.info("supervisor_started", workers=len(pool), port=port, admin_port=admin_port,
                     metrics_multiproc_dir=metrics_dir)
            while True:
                signums = _wait_for_signals(wakeup_fd, _next_restart_in(pool))
                _reap(pool, metrics_dir, restart=True)
                if signums & _STOP_SIGNALS:
                    break
                if signal.SIGHUP in signums:
                    settings = _forward_reload(pool, settings, argv, environ)
                for worker in pool:
                    if worker.restart_at is not None and worker.restart_at <= time.monotonic():
                        _start(worker, command, env)
            drain_timeout_s = getattr(settings, "drain_timeout_s", DEFAULT_DRAIN_TIMEOUT_S)
            return _stop(pool, wakeup_fd, metrics_dir, drain_timeout_s + STOP_MARGIN_S)
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _forward_reload(pool: list[Worker], settings: Settings, argv: Sequence[str],
                    environ: Mapping[str, str]) -> Settings:
    """SIGHUP to every live worker; the supervisor itself only takes up a new --drain-timeout for its stop."""
    live = [worker.process for worker in pool if worker.process is not None]
    for process in live:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGHUP)
    log.info("supervisor_reload_forwarded", workers=len(live))
    try:
        return load_settings(argv, environ)
    except ConfigError:  # each worker logs why and keeps its configuration
        return settings


def _start(worker: Worker, command: list[str], env: dict[str, str]) -> None:
    worker.process = subprocess.Popen(command, env=env, preexec_fn=_die_with_parent)
    worker.started_at = time.monotonic()
    worker.restart_at = None
    log.info("worker_started", slot=worker.slot, pid=worker.process.pid)


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM (a drain) if the supervisor dies without stopping us.

    SIGHUP is ignored until the worker installs its reload handler: exec resets our handler to the
    default, which would kill a worker that a forwarded SIGHUP reaches while it starts.
    """
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _reap(pool: list[Worker], metrics_dir: str, *, restart: bool) -> None:
    now = time.monotonic()
    for worker in pool:
        if worker.process is None or worker.process.poll() is None:
            continue
        pid, returncode = worker.process.pid, worker.process.returncode
        worker.process = None
        _forget_worker(pid, metrics_dir)
        if not restart:
            log.info("worker_exited", slot=worker.slot, pid=pid, returncode=returncode)
            continue
        worker.quick_deaths = worker.quick_deaths + 1 if now - worker.started_at < HEALTHY_AFTER_S else 0
        delay_s = restart_delay_s(worker.quick_deaths)
        worker.restart_at = now + delay_s
        log.warning("worker_died", slot=worker.slot, pid=pid, returncode=returncode, restart_in_s=delay_s)


def _forget_worker(pid: int, metrics_dir: str) -> None:
    """Drop a dead worker's live gauges from the shared metrics; its counters and histograms stay summed."""
    mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]


def _next_restart_in(pool: list[Worker]) -> float | None:
    due = [worker.restart_at for worker in pool if worker.restart_at is not None]
    return max(0.0, min(due) - time.monotonic()) if due else None


def _stop(pool: list[Worker], wakeup_fd: int, metrics_dir: str, timeout_s: float) -> int:
    """Forward SIGTERM to every worker, wait for them to drain, then SIGKILL what is left."""
    live = [worker.process for worker in pool if worker.process is not None]
    log.info("supervisor_stopping", workers=len(live), timeout_s=timeout_s)
    for process in live:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while any(worker.process is not None for worker in pool) and time.monotonic() < deadline:
        _wait_for_signals(wakeup_fd, min(0.5, deadline - time.monotonic()))
        _reap(pool, metrics_dir, restart=False)
    killed = [worker for worker in pool if worker.process is not None]
    for worker in killed:
        assert worker.process is not None
        log.warning("worker_killed", slot=worker.slot, pid=worker.process.pid, after_s=timeout_s)
        worker.process.kill()
        worker.process.wait()
        _forget_worker(worker.process.pid, metrics_dir)
        worker.process = None
    log.info("supervisor_stopped", killed=len(killed))
    return 1 if killed else 0


@contextlib.contextmanager
def _signal_pipe() -> Iterator[int]:
    """Signals of interest written as bytes to a pipe, so one select() waits for signals and deadlines."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    watched = (*_STOP_SIGNALS, signal.SIGCHLD, signal.SIGHUP)
    previous = {signum: signal.signal(signum, lambda signum, frame: None) for signum in watched}
    try:
        yield read_fd
    finally:
        signal.set_wakeup_fd(previous_fd)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        os.close(read_fd)
        os.close(write_fd)


def _wait_for_signals(read_fd: int, timeout_s: float | None) -> set[int]:
    readable, _, _ = select.select([read_fd], [], [], timeout_s)
    if not readable:
        return set()
    with contextlib.suppress(BlockingIOError):
        return set(os.read(read_fd, 512))
    return set()


@contextlib.contextmanager
def _reserved_ports(settings: Settings) -> Iterator[tuple[int, int]]:
    """Bind (without listening) both ports with SO_REUSEPORT for the supervisor's lifetime.

    This fails at once with "address in use" if another program holds a port, turns port 0 into one
    concrete port every worker shares, and keeps the port ours while a worker restarts. A bound socket
    that does not listen receives no connections.
    """
    if settings.port == settings.admin_port and settings.port != 0:
        raise OSError(f"--port and --admin-port are both {settings.port}")
    held: list[socket.socket] = []
    try:
        port = _reserve(settings.host, settings.port, held)
        admin_port = _reserve(settings.host, settings.admin_port, held)
        yield port, admin_port
    finally:
        for sock in held:
            sock.close()


def _reserve(host: str, port: int, held: list[socket.socket]) -> int:
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    for family, kind, proto, _, address in sorted(set(infos)):
        sock = socket.socket(family, kind, proto)
        held.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:  # as asyncio's create_server does
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address[0], port, *address[2:]))
        port = sock.getsockname()[1]
    return port
