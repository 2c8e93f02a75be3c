"""Reload: on SIGHUP, or when a file the configuration reads changes, run with a new configuration.

The new one is loaded and checked whole by startup's own path (configuration.py) with the argv and
environment the process started with; an invalid one is refused with one line naming the setting,
and the running one stays. A valid one is swapped in by replacing attributes of the long-lived
parts (app.DataPlane), so requests in flight and open streams keep what they started with and the
next request sees the new settings, at no cost per request. Restart-only settings (configuration.
RESTART_ONLY) keep their running values and are named in the log line.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Final

import structlog

from gateway.app import DataPlane, deadline_resolution_s
from gateway.config import Settings, load_settings
from gateway.configuration import Configuration, build_configuration, file_state, keep_running
from gateway.errors import ConfigError
from gateway.log import configure_logging
from gateway.metrics import OperationMetrics

log = structlog.get_logger(__name__)

# With --watch-interval 0 the watch still wakes this often, only to see whether a reload turned it on.
WATCH_OFF_RECHECK_S: Final = 5.0


def changed_names(running: Configuration, new: Configuration) -> list[str]:
    """What a reload changes, by name only: never a value (tokens, keys and certificates are secrets)."""
    names = [item.name for item in fields(Settings)
             if getattr(running.settings, item.name) != getattr(new.settings, item.name)]
    if running.tokens_digest != new.tokens_digest:
        names.append("auth_tokens")
    if running.tls_digest != new.tls_digest:
        names.append("tls_files")
    return names


def apply(parts: DataPlane, running: Configuration, new: Configuration) -> None:
    """Swap the new configuration into the running parts; nothing here can fail half-way (all was built)."""
    settings = new.settings
    parts.proxy.settings = settings  # timeouts and SSE keepalive of the next request
    parts.proxy.engine = new.engine  # the arca base URL and key
    parts.limits.update(settings)
    parts.server.max_head_bytes = settings.max_header_size
    parts.deadlines.resolution_s = deadline_resolution_s(settings)
    old = running.settings
    policy_changed = (settings.target_allow, settings.target_deny) != (old.target_allow, old.target_deny)
    if parts.proxy.upstream is not None:
        parts.proxy.upstream.reconfigure(settings, new.policy if policy_changed else None)
    if parts.tls is not None and new.tls is not None:
        parts.tls.use(new.tls)  # the next handshake's certificate, key and client CA
    if settings.log_level != old.log_level:
        configure_logging(settings.log_format, settings.log_level, cache=False)
    parts.serve_with(new)  # after the logging: the access log reads its configuration when built


class Reloader:
    """Holds the running configuration and replaces it; `watch()` polls the files it was read from."""

    def __init__(self, argv: Sequence[str], environ: Mapping[str, str], configuration: Configuration,
                 parts: DataPlane, metrics: OperationMetrics) -> None:
        self._argv = list(argv)
        self._environ = dict(environ)
        self.configuration = configuration
        self._parts = parts
        self._metrics = metrics
        self._files = configuration.watched_files()
        self._files_state = file_state(self._files)
        metrics.config_loaded_at.set(time.time())

    def reload(self, cause: str) -> bool:
        """Load, check, then apply; False (and the running configuration kept) if anything is wrong."""
        running = self.configuration
        try:
            wanted = load_settings(self._argv, self._environ)
            settings, restart = keep_running(wanted, running.settings)
            new = build_configuration(settings)
        except ConfigError as exc:
            self._files_state = file_state(self._files)  # a watch retries once the files change again
            self._metrics.config_reloads.labels("failed").inc()
            log.error("config_reload_failed", cause=cause, error=str(exc), kept="the running configuration")
            return False
        apply(self._parts, running, new)
        self.configuration = new
        self._files = new.watched_files()
        self._files_state = file_state(self._files)
        self._metrics.config_reloads.labels("ok").inc()
        self._metrics.config_loaded_at.set(time.time())
        fields_logged = {"cause": cause, "changed": changed_names(running, new), "needs_restart": restart,
                         "auth_tokens": len(new.tokens)}
        if restart:
            log.warning("config_reloaded", **fields_logged)
        else:
            log.info("config_reloaded", **fields_logged)
        return True

    def files_changed(self) -> bool:
        return file_state(self._files) != self._files_state

    async def watch(self) -> None:
        """Every --watch-interval seconds, reload if a watched file changed (Kubernetes Secret volumes)."""
        while True:
            interval_s = self.configuration.settings.watch_interval_s
            await asyncio.sleep(interval_s or WATCH_OFF_RECHECK_S)
            if interval_s and self.files_changed():
                try:
                    self.reload("file_changed")
                except Exception:  # a bug, logged with its traceback; the watch must outlive it
                    log.exception("config_reload_crashed", cause="file_changed")
