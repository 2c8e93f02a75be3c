"""The upstream transport: one small interface the proxy speaks, and its aiohttp implementation.

The proxy never touches a client library directly; a transport sends one request and hands back
the status, headers and a body to pull chunk by chunk. Failures are raised as builtin OSError,
TimeoutError or BadUpstreamResponse, which errors.UpstreamErrors maps to gateway errors.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterable, Callable, Mapping
from typing import TYPE_CHECKING, Final, Protocol

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from multidict import CIMultiDictProxy
from yarl import URL

from gateway.errors import UNASKED_UPGRADE, BadUpstreamResponse, GatewayError
from gateway.policy import TargetPolicy
from gateway.pool import PoolStats
from gateway.retry import retry_refused

if TYPE_CHECKING:
    from gateway.config import Settings

Body = bytes | AsyncIterable[bytes] | None
# Takes one body chunk; False when it cannot take more for now.
Sink = Callable[[bytes], bool]


class UpstreamResponse(Protocol):
    status: int
    reason: str
    headers: CIMultiDictProxy[str]

    async def read_chunk(self) -> bytes:
        """The next body bytes as they arrive; b"" at the end. Raises OSError if the body breaks."""

    def arrived_body(self) -> bytes | None:
        """The whole body if it arrived complete with the head (a small reply), else None."""

    def pipe(self, sink: Sink | None) -> bool:
        """Hand each body chunk to sink from the transport's own callback, as it arrives, instead of
        through read_chunk(), which then only waits for the end (b"") or raises. When sink returns
        False its side is full: reading pauses until resume(). pipe(None) stops it. False when the
        transport cannot (the caller pumps with read_chunk())."""

    def resume(self) -> None:
        """Read again after a sink said it was full."""

    def release(self) -> None:
        """Give the connection back to the pool, or close it if the body was not read to the end."""

    def connected_ns(self) -> int:
        """For traces: when the connection carrying this exchange was opened (time.time_ns()); 0 when it
        was taken from the pool, -1 when the transport cannot tell."""


class UpstreamClient(Protocol):
    """Sends one request. An exception raised by the body iterator (a GatewayError such as
    BodyTooLarge) comes out of request() unchanged, after the upstream connection was closed."""

    async def request(
        self, method: str, url: URL, headers: Mapping[str, str], body: Body
    ) -> UpstreamResponse: ...

    def stats(self) -> PoolStats | None:
        """The pool's counts for /metrics, or None if the transport keeps no pool of its own."""

    def reconfigure(self, settings: Settings, policy: TargetPolicy | None) -> None:
        """Take up a reload's timeouts and, unless None, its target policy (reload.py)."""

    async def close(self) -> None: ...


# aiohttp adds these to every client request unless told not to; a proxy must not invent them.
_AIOHTTP_AUTO_HEADERS: Final = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


class AiohttpResponse:
    __slots__ = ("_response", "headers", "reason", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.reason = response.reason or ""
        self.headers = response.headers

    async def read_chunk(self) -> bytes:
        try:
            return await self._response.content.readany()
        except aiohttp.ClientPayloadError as exc:
            raise ConnectionResetError(f"upstream body broke: {exc}") from exc

    def arrived_body(self) -> bytes | None:
        return None  # aiohttp's client is the compatibility path: its bodies are always pumped

    def pipe(self, sink: Sink | None) -> bool:
        return False

    def resume(self) -> None:
        pass

    def release(self) -> None:
        self._response.release()

    def connected_ns(self) -> int:
        return -1  # aiohttp's client does not say when it connected


class PolicyResolver(AbstractResolver):
    """aiohttp's DNS seam, answered by the target policy: only checked addresses reach connect()."""

    def __init__(self, policy: TargetPolicy) -> None:
        self.policy = policy  # replaced by a reload

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(hostname=host, host=address, port=port,
                          family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                          proto=0, flags=socket.AI_NUMERICHOST)
            for address in await self.policy.resolve_allowed(host, port)
        ]

    async def close(self) -> None:
        pass


class AiohttpClient:
    """The transport on aiohttp's client: an unlimited pool, no decompression, cookies or redirects.

    Every connection goes through the target policy: names via PolicyResolver, IP literals (which
    aiohttp never resolves) in request(). `socket_factory` lets a test see each connect attempt.
    """

    def __init__(self, settings: Settings, socket_factory: Callable[..., socket.socket] | None = None,
                 policy: TargetPolicy | None = None) -> None:
        self._policy = policy or TargetPolicy.from_settings(settings)
        self._resolver = PolicyResolver(self._policy)
        self._retry_budget_s = settings.connect_retry_budget_s
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout_s, sock_read=None)
        # force_close: aiohttp's parser keeps bytes an upstream sent past a response's end where the pool
        # cannot see them, and the next request on that connection would read them (issue #11). Without
        # keep-alive no exchange can reach another; the lean transport pools safely.
        self._connector = connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=0, force_close=True, ttl_dns_cache=10, resolver=self._resolver,
            socket_factory=socket_factory)
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=_AIOHTTP_AUTO_HEADERS,
            timeout=self._timeout,
            trust_env=False,
            max_field_size=65536,
        )

    async def request(self, method: str, url: URL, headers: Mapping[str, str], body: Body) -> AiohttpResponse:
        assert url.host is not None and url.port is not None  # engines only build URLs with both
        literal = self._policy.allowed_literal(url.host, url.port)
        if literal is not None and literal != url.host:  # 0x7f.1 or ::ffff:… : connect where it points
            url = url.with_host(literal)
        return await retry_refused(lambda: self._send(method, url, headers, body), self._retry_budget_s)

    async def _send(self, method: str, url: URL, headers: Mapping[str, str], body: Body) -> AiohttpResponse:
        try:
            response = await self._session.request(
                method, url, headers=headers, data=body, allow_redirects=False, timeout=self._timeout
            )
        except aiohttp.ClientConnectorError as exc:
            raise exc.os_error from exc
        except aiohttp.ServerDisconnectedError as exc:
            raise ConnectionResetError("upstream closed the connection before responding") from exc
        except aiohttp.ClientResponseError as exc:
            raise BadUpstreamResponse(exc.message) from exc
        except aiohttp.ClientOSError as exc:
            raise ConnectionResetError(str(exc)) from exc
        except TimeoutError:  # aiohttp's ConnectionTimeoutError is one; UpstreamErrors makes it a 504
            raise
        except aiohttp.ClientConnectionError as exc:
            if isinstance(exc.__cause__, GatewayError):  # our body iterator refused to go on
                raise exc.__cause__ from None
            raise ConnectionResetError(str(exc)) from exc
        if response.status == 101:  # the gateway never forwards Upgrade: nothing asked to switch protocols
            response.close()
            raise BadUpstreamResponse(UNASKED_UPGRADE)
        return AiohttpResponse(response)

    def stats(self) -> PoolStats | None:
        return None  # force_close: nothing pooled

    def reconfigure(self, settings: Settings, policy: TargetPolicy | None) -> None:
        self._retry_budget_s = settings.connect_retry_budget_s
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout_s, sock_read=None)
        if policy is not None:
            self._policy = self._resolver.policy = policy
            self._connector.clear_dns_cache()  # its addresses were checked under the old policy

    async def close(self) -> None:
        await self._session.close()
