"""The arca engine: sandbox traffic goes to the Arca gateway by instance id, or is refused with 501.

--arca-data-plane picks the engine once at startup: ArcaRejectEngine (today's Arca images embed no
MCP server) or ArcaEngine, which forwards. Both ignore the caller's AEnvCore-MCPProxy-URL. Pure.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final
from urllib.parse import unquote

from mypy_extensions import mypyc_attr
from yarl import URL

from gateway.engines.base import Target
from gateway.engines.proxy_url import join_path
from gateway.errors import ConfigError, DataPlaneUnsupported, MalformedHeader, MalformedPath, MissingHeader
from gateway.headers import ENV_INSTANCE_ID, MCP_PROXY_URL, SANDBOX_API_KEY, SANDBOX_ID

if TYPE_CHECKING:
    from gateway.config import Settings

# Either header makes a request sandbox traffic: the SDK sends both, and a GET /health carrying
# only the proxy URL is the SDK probing its sandbox, not a load balancer probing us.
ROUTING_HEADERS: Final = (ENV_INSTANCE_ID, MCP_PROXY_URL)
SANDBOX_PATH: Final = "/arca/api/v1/sandbox"
# No "%" in the set: an id is used in the path verbatim, so nothing in it may decode to "/".
INSTANCE_ID: Final = re.compile(r"[A-Za-z0-9._-]{1,128}")

REJECT_MESSAGE: Final = (
    "the arca engine does not serve the data plane (MCP, /health, SSE): Arca sandboxes run no aenv MCP "
    "server. Use presign_url() to expose an in-sandbox port, and Environment(enable_data_plane=False) "
    "in the SDK so it does not call this gateway."
)


@mypyc_attr(native_class=False)  # a str subclass stays a Python class when compiled
class ApiKey(str):
    """The Arca API key: a str whose repr never shows it, so a logged Target or header list stays safe."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'<redacted>'"


@dataclass(frozen=True, slots=True)
class ArcaEngine:
    """Routes by instance id. The SDK's proxy URL is ignored on purpose under arca."""

    base_url: URL
    api_key: ApiKey = field(repr=False)  # keeps the key out of reprs and logs
    name: str = "arca"
    routing_headers: tuple[str, ...] = ROUTING_HEADERS

    @classmethod
    def from_settings(cls, settings: Settings) -> ArcaEngine | ArcaRejectEngine:
        """The engine --arca-data-plane names; both need a base URL and a key, so modes swap freely."""
        if not settings.arca_base_url:
            raise ConfigError("--schedule-type arca needs --arca-base-url (or ARCA_BASE_URL, or arca_base_url)")
        if not settings.arca_api_key:
            raise ConfigError(
                "--schedule-type arca needs an API key: --arca-api-key, ARCA_API_KEY or --arca-api-key-file"
            )
        base_url = parse_base_url(settings.arca_base_url)
        if settings.arca_data_plane == "reject":
            return ArcaRejectEngine()
        return cls(base_url=base_url, api_key=ApiKey(settings.arca_api_key))

    def resolve(self, headers: Mapping[str, str], raw_path_qs: str) -> Target:
        instance_id = parse_instance_id(headers)
        return Target(
            url=sandbox_url(self.base_url, instance_id, raw_path_qs),
            added_headers=((SANDBOX_API_KEY, self.api_key), (SANDBOX_ID, instance_id)),
        )


@dataclass(frozen=True, slots=True)
class ArcaRejectEngine:
    """Answers all sandbox traffic 501, forwarding nothing, as the reference gateway's final state does."""

    name: str = "arca"
    routing_headers: tuple[str, ...] = ROUTING_HEADERS

    def resolve(self, headers: Mapping[str, str], raw_path_qs: str) -> Target:
        raise DataPlaneUnsupported(REJECT_MESSAGE)


def parse_base_url(value: str) -> URL:
    """--arca-base-url, checked at startup: http(s), a host, no credentials, query or fragment."""
    try:
        url = URL(value)
        url.port  # noqa: B018  (yarl checks the port range lazily)
    except ValueError as exc:
        raise ConfigError(f"--arca-base-url: {value!r} is not a valid URL") from exc
    if url.scheme not in ("http", "https") or not url.raw_host:
        raise ConfigError(f"--arca-base-url: {value!r} must be an http:// or https:// URL with a host")
    if url.raw_user is not None or url.raw_password is not None:
        raise ConfigError("--arca-base-url must not carry credentials; the key goes in --arca-api-key")
    if url.raw_query_string or url.raw_fragment:
        raise ConfigError(f"--arca-base-url: {value!r} must not have a query or fragment")
    return url


def parse_instance_id(headers: Mapping[str, str]) -> str:
    """AEnvCore-EnvInstance-ID, sent once, matching INSTANCE_ID and not "." or ".."."""
    getall = getattr(headers, "getall", None)
    values = getall(ENV_INSTANCE_ID, []) if getall else [headers.get(ENV_INSTANCE_ID, "")]
    if len(values) > 1:
        raise MalformedHeader(ENV_INSTANCE_ID, "must be sent once")
    instance_id = values[0].strip() if values else ""
    if not instance_id:
        raise MissingHeader(ENV_INSTANCE_ID)
    if not INSTANCE_ID.fullmatch(instance_id) or instance_id in (".", ".."):
        raise MalformedHeader(ENV_INSTANCE_ID, 'must be 1 to 128 characters of A-Za-z0-9._- other than "." and ".."')
    return instance_id


def sandbox_url(base_url: URL, instance_id: str, raw_path_qs: str) -> URL:
    """{base}/arca/api/v1/sandbox/{id}/{path without leading slash}?{query}, the base's path kept.

    A path whose segments, decoded, include "." or ".." is refused: resolved by any hop after us it
    would leave the sandbox's prefix and reach other Arca APIs carrying our key.
    """
    sandbox_base = URL(f"{base_url.origin()}{base_url.raw_path.rstrip('/')}{SANDBOX_PATH}/{instance_id}", encoded=True)
    url = join_path(sandbox_base, raw_path_qs)
    if not set(unquote(url.raw_path).replace("\\", "/").split("/")).isdisjoint((".", "..")):
        raise MalformedPath('the path must not contain "." or ".." segments')
    return url
