"""The messages the data plane speaks: a request as it arrives, a reply whole or streamed.

Every handler-side module (dataplane, proxy, sse, log, limits, auth, origin) speaks these and never
the HTTP/1.1 server: only app wires the server (gateway/server.py), and the server stays the one place
that touches the client socket. A message reaches its socket through `Connection`, the few things it
needs from the connection that carries it; the server's ClientConnection is the one implementation.
Each call is a plain method or attribute on that object, as when both lived in one module: the
Protocol only types it, and costs nothing per request.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, Final, Protocol
from urllib.parse import unquote

from multidict import CIMultiDict, CIMultiDictProxy, istr

from gateway.errors import GatewayError
from gateway.headers import CONTENT_TYPE

CONTENT_LENGTH: Final = istr("Content-Length")
TRANSFER_ENCODING: Final = istr("Transfer-Encoding")
_EXPECT: Final = istr("Expect")
# RFC 9110 §6.4.1: these responses carry no body, whatever their headers say.
NO_BODY_STATUSES: Final = frozenset({204, 304})

Handler = Callable[["Request"], Awaitable["Response | StreamResponse"]]


class Connection(Protocol):
    """What a message needs from the client connection that carries it (server.ClientConnection)."""

    loop: asyncio.AbstractEventLoop
    keep_alive: bool  # of the response being written; a reply or the client can end it
    drained: Callable[[], None] | None  # called when writes may go on after write_nowait said False

    def encode_head(self, request: Request, status: int, reason: str | None, headers: CIMultiDict[str]) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    def write_nowait(self, data: bytes) -> bool: ...

    def send_continue(self) -> None: ...

    def body_taken(self) -> None: ...

    def abort(self) -> None: ...


class RequestBody:
    """A request body as it arrives: taken whole (read, arrived) or chunk by chunk (chunks)."""

    __slots__ = ("_buffered", "_chunks", "_connection", "_error", "_waiter", "complete", "total_bytes")

    def __init__(self, connection: Connection | None) -> None:
        self._connection = connection
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self.complete = connection is None
        self.total_bytes = 0

    def arrived(self) -> bytes:
        """What has arrived so far, taken from the buffer: the whole body once `complete`."""
        chunks, self._chunks = self._chunks, []
        self._taken()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def read(self) -> bytes:
        parts = []
        async for chunk in self.chunks():
            parts.append(chunk)
        return b"".join(parts)

    def chunks(self) -> AsyncIterator[bytes]:
        """Each batch of body bytes as it arrives; raises ConnectionResetError if the client leaves mid-body,
        BadRequest if what it sends is not a valid body."""
        return self  # an iterator object, not an async generator: mypyc compiles those (docs/performance.md)

    def __aiter__(self) -> RequestBody:
        return self

    async def __anext__(self) -> bytes:
        while True:
            if self._chunks:
                return self.arrived()
            if self._error is not None:
                raise self._error
            if self.complete:
                raise StopAsyncIteration
            assert self._connection is not None
            self._waiter = self._connection.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _taken(self) -> None:
        self._buffered = 0
        if self._connection is not None:
            self._connection.body_taken()

    # The server's side: its connection feeds what the parser reads. No handler calls these.

    def feed(self, chunk: bytes) -> int:
        """Buffer a chunk; what is buffered now, for the server to pause reading past its limit."""
        self._chunks.append(chunk)
        self.total_bytes += len(chunk)
        self._buffered += len(chunk)
        self._wake()
        return self._buffered

    def end(self) -> None:
        self.complete = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        if not self.complete:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


_EMPTY_BODY: Final = RequestBody(None)


class Request:
    """One request's head and body. `refusal` is set when the parser refused it: the handler answers that."""

    __slots__ = (
        "_path",
        "connection",
        "content",
        "content_length",
        "header_bytes",
        "headers",
        "keep_alive",
        "method",
        "raw_path",
        "refusal",
        "version",
    )

    def __init__(self, connection: Connection, method: str, raw_path: str, version: str,
                 headers: CIMultiDictProxy[str], header_bytes: int, keep_alive: bool) -> None:
        self.connection = connection
        self.method = method
        self.raw_path = raw_path  # the request target as sent: path and query, percent-encoding kept
        self.version = version
        self.headers = headers
        self.header_bytes = header_bytes  # every header line as "name: value\r\n"
        self.keep_alive = keep_alive
        self.content_length: int | None = None
        self.content = _EMPTY_BODY
        self.refusal: GatewayError | None = None
        self._path: str | None = None

    @property
    def path(self) -> str:
        """The path without the query, percent-decoded (for routing /health and log lines)."""
        path = self._path
        if path is None:
            path = self.raw_path.partition("?")[0]
            if not path.startswith("/") and "://" in path:  # absolute-form (RFC 9112 §3.2.2): the URL's path
                path = "/" + path.partition("://")[2].partition("/")[2]
            if "%" in path:
                path = unquote(path)
            self._path = path
        return path

    @property
    def body_exists(self) -> bool:
        return self.content is not _EMPTY_BODY

    def expects_continue(self) -> bool:
        return self.version == "1.1" and self.headers.get(_EXPECT, "").lower() == "100-continue"


class Response:
    """A complete reply: its head and body leave in one write."""

    __slots__ = ("body", "headers", "prepared", "reason", "status")

    def __init__(self, body: bytes = b"", status: int = 200, reason: str | None = None,
                 headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None) -> None:
        self.body = body
        self.status = status
        self.reason = reason
        self.headers = headers if isinstance(headers, CIMultiDict) else CIMultiDict(headers or ())
        self.prepared = False


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    response = Response(json.dumps(data).encode(), status, headers=headers)
    response.headers[CONTENT_TYPE] = "application/json; charset=utf-8"
    return response


class StreamResponse:
    """A reply written as it goes: prepare(), write()..., write_eof().

    send_head_now=False keeps the status line and headers until the first body bytes, so that a
    short reply costs one send(); an event stream sends its head at once.
    """

    __slots__ = ("_chunked", "_connection", "_ended", "_head", "_no_body", "headers", "prepared", "reason",
                 "send_head_now", "status")

    def __init__(self, status: int = 200, reason: str | None = None, headers: Mapping[str, str] | None = None,
                 send_head_now: bool = True) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers if isinstance(headers, CIMultiDict) else CIMultiDict(headers or ())
        self.send_head_now = send_head_now
        self.prepared = False
        self._connection: Connection | None = None
        self._head: bytes | None = None  # held until the first body bytes (send_head_now=False)
        self._chunked = False
        self._no_body = False
        self._ended = False

    async def prepare(self, request: Request) -> None:
        connection = self._connection = request.connection
        headers = self.headers
        self._no_body = request.method == "HEAD" or self.status in NO_BODY_STATUSES or self.status < 200
        if not self._no_body and CONTENT_LENGTH not in headers:
            if request.version == "1.1":
                headers[TRANSFER_ENCODING] = "chunked"
                self._chunked = True
            else:
                connection.keep_alive = False  # HTTP/1.0: the body ends when the connection does
        head = connection.encode_head(request, self.status, self.reason, headers)
        self.prepared = True
        if self.send_head_now:
            await connection.write(head)
        else:
            self._head = head

    async def write(self, data: bytes) -> None:
        connection = self._connection
        assert connection is not None, "prepare() first"
        if self._no_body or not data:
            return
        if self._chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        if self._head is not None:
            data, self._head = self._head + data, None
        await connection.write(data)

    def write_nowait(self, data: bytes) -> bool:
        """write() from a transport callback: no waiting. False while the client is slow to read:
        stop, and go on when the `drained` callback (set with when_drained) is called."""
        connection = self._connection
        assert connection is not None, "prepare() first"
        if self._no_body or not data:
            return True
        if self._chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        if self._head is not None:
            data, self._head = self._head + data, None
        return connection.write_nowait(data)

    def when_drained(self, drained: Callable[[], None] | None) -> None:
        assert self._connection is not None, "prepare() first"
        self._connection.drained = drained

    async def write_eof(self) -> None:
        connection = self._connection
        if self._ended or connection is None:
            return
        self._ended = True
        tail = b"0\r\n\r\n" if self._chunked and not self._no_body else b""
        if self._head is not None:
            tail, self._head = self._head + tail, None
        if tail:
            await connection.write(tail)
