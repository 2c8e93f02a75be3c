"""The configuration checked whole: the settings, and what is built from the files they name.

One code path for startup, `--check-config` and a reload: the settings are loaded, then the token
file, the arca key file and the TLS files are read, and the engine and the target policy built, all
without binding a port. The first problem raises ConfigError naming its setting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from gateway.config import Settings, load_settings, read_tokens
from gateway.engines import Engine, build_engine
from gateway.errors import ConfigError
from gateway.origin import OriginPolicy
from gateway.policy import TargetPolicy
from gateway.tls import build_server_context, tls_fingerprint

# Settings a running process cannot take up without binding, forking or rebuilding what it serves
# with: a reload reports a change to one as "needs a restart" and keeps the running value.
RESTART_ONLY: tuple[str, ...] = (
    "host", "port", "admin_port", "workers", "schedule_type", "upstream_client", "upstream_max_connections",
    "upstream_max_idle", "upstream_idle_timeout_s", "log_format", "metrics_multiproc_dir", "config_path",
    # the span exporter is built once, at startup (tracing.py)
    "trace_exporter", "trace_endpoint", "trace_sampler", "trace_sampler_arg",
)


@dataclass(frozen=True, slots=True)
class Configuration:
    """What the gateway runs with; `tokens` empty means no inbound authentication."""

    settings: Settings
    engine: Engine
    policy: TargetPolicy
    origins: OriginPolicy
    tokens: tuple[str, ...] = field(default=(), repr=False)
    tls: ssl.SSLContext | None = None
    tls_digest: bytes = b""

    @property
    def tokens_digest(self) -> bytes:
        return hashlib.sha256("\n".join(self.tokens).encode("utf-8", "surrogateescape")).digest()

    def watched_files(self) -> tuple[str, ...]:
        """The files this configuration was read from, which --watch-interval polls (reload.py)."""
        settings = self.settings
        paths = (settings.config_path, settings.auth_token_file, settings.arca_api_key_file,
                 settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        return tuple(path for path in paths if path)


def load_configuration(argv: Sequence[str], environ: Mapping[str, str]) -> Configuration:
    """Startup's and --check-config's: everything checked."""
    return build_configuration(load_settings(argv, environ))


def build_configuration(settings: Settings) -> Configuration:
    engine = build_engine(settings)
    policy = TargetPolicy.from_settings(settings)
    origins = OriginPolicy.build(settings.allow_origin, settings.allow_host)
    tokens: tuple[str, ...] = ()
    if settings.auth_token_file:
        try:
            tokens = read_tokens(settings.auth_token_file)
        except ValueError as exc:  # the file changed since load_settings read it
            raise ConfigError(f"--auth-token-file: {settings.auth_token_file} {exc}") from exc
    tls = build_server_context(settings)
    return Configuration(settings, engine, policy, origins, tokens, tls,
                         tls_fingerprint(settings) if tls is not None else b"")


def keep_running(wanted: Settings, running: Settings) -> tuple[Settings, list[str]]:
    """`wanted` with the restart-only settings as they run, and the names of those it would change."""
    names = [name for name in RESTART_ONLY if getattr(wanted, name) != getattr(running, name)]
    kept = {name: getattr(running, name) for name in RESTART_ONLY}
    if (wanted.tls_cert is None) != (running.tls_cert is None):
        # The port listens plain or with TLS since startup: turning it over needs a new listener.
        names.append("tls_cert")
        kept.update(tls_cert=running.tls_cert, tls_key=running.tls_key, tls_client_ca=running.tls_client_ca)
    return dataclasses.replace(wanted, **kept), names


def file_state(paths: Sequence[str]) -> tuple[tuple[int, int, int, int] | None, ...]:
    """Identity and change time of each file, symlinks followed: a Kubernetes Secret volume updates by
    swapping its ..data link, which changes the inode behind the same path."""
    state: list[tuple[int, int, int, int] | None] = []
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:
            state.append(None)
            continue
        state.append((stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size))
    return tuple(state)
