"""Settings: one frozen value built from flags, environment, a TOML file, defaults.

Precedence is flag > environment > config file > default (DESIGN.md §2). Built at startup, and again
on a reload from the same argv and environment (reload.py swaps the new value in). Pure apart from
reading the files it names: values in, values out.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final

from yarl import URL

from gateway.errors import ConfigError
from gateway.origin import parse_allowed_host, parse_allowed_origin
from gateway.rules import Rule

# What --schedule-type accepts. Named here, not read from engines.ENGINES, so that config imports no
# engine (the engines import Settings); that table has one entry for each (tests/test_config.py checks).
ENGINE_NAMES: Final = ("arca", "faas", "k8s", "standard")
# OTEL_TRACES_SAMPLER's values that the gateway honours (those of the SDK environment spec, less the
# remote ones); named here for --trace-sampler, used by tracing.py.
TRACE_SAMPLERS: Final = ("always_on", "always_off", "traceidratio",
                         "parentbased_always_on", "parentbased_always_off", "parentbased_traceidratio")


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the gateway reads from its configuration; nothing else reads configuration."""

    host: str = "0.0.0.0"
    port: int = 8081
    admin_port: int = 8082
    schedule_type: str = "k8s"
    arca_base_url: str | None = None
    arca_api_key: str | None = field(default=None, repr=False)
    arca_api_key_file: str | None = None
    arca_data_plane: str = "reject"
    connect_timeout_s: float = 5.0
    idle_timeout_s: float = 300.0
    workers: int = 1
    log_format: str = "auto"
    log_level: str = "info"
    log_bodies: int = 0
    metrics_multiproc_dir: str = ""
    target_allow: tuple[str, ...] = ()
    target_deny: tuple[str, ...] = ()
    allow_origin: tuple[str, ...] = ()
    allow_host: tuple[str, ...] = ()
    auth_token_file: str | None = None
    forward_authorization: bool = False
    max_body_size: int = 100 * 1024 * 1024
    max_header_size: int = 64 * 1024
    max_inflight_per_target: int = 0
    max_streams: int = 0
    sse_keepalive_s: float = 0.0
    connect_retry_budget_s: float = 2.0
    drain_timeout_s: float = 30.0
    upstream_client: str = "lean"
    upstream_max_connections: int = 0  # 0: from the fd limit (http1.connection_budget)
    upstream_max_idle: int = 0  # 0: as many as the budget
    upstream_idle_timeout_s: float = 4.0  # below uvicorn's 5 s, which FastMCP runs on (docs/scaling.md)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    watch_interval_s: float = 5.0
    # Over the OTEL_* variables they name; "" leaves the variable's say (tracing.py reads them).
    trace_exporter: str = ""
    trace_endpoint: str = ""
    trace_sampler: str = ""
    trace_sampler_arg: str = ""
    config_path: str | None = None


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError("must be between 0 and 65535")
    return value


def _number(kind: Callable[[str], float], *, above_zero: bool) -> Callable[[str], Any]:
    """A parser for an int or float that must be > 0 (above_zero) or >= 0; NaN is neither."""
    def parse(raw: str) -> float:
        value = kind(raw)
        if above_zero and not value > 0:
            raise ValueError("must be greater than 0")
        if not value >= 0:
            raise ValueError("must be 0 or more")
        return value

    return parse


_positive_int: Final = _number(int, above_zero=True)
_non_negative_int: Final = _number(int, above_zero=False)
_positive_float: Final = _number(float, above_zero=True)
_non_negative_float: Final = _number(float, above_zero=False)


def _workers(raw: str) -> int:
    """A count of worker processes, or "auto": one per CPU this process may run on."""
    if raw == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= 1024:
        raise ValueError("must be a whole number from 1 to 1024, or auto")
    return int(raw)





def _boolean(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError("must be true or false")
    return lowered in ("true", "1", "yes")


def _target_rule(raw: str) -> str:
    Rule.parse(raw)  # a bad rule stops startup; the policy parses the text again when it is built
    return raw.strip()


def read_tokens(path: str) -> tuple[str, ...]:
    """The non-empty, non-comment lines of an --auth-token-file; ValueError if none or unreadable."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"must be a readable UTF-8 file ({exc.__class__.__name__})") from exc
    tokens = tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not tokens:
        raise ValueError("must contain at least one token")
    return tokens


def _token_file(raw: str) -> str:
    read_tokens(raw)  # an unreadable or empty file stops startup; the app reads it again when built
    return raw


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return raw

    return parse


def _api_key(raw: str) -> str:
    if not raw or not all("!" <= char <= "~" for char in raw):
        raise ValueError("must be printable ASCII without spaces")
    return raw


def _ratio(raw: str) -> str:
    if not 0.0 <= float(raw) <= 1.0:
        raise ValueError("must be a ratio from 0 to 1")
    return raw


def _http_url(raw: str) -> str:
    url = URL(raw)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("must be an http:// or https:// URL with a host")
    return raw


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: its flag, its environment variable, how to parse it, what it means."""

    name: str
    env: str | None
    parse: Callable[[str], Any]
    help: str
    secret: bool = False
    repeat: bool = False  # a list: the flag repeats, env and TOML strings are comma-separated
    switch: bool = False  # a flag without a value (--forward-authorization); env/TOML take true/false

    @property
    def flag(self) -> str:
        return "--" + self.name.removesuffix("_s").replace("_", "-")


OPTIONS: Final[tuple[Option, ...]] = (
    Option("host", "GATEWAY_HOST", str, "proxy listen address"),
    Option("port", "GATEWAY_PORT", _port, "proxy port"),
    Option("admin_port", "GATEWAY_ADMIN_PORT", _port, "admin port (/metrics, /healthz, /readyz)"),
    Option("schedule_type", "GATEWAY_SCHEDULE_TYPE", _choice(*ENGINE_NAMES), "engine: " + ", ".join(ENGINE_NAMES)),
    Option("arca_base_url", "ARCA_BASE_URL", _http_url, "arca gateway base URL (required under arca)"),
    Option("arca_api_key", "ARCA_API_KEY", _api_key, "arca API key (required under arca; never logged)", secret=True),
    Option("arca_api_key_file", "ARCA_API_KEY_FILE", str, "file holding the arca API key, instead of --arca-api-key"),
    Option("arca_data_plane", "ARCA_DATA_PLANE", _choice("reject", "proxy"), "arca data plane: reject (501) or proxy"),
    Option("connect_timeout_s", "GATEWAY_CONNECT_TIMEOUT", _positive_float, "seconds to connect upstream (504 after)"),
    Option("idle_timeout_s", "GATEWAY_IDLE_TIMEOUT", _positive_float,
           "seconds without a byte from the upstream on a non-SSE response (504 before it starts)"),
    Option("workers", "GATEWAY_WORKERS", _workers,
           "worker processes sharing the ports (auto: one per CPU; above 1 a supervisor runs them)"),
    Option("log_format", "GATEWAY_LOG_FORMAT", _choice("auto", "json", "console"),
           "json lines, or console; auto: json unless stdout is a terminal"),
    Option("log_level", "GATEWAY_LOG_LEVEL", _choice("debug", "info", "warning", "error"), "lowest level logged"),
    Option("log_bodies", "GATEWAY_LOG_BODIES", _non_negative_int,
           "log the first N bytes of non-SSE bodies, secrets redacted (0: none)"),
    Option("metrics_multiproc_dir", "GATEWAY_METRICS_MULTIPROC_DIR", str,
           "directory shared by worker processes for aggregated /metrics (empty: one process)"),
    Option("target_allow", "GATEWAY_TARGET_ALLOW", _target_rule,
           "allowed targets: CIDR, address, host name or *.suffix, each with an optional :port; repeatable",
           repeat=True),
    Option("target_deny", "GATEWAY_TARGET_DENY", _target_rule,
           "denied targets, same forms as --target-allow, checked first; repeatable", repeat=True),
    Option("allow_origin", "GATEWAY_ALLOW_ORIGIN", parse_allowed_origin,
           "an Origin allowed besides loopback ones: scheme://host[:port], or * for any (403 otherwise); "
           "repeatable", repeat=True),
    Option("allow_host", "GATEWAY_ALLOW_HOST", parse_allowed_host,
           "a Host the proxy answers to, with an optional :port (403 otherwise); repeatable; none: any Host",
           repeat=True),
    Option("auth_token_file", "GATEWAY_AUTH_TOKEN_FILE", _token_file,
           "file of bearer tokens, one per line; when set the proxy port needs Authorization: Bearer"),
    Option("forward_authorization", "GATEWAY_FORWARD_AUTHORIZATION", _boolean,
           "forward the caller's Authorization header upstream even when --auth-token-file is set", switch=True),
    Option("max_body_size", "GATEWAY_MAX_BODY_SIZE", _positive_int, "largest request body in bytes (413 above)"),
    Option("max_header_size", "GATEWAY_MAX_HEADER_SIZE", _positive_int,
           "largest request header section in bytes (431 above)"),
    Option("max_inflight_per_target", "GATEWAY_MAX_INFLIGHT_PER_TARGET", _non_negative_int,
           "concurrent requests per target, 0 = unlimited (429 above)"),
    Option("max_streams", "GATEWAY_MAX_STREAMS", _non_negative_int,
           "open SSE streams in total, 0 = unlimited (503 above)"),
    Option("sse_keepalive_s", "GATEWAY_SSE_KEEPALIVE", _non_negative_float,
           "seconds of SSE silence before a ': keepalive' comment line, 0 = off"),
    Option("connect_retry_budget_s", "GATEWAY_CONNECT_RETRY_BUDGET", _non_negative_float,
           "seconds to keep retrying a refused upstream connection, 0 = no retry"),
    Option("drain_timeout_s", "GATEWAY_DRAIN_TIMEOUT", _non_negative_float,
           "seconds in-flight requests get to finish after SIGTERM/SIGINT"),
    Option("upstream_client", "GATEWAY_UPSTREAM_CLIENT", _choice("lean", "aiohttp"),
           "upstream transport: lean (HTTP/1.1 on httptools, pooled, fast) or aiohttp (aiohttp's client, "
           "a connection per request)"),
    Option("upstream_max_connections", "GATEWAY_UPSTREAM_MAX_CONNECTIONS", _non_negative_int,
           "upstream connections open at once across all targets, lean transport; 0 = half the fd limit "
           "less 64 (503 gateway_overloaded when all are busy)"),
    Option("upstream_max_idle", "GATEWAY_UPSTREAM_MAX_IDLE", _non_negative_int,
           "idle upstream connections kept, least recently used closed first; 0 = up to the budget"),
    Option("upstream_idle_timeout_s", "GATEWAY_UPSTREAM_IDLE_TIMEOUT", _positive_float,
           "seconds an idle upstream connection is kept (uvicorn closes its own after 5)"),
    Option("tls_cert", "GATEWAY_TLS_CERT", str,
           "PEM certificate chain: the proxy port speaks TLS (HTTP/1.1); needs --tls-key; re-read on reload"),
    Option("tls_key", "GATEWAY_TLS_KEY", str, "PEM private key of --tls-cert, unencrypted; re-read on reload"),
    Option("tls_client_ca", "GATEWAY_TLS_CLIENT_CA", str,
           "PEM CA certificates: clients must present a certificate they signed (mTLS); re-read on reload"),
    Option("watch_interval_s", "GATEWAY_WATCH_INTERVAL", _non_negative_float,
           "seconds between checks of the files the configuration reads (--config, token, key, TLS files); "
           "a change reloads, as SIGHUP does; 0 = off"),
    # The OTEL_* variables are read by tracing.py; these flags (and TOML keys) take precedence over them.
    Option("trace_exporter", None, _choice("otlp", "none"),
           "otlp: export a span per request over OTLP/HTTP (over OTEL_TRACES_EXPORTER; needs the otel extra)"),
    Option("trace_endpoint", None, _http_url,
           "OTLP/HTTP base URL; spans go to its /v1/traces (over OTEL_EXPORTER_OTLP_ENDPOINT)"),
    Option("trace_sampler", None, _choice(*TRACE_SAMPLERS), "which traces to keep (over OTEL_TRACES_SAMPLER)"),
    Option("trace_sampler_arg", None, _ratio,
           "the ratio of a traceidratio sampler, 0 to 1 (over OTEL_TRACES_SAMPLER_ARG)"),
)
_DEFAULTS: Final = Settings()
_FIELD_NAMES: Final = frozenset(f.name for f in fields(Settings))
assert all(option.name in _FIELD_NAMES for option in OPTIONS)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mcp-gateway", description="Reverse proxy for MCP traffic, routed by header.")
    parser.add_argument("--config", dest="config_path", metavar="PATH",
                        help="TOML file with the same settings (env: GATEWAY_CONFIG)")
    parser.add_argument("--version", action="store_true",
                        help="print the version and the form that runs (compiled or pure Python), then exit")
    parser.add_argument("--check-config", action="store_true",
                        help="check the configuration and the files it names, print one line, exit 0 or 2; "
                             "binds no port")
    for option in OPTIONS:
        default = "unset" if option.secret else getattr(_DEFAULTS, option.name)
        env = f"env: {option.env}, " if option.env else ""
        text = f"{option.help} ({env}default: {default})"
        if option.switch:
            parser.add_argument(option.flag, dest=option.name, action="store_const", const="true", help=text)
        else:
            parser.add_argument(option.flag, dest=option.name, metavar=option.name.upper(),
                                action="append" if option.repeat else "store", help=text)
    return parser


def _read_config_file(path: str) -> dict[str, Any]:
    try:
        with Path(path).open("rb") as file:
            table = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config: {path} is not valid TOML: {exc}") from exc
    known = {option.name for option in OPTIONS}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"--config: {path} has unknown setting(s) {', '.join(unknown)}")
    return table


def load_settings(argv: Sequence[str], environ: Mapping[str, str]) -> Settings:
    """Build the settings; raise ConfigError naming the setting on the first bad value."""
    flags = vars(build_parser().parse_args(list(argv)))
    flags.pop("check_config")  # actions of the program (cli.py), not settings
    flags.pop("version")
    config_path = flags.pop("config_path") or environ.get("GATEWAY_CONFIG") or None
    from_file = _read_config_file(config_path) if config_path else {}
    values: dict[str, Any] = {"config_path": config_path}
    for option in OPTIONS:
        if flags.get(option.name) is not None:
            raw, source = flags[option.name], option.flag
        elif option.env and environ.get(option.env):
            raw, source = environ[option.env], option.env
        elif option.name in from_file:
            raw, source = from_file[option.name], f"{option.name} in {config_path}"
        else:
            continue
        try:
            values[option.name] = _parse_list(option, raw) if option.repeat else option.parse(str(raw))
        except ValueError as exc:
            shown = "<redacted>" if option.secret else repr(raw if option.repeat else str(raw))
            raise ConfigError(f"{option.flag}: {shown} from {source} {_reason(exc)}") from exc
    if values.get("arca_api_key_file"):
        values["arca_api_key"] = _read_key_file(values["arca_api_key_file"], values.get("arca_api_key"))
    return Settings(**values)


def _read_key_file(path: str, key_given: str | None) -> str:
    """The key in the file, surrounding whitespace (a trailing newline) removed; never echoed back."""
    if key_given is not None:
        raise ConfigError(
            "--arca-api-key-file: a key is also given by --arca-api-key, ARCA_API_KEY or arca_api_key; keep one"
        )
    try:
        raw = Path(path).read_text(encoding="ascii").strip()
    except OSError as exc:
        raise ConfigError(f"--arca-api-key-file: cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--arca-api-key-file: {path} must hold printable ASCII without spaces") from exc
    try:
        return _api_key(raw)
    except ValueError as exc:
        problem = "is empty" if not raw else str(exc)
        raise ConfigError(f"--arca-api-key-file: {path} {problem}") from exc


def _parse_list(option: Option, raw: Any) -> tuple[Any, ...]:
    """A repeated flag gives a list; an environment or TOML string is comma-separated."""
    items = [raw] if isinstance(raw, str) else list(raw)
    return tuple(option.parse(part.strip()) for item in items for part in str(item).split(",") if part.strip())


def _reason(exc: ValueError) -> str:
    text = str(exc)
    return text if text.startswith("must") else "is not valid"
