"""Settings: one frozen value built once at startup from flags, environment, a TOML file, defaults.

Precedence is flag > environment > config file > default (DESIGN.md §2). Pure: values in, values out.
"""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final

from yarl import URL

from gateway.engines import ENGINE_NAMES
from gateway.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the gateway reads from its configuration; nothing else reads configuration."""

    host: str = "0.0.0.0"
    port: int = 8081
    admin_port: int = 8082
    schedule_type: str = "k8s"
    arca_base_url: str | None = None
    arca_api_key: str | None = field(default=None, repr=False)
    arca_data_plane: str = "reject"
    connect_timeout_s: float = 5.0
    idle_timeout_s: float = 300.0
    upstream_client: str = "lean"
    config_path: str | None = None


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError("must be between 0 and 65535")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError("must be greater than 0")
    return value


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return raw

    return parse


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

    @property
    def flag(self) -> str:
        return "--" + self.name.removesuffix("_s").replace("_", "-")


OPTIONS: Final[tuple[Option, ...]] = (
    Option("host", "GATEWAY_HOST", str, "proxy listen address"),
    Option("port", "GATEWAY_PORT", _port, "proxy port"),
    Option("admin_port", "GATEWAY_ADMIN_PORT", _port, "admin port (/metrics, /healthz, /readyz)"),
    Option("schedule_type", "GATEWAY_SCHEDULE_TYPE", _choice(*ENGINE_NAMES), "engine: " + ", ".join(ENGINE_NAMES)),
    Option("arca_base_url", "ARCA_BASE_URL", _http_url, "arca gateway base URL (required under arca)"),
    Option("arca_api_key", "ARCA_API_KEY", str, "arca API key (required under arca; never logged)", secret=True),
    Option("arca_data_plane", "ARCA_DATA_PLANE", _choice("reject", "proxy"), "arca data plane: reject (501) or proxy"),
    Option("connect_timeout_s", "GATEWAY_CONNECT_TIMEOUT", _positive_float, "seconds to connect upstream (504 after)"),
    Option("idle_timeout_s", "GATEWAY_IDLE_TIMEOUT", _positive_float,
           "seconds without a byte from the upstream on a non-SSE response (504 before it starts)"),
    Option("upstream_client", "GATEWAY_UPSTREAM_CLIENT", _choice("lean", "aiohttp"),
           "upstream transport: lean (HTTP/1.1 on httptools, fast) or aiohttp (aiohttp's client)"),
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
    for option in OPTIONS:
        default = "unset" if option.secret else getattr(_DEFAULTS, option.name)
        env = f"env: {option.env}, " if option.env else ""
        parser.add_argument(option.flag, dest=option.name, metavar=option.name.upper(),
                            help=f"{option.help} ({env}default: {default})")
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
            values[option.name] = option.parse(str(raw))
        except ValueError as exc:
            shown = "<redacted>" if option.secret else repr(str(raw))
            raise ConfigError(f"{option.flag}: {shown} from {source} {_reason(exc)}") from exc
    return Settings(**values)


def _reason(exc: ValueError) -> str:
    text = str(exc)
    return text if text.startswith("must") else "is not valid"
