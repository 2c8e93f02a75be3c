"""The lean upstream transport: HTTP/1.1 on asyncio protocols with httptools, a keep-alive pool.

Implements upstream.UpstreamClient and nothing else: no redirects, cookies, decompression or proxies.
Profiling showed aiohttp's client was the cost of a proxied call: with this one the gateway spends ~40% less CPU
per request (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import resource
import socket
import ssl
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Final, cast

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser
from multidict import CIMultiDict, CIMultiDictProxy
from mypy_extensions import mypyc_attr
from yarl import URL

from gateway.errors import UNASKED_UPGRADE, BadUpstreamResponse, GatewayOverloaded
from gateway.pool import ERROR, SHUTDOWN, UPSTREAM_CLOSED, Pool, PoolKey, PoolStats
from gateway.retry import retry_refused
from gateway.upstream import Body, Sink

if TYPE_CHECKING:
    from gateway.config import Settings
    from gateway.policy import TargetPolicy

# host, port -> the addresses to try, in order. The SSRF policy plugs in here (#5).
Resolver = Callable[[str, int], Awaitable[list[str]]]

# Request bodies up to this size go out with the head in one write; larger ones stream.
SMALL_BODY_BYTES: Final = 64 * 1024
# Reading from the upstream pauses while this much body waits for a slow downstream.
BUFFER_HIGH_BYTES: Final = 256 * 1024
BUFFER_LOW_BYTES: Final = 64 * 1024
# aiohttp's client refuses fields over 64 KiB too; a whole head over 256 KiB is refused as well.
MAX_FIELD_BYTES: Final = 64 * 1024
MAX_HEAD_BYTES: Final = 256 * 1024
# Idle connections closed at once when a connect finds the process out of file descriptors.
SHED_ON_EMFILE: Final = 32
_OUT_OF_FDS: Final = frozenset({errno.EMFILE, errno.ENFILE})

_FRAMING: Final = frozenset({"host", "content-length", "transfer-encoding", "connection"})
# RFC 9110 §9.2.2: only these may be sent again when a reused connection turns out to be closed.
_IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_BODY_EXPECTED: Final = frozenset({"POST", "PUT", "PATCH"})
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_FOREVER: Final = float("inf")
# File descriptors never given to upstream connections: listening sockets, the admin port, logs, files.
FD_RESERVE: Final = 64


# Subclasses of builtin exceptions other than Exception stay Python classes when compiled (mypyc).
@mypyc_attr(native_class=False)
class _StaleConnection(ConnectionResetError):
    """A reused connection closed before the upstream sent a byte of the response."""


@mypyc_attr(native_class=False)
class _NothingWritten(_StaleConnection):
    """A reused connection was found closed before a byte of the request was written."""


class _PastTheEnd(Exception):
    """Raised from a parser callback to stop parsing: bytes follow a response that has ended."""


class UpstreamConnection(asyncio.Protocol):
    """One upstream TCP connection and the exchange in flight on it; httptools calls the on_* methods."""

    # connection_lost deletes the parser (mypyc compiles a `del` of an attribute listed here).
    __deletable__ = ("_parser",)

    def __init__(self, loop: asyncio.AbstractEventLoop, key: PoolKey, pool: Pool[UpstreamConnection]) -> None:
        self.key = key
        self.reused = False
        self.connected_ns = 0  # time.time_ns() once connected, for traces
        self.idle_since = 0.0
        self.idle_until = _FOREVER  # sooner when the upstream announces its own Keep-Alive timeout
        self.lost = False
        self.idle = False
        self._pool = pool
        self._loop = loop
        self._parser = HttpResponseParser(self)  # back at its start after each response; begin() replaces it after HEAD
        self._transport: asyncio.Transport | None = None
        self._write_waiter: asyncio.Future[None] | None = None
        self._reset_exchange(head_request=False)

    def _reset_exchange(self, head_request: bool) -> None:
        self._head_request = head_request
        self._head_waiter: asyncio.Future[None] | None = None
        self._body_waiter: asyncio.Future[None] | None = None
        self._status = 0
        self._reason = b""
        self._raw_headers: list[tuple[str, str]] = []
        self._head_bytes = 0
        self._headers_done = False
        self._length_delimited = False
        self._complete = False
        self._keep_alive = False
        self._got_bytes = False
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._reading_paused = False
        self._error: BaseException | None = None
        self._sink: Sink | None = None
        self._piped: list[bytes] = []
        self._overrun = False  # bytes arrived past the end of the response

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        self.connected_ns = time.time_ns()

    def data_received(self, data: bytes) -> None:
        if self.idle:  # nothing was asked: an upstream that talks now is broken
            self.lost = True
            self._pool.lost_while_idle(self)
            if self._transport is not None:
                self._transport.abort()
            return
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except (HttpParserError, HttpParserUpgrade) as exc:  # an upgrade only after a 101, refused on its head
            if self._complete and self._error is None:
                self._past_the_end()  # the response stands as it was; what followed it ends the connection
            elif self._headers_done:  # a body that broke off mid-way: cut for the caller, as a reset is
                self._fail(self._error or ConnectionResetError(f"upstream sent an invalid body: {exc}"))
            else:
                self._fail(self._error or BadUpstreamResponse(f"invalid HTTP response: {exc}"))
        if self._piped:
            self._deliver_piped()
        if (self._error is not None or self._overrun) and self._transport is not None:
            self._transport.abort()

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost tells the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.idle:  # the upstream closed it while it waited in the pool (uvicorn does after 5 s)
            self._pool.lost_while_idle(self)
        if not self._headers_done:
            if self.reused and not self._got_bytes:
                self._fail(_StaleConnection("upstream closed a kept-alive connection"))
            else:
                self._fail(ConnectionResetError("upstream closed the connection before responding"))
        elif not self._complete:
            if self._length_delimited or exc is not None:
                # A reset proves nothing about the end of a body that ends with the connection: cut it.
                self._fail(ConnectionResetError("upstream closed the connection mid-body"))
            else:  # RFC 9112 §6.3: no length and not chunked, the body ends when the connection does
                self._complete = True
                self._wake_body()
        self.resume_writing()  # a writer waiting for room finds the connection lost
        # The parser refers back to this connection: without the cycle, reference counting frees it.
        del self._parser
        self._sink = None

    def pause_writing(self) -> None:
        self._write_waiter = self._loop.create_future()

    def resume_writing(self) -> None:
        waiter, self._write_waiter = self._write_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self._complete:  # a response has ended: nothing that follows belongs to this exchange
            raise _PastTheEnd
        self._raw_headers = []  # a head's reason and fields come from that head alone (not a 1xx before it)
        self._reason = b""
        self._head_bytes = 0

    def on_status(self, status: bytes) -> None:
        self._reason += status
        self._count_head(len(status))

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) > MAX_FIELD_BYTES or len(value) > MAX_FIELD_BYTES:
            raise self._refuse("a response header field is over 64 KiB")
        self._count_head(len(name) + len(value))
        self._raw_headers.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status == 101:  # the gateway never forwards Upgrade: switching protocols was not asked for
            raise self._refuse(UNASKED_UPGRADE)
        if status < 200:  # 1xx (100 Continue, 103): interim, skipped; the answer follows
            return
        self._status = status
        self._headers_done = True
        names = {name.lower() for name, _ in self._raw_headers}
        self._length_delimited = "content-length" in names or "transfer-encoding" in names
        if "keep-alive" in names:
            self._keep_alive_header()
        if self._head_request:
            # llhttp does not know the request was HEAD and waits for a body; begin() replaces it.
            self._complete = True
            self._keep_alive = self._parser.should_keep_alive()
        self._wake(self._head_waiter)

    def on_body(self, body: bytes) -> None:
        if self._complete:  # a body after a HEAD response
            raise _PastTheEnd
        if self._sink is not None:
            self._piped.append(body)  # delivered once this read is parsed: one downstream write per read
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > BUFFER_HIGH_BYTES:
            self._pause_reading()
        self._wake_body()

    def on_message_complete(self) -> None:
        if not self._headers_done or self._complete:
            return  # the end of a 1xx, or of a body after HEAD
        self._complete = True
        self._keep_alive = self._parser.should_keep_alive()
        self._wake_body()

    # the exchange, driven by Http1Client and Http1Response

    def _keep_alive_header(self) -> None:
        """Keep-Alive: timeout=N (RFC 2068 §19.7.1): never reused within a second of the upstream's own close."""
        for name, value in self._raw_headers:
            if name.lower() == "keep-alive":
                for parameter in value.split(","):
                    key, _, number = parameter.partition("=")
                    if key.strip().lower() == "timeout" and number.strip().isdigit():
                        self.idle_until = time.monotonic() + max(0, int(number) - 1)

    def close_reason(self) -> str:
        """Why a connection that is not reusable is closed: the upstream's doing, or a failed exchange."""
        if self._complete and self._error is None and not self._overrun and not self._chunks:
            return UPSTREAM_CLOSED  # it closed, or answered Connection: close
        return ERROR

    def _past_the_end(self) -> None:
        """Bytes followed a complete response: the response stands, the connection is never reused."""
        self._overrun = True
        self._keep_alive = False

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            raise self._refuse("the response head is over 256 KiB")

    def _refuse(self, reason: str) -> BadUpstreamResponse:
        self._error = BadUpstreamResponse(reason)
        return self._error

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._wake(self._head_waiter)
        self._wake_body()

    def _wake_body(self) -> None:
        self._wake(self._body_waiter)

    @staticmethod
    def _wake(waiter: asyncio.Future[None] | None) -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def send(self, data: bytes | list[bytes]) -> None:
        transport = self._transport
        if transport is None or self.lost:
            if self.reused and self._chunks == [] and not self._got_bytes:
                raise _NothingWritten("upstream closed a kept-alive connection")
            raise ConnectionResetError("upstream closed the connection")
        if isinstance(data, bytes):
            transport.write(data)
        else:
            transport.writelines(data)
        if self._write_waiter is not None:
            await self._write_waiter
            if self.lost:
                raise ConnectionResetError("upstream closed the connection")

    async def response_head(self) -> None:
        if not self._headers_done and self._error is None:
            self._head_waiter = self._loop.create_future()
            await self._head_waiter
        if self._error is not None:
            raise self._error

    def response_headers(self) -> CIMultiDictProxy[str]:
        return CIMultiDictProxy(CIMultiDict(self._raw_headers))

    def response_reason(self) -> str:
        return self._reason.decode("utf-8", "surrogateescape")  # encoded back the same way: the bytes it was

    @property
    def status(self) -> int:
        return self._status

    async def read_chunk(self) -> bytes:
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            self._body_waiter = self._loop.create_future()
            await self._body_waiter
        chunks, self._chunks = self._chunks, []
        self._buffered = 0
        if self._reading_paused and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _pause_reading(self) -> None:
        if not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    def resume(self) -> None:
        if self._reading_paused and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()

    def pipe(self, sink: Sink | None) -> None:
        self._sink = sink
        if sink is None or not self._chunks:
            return
        self._piped, self._chunks = self._chunks, []
        self._buffered = 0
        self.resume()
        self._deliver_piped()

    def _deliver_piped(self) -> None:
        piped, self._piped = self._piped, []
        if self._sink is not None and not self._sink(piped[0] if len(piped) == 1 else b"".join(piped)):
            self._pause_reading()

    def arrived_body(self) -> bytes | None:
        if not self._complete or self._error is not None or self._reading_paused:
            return None
        chunks, self._chunks = self._chunks, []
        self._buffered = 0
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def reusable(self) -> bool:
        return (self._complete and self._keep_alive and self._error is None and not self._overrun
                and not self.lost and not self._chunks)

    def begin(self, head_request: bool) -> None:
        self.idle = False
        self.idle_until = _FOREVER
        if self._head_request:  # llhttp still waits for the body of the last (HEAD) response: start afresh
            self._parser = HttpResponseParser(self)
        self._reset_exchange(head_request)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class Http1Response:
    """One upstream response: status and headers known, the body pulled with read_chunk()."""

    __slots__ = ("_client", "_connection", "headers", "reason", "status")

    def __init__(self, client: Http1Client, connection: UpstreamConnection) -> None:
        self._client = client
        self._connection: UpstreamConnection | None = connection
        self.status = connection.status
        self.reason = connection.response_reason()
        self.headers = connection.response_headers()

    async def read_chunk(self) -> bytes:
        if self._connection is None:
            return b""
        return await self._connection.read_chunk()

    def arrived_body(self) -> bytes | None:
        if self._connection is None:
            return None
        return self._connection.arrived_body()

    def pipe(self, sink: Sink | None) -> bool:
        if self._connection is None:
            return False
        self._connection.pipe(sink)
        return True

    def resume(self) -> None:
        if self._connection is not None:
            self._connection.resume()

    def release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            self._client.give_back(connection)

    def connected_ns(self) -> int:
        connection = self._connection
        return -1 if connection is None else 0 if connection.reused else connection.connected_ns


async def resolve_with_getaddrinfo(host: str, port: int) -> list[str]:
    """The loop's getaddrinfo, skipped for IP literals."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return [host]
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class Http1Client:
    """The lean transport: pooled HTTP/1.1 keep-alive connections per (scheme, host, port), one budget for all."""

    def __init__(
        self,
        settings: Settings,
        resolve: Resolver = resolve_with_getaddrinfo,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._connect_timeout_s = settings.connect_timeout_s
        self._retry_budget_s = settings.connect_retry_budget_s
        self._resolve = resolve
        self._ssl_context = ssl_context
        max_connections = connection_budget(settings)
        self._pool: Pool[UpstreamConnection] = Pool(max_connections, settings.upstream_max_idle or max_connections,
                                                    settings.upstream_idle_timeout_s)
        self._closed = False

    @property
    def connections_opened(self) -> int:
        return self._pool.opened

    def stats(self) -> PoolStats:
        return self._pool.stats()

    async def request(self, method: str, url: URL, headers: Mapping[str, str], body: Body) -> Http1Response:
        host = url.raw_host or ""
        port = url.port or _DEFAULT_PORTS.get(url.scheme, 80)
        key = (url.scheme, host, port)
        head = _encode_head(method, url, host, port, headers, body)
        connection = self._pool.take(key)
        if connection is not None:
            connection.reused = True
            try:
                return await self._exchange(connection, method, head, body)
            except _StaleConnection as exc:
                # Go's net/http and aiohttp retry the same cases: never a streamed body, and a request
                # that may have reached the upstream only if its method is idempotent.
                replayable = body is None or isinstance(body, bytes)
                if not replayable or not (isinstance(exc, _NothingWritten) or method in _IDEMPOTENT):
                    raise ConnectionResetError("upstream closed a kept-alive connection") from None
        connection = await retry_refused(lambda: self._connect(key, url.host or host, port), self._retry_budget_s)
        return await self._exchange(connection, method, head, body)

    async def close(self) -> None:
        self._closed = True
        self._pool.close()

    def reconfigure(self, settings: Settings, policy: TargetPolicy | None) -> None:
        """A reload (reload.py): new connects use these timeouts; with a new target policy, no connection
        checked under the old one is used again."""
        self._connect_timeout_s = settings.connect_timeout_s
        self._retry_budget_s = settings.connect_retry_budget_s
        if policy is not None:
            self._resolve = policy.resolve_allowed
            self._pool.retire()

    def give_back(self, connection: UpstreamConnection) -> None:
        if self._closed:
            self._pool.give_back(connection, False, SHUTDOWN)
        elif connection.reusable():
            self._pool.give_back(connection, True)
        else:  # never reuse a connection whose response was not read to the end, or that said close
            self._pool.give_back(connection, False, connection.close_reason())

    async def _connect(self, key: PoolKey, host: str, port: int) -> UpstreamConnection:
        self._pool.reserve()  # GatewayOverloaded when the budget is full of busy connections
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                addresses = await self._resolve(host, port)
                if not addresses:
                    raise socket.gaierror(socket.EAI_NONAME, f"{host} has no address")
                error: OSError | None = None
                for address in addresses:
                    try:
                        connection = await self._open(key, host, address, port)
                    except OSError as exc:  # GatewayOverloaded (out of fds) is not one: it ends the loop
                        error = exc
                        continue
                    break
                else:
                    assert error is not None
                    raise error
        except BaseException:
            self._pool.unreserve()
            raise
        self._pool.opened_one(connection)
        return connection

    async def _open(self, key: PoolKey, host: str, address: str, port: int) -> UpstreamConnection:
        """One connect. Out of fds, idle connections are closed and it is tried once more; then it is
        the gateway's condition (503), not the upstream's."""
        loop = asyncio.get_running_loop()
        tls = self._tls_context() if key[0] == "https" else None
        for attempt in range(2):
            try:
                _, connection = await loop.create_connection(
                    lambda: UpstreamConnection(loop, key, self._pool), address, port,
                    ssl=tls, server_hostname=host if tls else None,
                )
                return connection
            except OSError as exc:
                if exc.errno not in _OUT_OF_FDS:
                    raise
            if attempt or not self._pool.shed(SHED_ON_EMFILE):
                break
            await asyncio.sleep(0)  # the closed connections' sockets are released on this loop pass
        raise GatewayOverloaded(f"the gateway is out of file descriptors ({os.strerror(errno.EMFILE)}); "
                                "see --upstream-max-connections")

    def _tls_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    async def _exchange(self, connection: UpstreamConnection, method: str, head: bytes, body: Body) -> Http1Response:
        connection.begin(head_request=method == "HEAD")
        try:
            if body is None:
                await connection.send(head)
            elif isinstance(body, bytes):
                await connection.send(head + body if len(body) <= SMALL_BODY_BYTES else [head, body])
            else:
                await connection.send(head)
                await _send_stream(connection, body, chunked=head.endswith(b"Transfer-Encoding: chunked\r\n\r\n"))
            await connection.response_head()
        except BaseException as exc:
            stale = isinstance(exc, _StaleConnection)
            self._pool.give_back(connection, False, UPSTREAM_CLOSED if stale else ERROR)
            raise
        return Http1Response(self, connection)


def connection_budget(settings: Settings) -> int:
    """--upstream-max-connections, or when not set half the fds left after a reserve (the rest for callers)."""
    if settings.upstream_max_connections:
        return settings.upstream_max_connections
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1_000_000
    return max(16, (soft - FD_RESERVE) // 2)


async def _send_stream(connection: UpstreamConnection, body: AsyncIterable[bytes], chunked: bool) -> None:
    async for chunk in body:
        if not chunk:
            continue
        await connection.send([b"%x\r\n" % len(chunk), chunk, b"\r\n"] if chunked else chunk)
    if chunked:
        await connection.send(b"0\r\n\r\n")


def _encode_head(method: str, url: URL, host: str, port: int, headers: Mapping[str, str], body: Body) -> bytes:
    """The request line and headers in one buffer; framing headers are ours to set, not the caller's."""
    host_header = None
    content_length = None
    lines = [f"{method} {url.raw_path_qs} HTTP/1.1\r\n"]
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in _FRAMING:
            if lowered == "host":
                host_header = value
            elif lowered == "content-length":
                content_length = value
            continue
        lines.append(f"{name}: {value}\r\n")
    if host_header is None:
        shown_host = f"[{host}]" if ":" in host else host
        host_header = shown_host if port == _DEFAULT_PORTS.get(url.scheme) else f"{shown_host}:{port}"
    lines.insert(1, f"Host: {host_header}\r\n")  # RFC 9112 §3.2: Host comes first
    if body is None:
        if method in _BODY_EXPECTED:
            lines.append("Content-Length: 0\r\n")
    elif isinstance(body, bytes):
        lines.append(f"Content-Length: {len(body)}\r\n")
    elif content_length is not None:
        lines.append(f"Content-Length: {int(content_length)}\r\n")  # canonical: no leading zeros
    else:
        lines.append("Transfer-Encoding: chunked\r\n")
    lines.append("\r\n")
    text = "".join(lines)
    # A CR or LF inside a name or value would split the head: each line must end where we ended it.
    if text.count("\n") != len(lines) or text.count("\r") != len(lines):
        raise ValueError("a request header contains CR or LF")
    return text.encode("utf-8", "surrogateescape")
