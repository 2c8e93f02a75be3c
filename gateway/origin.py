"""DNS-rebinding protection: the `Origin` a request carries must be allowed, and with --allow-host its
`Host` must be one of the gateway's names. Pure: headers in, OriginForbidden or HostForbidden out.

MCP transport spec 2025-11-25, Transports, Security Warning: servers MUST validate Origin on every
incoming connection and answer 403 when it is present and invalid. The gateway is the server its
callers see, and it rewrites Host to the target's, so an upstream cannot tell a rebound browser
page from a real call: the check has to be here. Requests without Origin (every SDK client, curl)
are not browsers' cross-origin calls, and pass.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from multidict import istr

from gateway.errors import HostForbidden, OriginForbidden

ORIGIN: Final = istr("Origin")
HOST: Final = istr("Host")

# What the MCP SDKs' own DNS-rebinding protection allows: loopback origins, on any port.
LOOPBACK_HOSTS: Final = frozenset({"localhost", "127.0.0.1", "[::1]"})
_DEFAULT_PORTS: Final = {"http": "80", "https": "443"}
# RFC 6454 §6.1: scheme "://" host [ ":" port ], lower case; no path, query or user info.
_HOST_PORT: Final = r"(\[[0-9a-f:.]+\]|[a-z0-9._-]+)(?::([0-9]{1,5}))?"
_ORIGIN: Final = re.compile(r"([a-z][a-z0-9+.-]*)://" + _HOST_PORT)
_HOST: Final = re.compile(_HOST_PORT)
_SHOWN_CHARS: Final = 200


def _origin_parts(raw: str) -> tuple[str, str, str | None] | None:
    """Scheme, host and port (None for the scheme's default) of an origin, lower-cased; None if not one."""
    match = _ORIGIN.fullmatch(raw.strip().lower())
    if match is None:
        return None
    scheme, host, port = match.groups()
    if port is not None and int(port) > 65535:
        return None
    port = None if port is None or int(port) == int(_DEFAULT_PORTS.get(scheme, "0")) else str(int(port))
    return scheme, host.rstrip("."), port


def _joined(parts: tuple[str, str, str | None]) -> str:
    scheme, host, port = parts
    return f"{scheme}://{host}" if port is None else f"{scheme}://{host}:{port}"


def canonical_origin(raw: str) -> str | None:
    """`scheme://host[:port]` lower-cased, its scheme's default port dropped; None if not an origin."""
    parts = _origin_parts(raw)
    return None if parts is None else _joined(parts)


def _host_and_port(raw: str) -> tuple[str, str | None] | None:
    match = _HOST.fullmatch(raw.strip().lower())
    if match is None:
        return None
    host, port = match.groups()
    return host.rstrip("."), None if port is None else str(int(port))


def parse_allowed_origin(raw: str) -> str:
    """An --allow-origin entry: `*` or an exact origin; ValueError otherwise (startup stops)."""
    if raw.strip() == "*":
        return "*"
    origin = canonical_origin(raw)
    if origin is None:
        raise ValueError("must be * or an origin: scheme://host[:port], no path")
    return origin


def parse_allowed_host(raw: str) -> str:
    """An --allow-host entry: `*`, a host name or address, with an optional :port."""
    if raw.strip() == "*":
        return "*"
    parsed = _host_and_port(raw)
    if parsed is None or not parsed[0]:
        raise ValueError("must be * or a host name or address with an optional :port")
    host, port = parsed
    return host if port is None else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class OriginPolicy:
    """Which Origin and Host values the data plane accepts.

    origins: exact origins allowed besides loopback ones; any_origin turns the Origin check off.
    hosts: names (any port) and name:port pairs; empty means any Host.
    """

    origins: frozenset[str] = frozenset()
    any_origin: bool = False
    hosts: frozenset[str] = frozenset()

    @classmethod
    def build(cls, allow_origin: tuple[str, ...], allow_host: tuple[str, ...]) -> OriginPolicy:
        entries = {parse_allowed_origin(raw) for raw in allow_origin}
        hosts = {parse_allowed_host(raw) for raw in allow_host}
        return cls(frozenset(entries - {"*"}), "*" in entries, frozenset() if "*" in hosts else frozenset(hosts))

    @property
    def checks_anything(self) -> bool:
        return not self.any_origin or bool(self.hosts)

    def check(self, headers: Mapping[str, str]) -> None:
        """Raise OriginForbidden or HostForbidden (403) unless the request may pass."""
        if not self.any_origin:
            origin = headers.get(ORIGIN)
            if origin is not None and not self.allows_origin(origin):
                raise OriginForbidden(
                    f"Origin {origin[:_SHOWN_CHARS]} is not allowed: only loopback origins and --allow-origin "
                    "are accepted (DNS-rebinding protection)")
        if self.hosts:
            host = headers.get(HOST)
            if host is None or not self.allows_host(host):
                shown = "(none)" if host is None else host[:_SHOWN_CHARS]
                raise HostForbidden(f"Host {shown} is not one of this gateway's names (--allow-host)")

    def allows_origin(self, raw: str) -> bool:
        parts = _origin_parts(raw)
        if parts is None:  # "null" (a sandboxed page, file://) and anything malformed
            return False
        scheme, host, _ = parts
        return (scheme in _DEFAULT_PORTS and host in LOOPBACK_HOSTS) or _joined(parts) in self.origins

    def allows_host(self, raw: str) -> bool:
        parsed = _host_and_port(raw)
        if parsed is None:
            return False
        host, port = parsed
        return host in self.hosts or (port is not None and f"{host}:{port}" in self.hosts)
