"""k8s, standard and faas: the target is the URL the caller names in AEnvCore-MCPProxy-URL."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from yarl import URL

from gateway.engines.base import Target
from gateway.errors import MalformedHeader, MalformedPath, MissingHeader, authority
from gateway.headers import MCP_PROXY_URL

if TYPE_CHECKING:
    from gateway.config import Settings


@dataclass(frozen=True, slots=True)
class ProxyUrlEngine:
    """Forwards to scheme://host:port[/prefix] from the header; path and query pass byte for byte."""

    name: str
    routing_headers: tuple[str, ...] = (MCP_PROXY_URL,)

    @classmethod
    def from_settings(cls, settings: Settings) -> ProxyUrlEngine:
        return cls(name=settings.schedule_type)

    def resolve(self, headers: Mapping[str, str], raw_path_qs: str) -> Target:
        getall = getattr(headers, "getall", None)
        values = getall(MCP_PROXY_URL, ()) if getall else [headers.get(MCP_PROXY_URL, "")]
        value = values[0].strip() if values else ""
        if len(values) > 1 and any(other.strip() != value for other in values):
            raise MalformedHeader(MCP_PROXY_URL, "is sent more than once with different values: name one target")
        if not value:
            raise MissingHeader(MCP_PROXY_URL)
        if len(raw_path_qs) > CACHED_PATH_CHARS:
            return _target(parse_proxy_url(value), raw_path_qs)
        return _cached_target(value, raw_path_qs)


# Callers name the same targets again and again: each header value is parsed and checked once (a
# refused one raises every time: exceptions are not cached). Sized for a fleet: past it, every request
# to a target parses its URL again (about 1 µs: 0.5 to parse, 0.5 for its origin and prefix).
TARGETS_CACHED: Final = 16384


# The Target of a header value and a request path, too: callers send the same calls (POST /mcp) to the
# same target, and building it costs as much again. Paths past this length are never kept, so the
# cache holds at most TARGETS_CACHED entries of a few hundred bytes.
CACHED_PATH_CHARS: Final = 256


@functools.lru_cache(maxsize=TARGETS_CACHED)
def _cached_target(value: str, raw_path_qs: str) -> Target:
    return _target(parse_proxy_url(value), raw_path_qs)


def _target(base: URL, raw_path_qs: str) -> Target:
    url = join_path(base, raw_path_qs)
    return Target(url=url, authority=authority(url))


@functools.lru_cache(maxsize=TARGETS_CACHED)
def parse_proxy_url(value: str) -> URL:
    """The header's URL, checked: http(s), a host, a valid port, no credentials."""
    try:
        url = URL(value)
        port = url.port
    except (ValueError, TypeError) as exc:
        raise MalformedHeader(MCP_PROXY_URL, f"is not a valid URL: {exc}") from exc
    if url.scheme not in ("http", "https"):
        raise MalformedHeader(MCP_PROXY_URL, "must be an http:// or https:// URL, like http://10.1.2.3:8081")
    if not url.raw_host:
        raise MalformedHeader(MCP_PROXY_URL, "must name a host, like http://10.1.2.3:8081")
    if not port:
        raise MalformedHeader(MCP_PROXY_URL, "must have a port between 1 and 65535")
    if url.raw_user is not None or url.raw_password is not None:
        raise MalformedHeader(MCP_PROXY_URL, "must not carry credentials; send them in a header")
    return url


def join_path(base: URL, raw_path_qs: str) -> URL:
    """base's origin and path prefix, then the downstream path and query exactly as received.

    A query on the base URL comes first, as Go's httputil.ReverseProxy merges them.
    """
    if not raw_path_qs.startswith("/"):  # absolute-form request target (RFC 9112 §3.2.2)
        try:
            raw_path_qs = URL(raw_path_qs).raw_path_qs if "://" in raw_path_qs else "/"
        except ValueError as exc:
            raise MalformedPath(f"the request target is not a valid absolute URL: {exc}") from None
    path, sep, query = raw_path_qs.partition("?")
    prefix, base_query = _origin_and_prefix(base)
    if base_query:
        query = f"{base_query}&{query}" if sep else base_query
        sep = "?"
    return URL(f"{prefix}{path}{sep}{query}", encoded=True)


@functools.lru_cache(maxsize=TARGETS_CACHED)
def _origin_and_prefix(base: URL) -> tuple[str, str]:
    """scheme://host:port and the path prefix without its trailing slash; the base's raw query."""
    return f"{base.origin()}{base.raw_path.rstrip('/')}", base.raw_query_string
