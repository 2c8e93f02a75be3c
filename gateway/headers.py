"""Header policy: what crosses the gateway in each direction, and what an engine adds.

Pure functions over multidicts; knows no engine names and does no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

from multidict import CIMultiDict, CIMultiDictProxy, istr

MCP_PROXY_URL: Final = istr("AEnvCore-MCPProxy-URL")
ENV_INSTANCE_ID: Final = istr("AEnvCore-EnvInstance-ID")
REQUEST_ID: Final = istr("X-Request-ID")
SANDBOX_API_KEY: Final = istr("x-agent-sandbox-api-key")
SANDBOX_ID: Final = istr("x-agent-sandbox-id")
CONNECTION: Final = istr("Connection")
CONTENT_TYPE: Final = istr("Content-Type")

# RFC 9110 §7.6.1: a proxy drops Connection, each field it names, and the fields known to be
# connection-specific. Proxy-Authenticate/-Authorization are single-hop by §11.7.1 and §11.7.2.
# Trailer is in the list because aiohttp neither reads nor writes trailers: announcing fields we
# never send would be a lie to the next hop.
HOP_BY_HOP: Final = frozenset({
    "connection", "proxy-connection", "keep-alive", "te", "trailer", "transfer-encoding",
    "upgrade", "proxy-authenticate", "proxy-authorization",
})

# Routing headers are for the gateway alone; Host is rewritten to the target's by the client.
_NOT_FORWARDED_UPSTREAM: Final = HOP_BY_HOP | {MCP_PROXY_URL.lower(), "host"}

# Headers whose values never reach a log line.
REDACTED: Final = frozenset({"authorization", "cookie", "set-cookie", SANDBOX_API_KEY.lower()})


def connection_nominated(headers: Mapping[str, str]) -> frozenset[str]:
    """The lower-cased field names listed in Connection (RFC 9110 §7.6.1)."""
    getall = getattr(headers, "getall", None)
    values = getall(CONNECTION, ()) if getall else [headers.get(CONNECTION, "")]
    if not values:
        return frozenset()
    return frozenset(
        name.strip().lower() for value in values for name in value.split(",") if name.strip()
    )


def _copy_without(headers: Mapping[str, str], dropped: frozenset[str]) -> CIMultiDict[str]:
    # Copying in C and deleting the few names present costs a third of filtering name by name.
    copied = CIMultiDict(headers)
    for name in dropped:
        if name in copied:
            del copied[name]
    return copied


def _with_nominated(dropped: frozenset[str], headers: Mapping[str, str]) -> frozenset[str]:
    """dropped, plus the fields Connection names; the precomputed set itself when there is none."""
    if isinstance(headers, CIMultiDict | CIMultiDictProxy) and CONNECTION not in headers:
        return dropped
    return dropped | connection_nominated(headers)


def without_hop_by_hop(headers: Mapping[str, str]) -> CIMultiDict[str]:
    """A copy of headers without hop-by-hop fields and those named in Connection."""
    return _copy_without(headers, _with_nominated(HOP_BY_HOP, headers))


def upstream_request_headers(
    downstream_headers: Mapping[str, str], added: Iterable[tuple[str, str]] = ()
) -> CIMultiDict[str]:
    """The headers to send upstream: the caller's, less hop-by-hop and routing, plus the engine's.

    An engine's headers replace any value the caller sent for the same name, in any letter case.
    """
    added = tuple(added)
    dropped = _with_nominated(_NOT_FORWARDED_UPSTREAM, downstream_headers)
    if added:
        dropped = dropped | {name.lower() for name, _ in added}
    upstream_headers = _copy_without(downstream_headers, dropped)
    upstream_headers.extend(added)
    return upstream_headers


def downstream_response_headers(upstream_headers: Mapping[str, str]) -> CIMultiDict[str]:
    """The headers to send back to the caller: everything the upstream said but hop-by-hop."""
    return without_hop_by_hop(upstream_headers)


def is_event_stream(content_type: str | None) -> bool:
    return content_type is not None and content_type.split(";", 1)[0].strip().lower() == "text/event-stream"


def redacted(headers: Mapping[str, str]) -> dict[str, str]:
    """Headers as a dict for a log line, secrets masked."""
    return {name: "<redacted>" if name.lower() in REDACTED else value for name, value in headers.items()}
