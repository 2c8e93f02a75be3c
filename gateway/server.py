"""The data plane's HTTP/1.1 server: httptools' request parser on asyncio protocols.

aiohttp's server spent about 35 µs of CPU per proxied call more than a lean one (docs/performance.md),
so the data plane is served here; the admin port stays on aiohttp. It does what a reverse proxy's
front needs and nothing more:

- keep-alive, and pipelined requests answered one after another, in order;
- request bodies by Content-Length or chunked, handed over as they arrive, with reading paused
  while a body waits for a slow upstream;
- responses written whole (Response) or streamed (StreamResponse): chunked for HTTP/1.1 when the
  length is unknown, close-delimited for HTTP/1.0, never a body for HEAD, 1xx, 204 and 304;
  writes wait while the client is slow to read;
- the handler's task is cancelled when the client goes away;
- a request the parser refuses (malformed, a head over the limit) still reaches the handler, as a
  Request whose `refusal` is set, so that it is answered, logged and counted like any other;
- the drain: pre_shutdown() closes idle connections, shutdown() waits for handlers, then cancels.

The messages (Request, Response, StreamResponse) live in gateway/messages.py, which the handlers
import; this module is the one place that touches a client's socket, and only app imports it.

Serves as aiohttp's web.Server does under a BaseRunner (app.DataPlaneRunner): a protocol factory
with pre_shutdown() and shutdown().
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from http import HTTPStatus
from typing import Final, cast

import structlog
from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser
from multidict import CIMultiDict, CIMultiDictProxy, istr

from gateway.errors import BadRequest, GatewayError, HeadersTooLarge, UnsupportedRequest, VersionNotSupported
from gateway.messages import (
    CONTENT_LENGTH,
    NO_BODY_STATUSES,
    TRANSFER_ENCODING,
    Handler,
    Request,
    RequestBody,
    Response,
    StreamResponse,
    json_response,
)

log = structlog.get_logger(__name__)

# A request body is read ahead up to this much while the handler has not taken it; then reading pauses.
BODY_HIGH_BYTES: Final = 256 * 1024
# Pipelined requests waiting for their turn beyond this pause reading.
MAX_PIPELINED: Final = 16
# A head is refused outright (431) past the --max-header-size check plus this margin, before it is parsed whole.
HEAD_MARGIN_BYTES: Final = 64 * 1024
# A connection with no request in flight is closed after this long (aiohttp's keepalive_timeout); a
# head that takes longer to arrive is cut too. Server(idle_timeout_s=) sets another.
IDLE_TIMEOUT_S: Final = 75.0
# After a reply to a request that was not read whole (a refusal, a body left unread), what the client
# still sends is dropped for up to this long before the connection closes (_linger_close).
LINGER_S: Final = 10.0

DATE: Final = istr("Date")
_HOST: Final = istr("Host")
_REASONS: Final = {status.value: status.phrase for status in HTTPStatus}
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


class ClientConnection(asyncio.Protocol):
    """One client connection; httptools calls the on_* methods while data_received feeds it.

    It is the messages' Connection (gateway/messages.py): requests carry it, replies write through it.
    """

    # connection_lost deletes the parser (mypyc compiles a `del` of an attribute listed here).
    __deletable__ = ("_parser",)

    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = server.loop
        self.keep_alive = True  # of the response being written; a reply or the client can end it
        self.drained: Callable[[], None] | None = None  # called when writes may go on (write_nowait)
        self._parser = HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._lost = False
        self._input_closed = False  # after a refusal: what follows is not read
        self._closing = False  # the server drains: close once the current response is done
        self._task: asyncio.Task[None] | None = None  # serving the current request, then the pipelined ones
        self._pending: deque[Request] = deque()
        self._write_waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._linger: asyncio.TimerHandle | None = None
        self._lost_waiter: asyncio.Future[None] | None = None  # the drain waits on it for a close to finish
        self._wrote = False  # of the current response: whether any byte went out
        self.idle_since = self.loop.time()
        # the request being parsed
        self._in_head = False  # inside a request's head, from its first byte to its blank line
        self._raw_head_bytes = 0
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._header_bytes = 0
        self._body: RequestBody | None = None
        # the framing of an Upgrade request's body, which llhttp skips (see data_received)
        self._upgrade_framing: bytes | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        self.server.connected(self)

    def data_received(self, data: bytes) -> None:
        if self._input_closed:
            return
        in_head = self._in_head
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade as upgrade:
            if self._input_closed:  # a CONNECT, refused: what follows is the tunnel's, never parsed
                return
            # An Upgrade (h2c, websocket) we do not take up: the request is answered as any other, and
            # what follows it is HTTP/1.1 again (RFC 9110 §7.8: the server may ignore Upgrade).
            self._parser = HttpRequestParser(self)
            if self._upgrade_framing is not None:
                # llhttp stopped at the end of the head, leaving the body unparsed: a parser primed with
                # a head of the same framing reads it into the request's body (on_headers_complete).
                self._parser.feed_data(b"POST / HTTP/1.1\r\n%b\r\n\r\n" % self._upgrade_framing)
            offset = upgrade.args[0] if upgrade.args and isinstance(upgrade.args[0], int) else len(data)
            if offset < len(data):
                self.data_received(data[offset:])
        except HttpParserError as exc:
            message = f"malformed HTTP request: {_parser_message(exc)}"
            if self._body is not None:  # a broken chunked body: its request is already being answered
                self._body.fail(BadRequest(message))  # the caller's fault (400), not an OSError (502)
                self._body = None
            self._refuse(BadRequest(message))
            return
        if in_head and self._in_head:  # all of it inside one head, which httptools holds until it ends
            self._raw_head_bytes += len(data)
            if self._raw_head_bytes > self.server.max_head_bytes + HEAD_MARGIN_BYTES:
                self._refuse(HeadersTooLarge(f"request headers exceed --max-header-size {self.server.max_head_bytes}"))

    def eof_received(self) -> bool:
        return False  # the client is gone: close, and connection_lost cancels what it asked for

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._input_closed = True
        self._transport = None
        self.server.connections.discard(self)
        if self._linger is not None:
            self._linger.cancel()
        if self._body is not None:
            self._body.fail(ConnectionResetError("the client closed the connection mid-body"))
        # Break the reference cycles through this connection (its parser's callbacks, the body
        # being read, the task serving it), so that reference counting frees it at once: the
        # garbage collector runs seldom (cli.settle_garbage_collector) and would free it late.
        del self._parser
        self._body = None
        self._pending.clear()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        self.resume_writing()
        if self._lost_waiter is not None and not self._lost_waiter.done():
            self._lost_waiter.set_result(None)

    def pause_writing(self) -> None:
        self._write_waiter = self.loop.create_future()

    def resume_writing(self) -> None:
        waiter, self._write_waiter = self._write_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.drained is not None and not self._lost:
            self.drained()

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._in_head = True
        self._raw_head_bytes = 0
        self._url = b""
        self._headers = []
        self._header_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        self._headers.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        if self._input_closed:  # a request parsed after the connection was told to close
            return
        parser = self._parser
        self._in_head = False
        self._raw_head_bytes = 0
        if self._upgrade_framing is not None:  # the stand-in head fed after an Upgrade (data_received):
            self._upgrade_framing = None  # what follows is the Upgrade request's body, still self._body
            return
        headers = CIMultiDictProxy(CIMultiDict(self._headers))
        length = headers.get(CONTENT_LENGTH)
        content_length = None
        if length is not None:
            content_length = int(length)  # llhttp took digits only
            if length[0] == "0" and len(length) > 1:  # leading zeros: the upstream gets the length in one form
                headers = _canonical_length(headers, content_length)
        request = Request(self, parser.get_method().decode("ascii"), self._url.decode("utf-8", "surrogateescape"),
                          parser.get_http_version(), headers, self._header_bytes, parser.should_keep_alive())
        request.content_length = content_length
        chunked = TRANSFER_ENCODING in headers
        if request.content_length or chunked:
            request.content = self._body = RequestBody(self)
            if parser.should_upgrade():  # llhttp will skip this body: data_received reads it
                self._upgrade_framing = (b"Transfer-Encoding: chunked" if request.content_length is None
                                         else b"Content-Length: %d" % request.content_length)
        refusal = _refused_form(request)
        if refusal is not None:
            request.refusal = refusal
            self._input_closed = True  # a CONNECT's tunnel bytes, or anything after a request we cannot trust
        elif chunked and request.version == "1.0":
            request.keep_alive = False  # RFC 9112 §6.1: the framing may be faulty, close after the reply
        self._start(request)

    def on_body(self, body: bytes) -> None:
        current = self._body
        if current is not None and current.feed(body) > BODY_HIGH_BYTES:
            self._pause_reading()

    def on_message_complete(self) -> None:
        if self._upgrade_framing is not None:  # the end of an Upgrade request's head, its body skipped
            return
        current, self._body = self._body, None
        if current is not None:
            current.end()

    # serving

    def _start(self, request: Request) -> None:
        if self._task is None:
            self._task = self.loop.create_task(self._serve(request))
        else:
            self._pending.append(request)
            if len(self._pending) > MAX_PIPELINED:
                self._pause_reading()

    def _refuse(self, error: GatewayError) -> None:
        """Answer what the parser refused, in its turn, and take nothing more from this client."""
        self._input_closed = True
        request = Request(self, "", "", "1.1", CIMultiDictProxy(CIMultiDict()), 0, keep_alive=False)
        request.refusal = error
        self._start(request)

    async def _serve(self, request: Request) -> None:
        server = self.server
        while True:
            self.keep_alive = request.keep_alive and not self._closing
            self._wrote = False
            try:
                response = await server.handler(request)
            except asyncio.CancelledError:
                self.abort()
                raise
            except Exception:
                log.exception("request_failed", method=request.method, path=request.path[:200])
                response = None
            if self._lost:
                return
            try:
                if response is None:
                    pass
                elif not response.prepared:
                    assert isinstance(response, Response)
                    await self._write_reply(request, response)
                elif isinstance(response, StreamResponse):
                    await response.write_eof()
            except Exception:
                if self._lost:  # the client left while the reply was being written
                    return
                log.exception("response_failed", method=request.method, path=request.path[:200])
                response = None
            if response is None:
                await self._answer_failure(request)
                return
            if request.refusal is not None or not request.content.complete:
                self._linger_close()
                return
            if not self.keep_alive or self._lost or self._closing:
                self.close()
                return
            if not self._pending:
                self._task = None
                self.idle_since = self.loop.time()
                if self._reading_paused and not self._input_closed:
                    self._resume_reading()
                return
            request = self._pending.popleft()
            if self._reading_paused and len(self._pending) <= MAX_PIPELINED and not self._input_closed:
                self._resume_reading()

    async def _answer_failure(self, request: Request) -> None:
        """The handler or its reply failed: a 500 if no byte of the reply went out, else the reply is cut."""
        if self._wrote:
            self.abort()  # a reply cut short must not pass for whole
            return
        self.keep_alive = False
        await self._write_reply(request, json_response(
            {"error": "the gateway failed to handle the request", "code": "internal_error"}, 500))
        self._linger_close()

    async def _write_reply(self, request: Request, response: Response) -> None:
        body = response.body
        headers = response.headers
        status = response.status
        if status not in NO_BODY_STATUSES and status >= 200:  # RFC 9110 §8.6: never on 1xx and 204
            headers[CONTENT_LENGTH] = str(len(body))
        if DATE not in headers:
            headers[DATE] = self.server.date()
        head = self.encode_head(request, status, response.reason, headers)
        no_body = request.method == "HEAD" or status in NO_BODY_STATUSES or status < 200
        await self.write(head if no_body or not body else head + body)
        response.prepared = True

    def _linger_close(self) -> None:
        """End a connection whose client may still be sending (a refused head, an unread body).

        Closing a socket with unread bytes resets it, and the client's TCP stack may then drop the reply
        before it is read: the reply is followed by a FIN, what still arrives is dropped, and the
        connection closes when the client closes its side or after LINGER_S.
        """
        self._task = None
        self._pending.clear()
        self._input_closed = True
        self._body = None
        transport = self._transport
        if transport is None:
            return
        self._linger = self.loop.call_later(LINGER_S, self.abort)
        if transport.can_write_eof():
            transport.write_eof()
        self._reading_paused = False
        transport.resume_reading()

    def encode_head(self, request: Request, status: int, reason: str | None,
                    headers: CIMultiDict[str]) -> bytes:
        if reason is None:
            reason = _REASONS.get(status, "")
        if not request.content.complete:
            self.keep_alive = False  # the rest of the body will be read and dropped, then the connection closed
        if (status in NO_BODY_STATUSES or status < 200) and (CONTENT_LENGTH in headers or TRANSFER_ENCODING in headers):
            headers.popall(CONTENT_LENGTH, None)  # RFC 9110 §8.6, §6.4.1: no body, so no framing of one
            headers.popall(TRANSFER_ENCODING, None)
        lines = [f"HTTP/1.1 {status} {reason}\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in headers.items()]
        if not self.keep_alive:
            lines.append("Connection: close\r\n")
        elif request.version == "1.0":
            lines.append("Connection: keep-alive\r\n")
        lines.append("\r\n")
        text = "".join(lines)
        # A CR or LF inside a name or value would split the head: each line must end where we ended it.
        if text.count("\n") != len(lines) or text.count("\r") != len(lines):
            raise ValueError("a response header contains CR or LF")
        return text.encode("utf-8", "surrogateescape")

    # writing, for the responses

    async def write(self, data: bytes) -> None:
        transport = self._transport
        if transport is None:
            raise ConnectionResetError("the client closed the connection")
        transport.write(data)
        self._wrote = True
        if self._write_waiter is not None:
            await self._write_waiter
            if self._lost:
                raise ConnectionResetError("the client closed the connection")

    def write_nowait(self, data: bytes) -> bool:
        transport = self._transport
        if transport is None:
            return True  # the client left: connection_lost cancels the handler, nothing to wait for
        transport.write(data)
        self._wrote = True
        return self._write_waiter is None

    def send_continue(self) -> None:
        """RFC 9110 §10.1.1: tell a caller holding its body back to send it."""
        if self._transport is not None:
            self._transport.write(_CONTINUE)

    def body_taken(self) -> None:
        if self._reading_paused and not self._input_closed and len(self._pending) <= MAX_PIPELINED:
            self._resume_reading()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()
            self.server.read_pauses += 1

    def _resume_reading(self) -> None:
        if self._reading_paused and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()

    def close(self) -> None:
        self._input_closed = True
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # the drain

    @property
    def idle(self) -> bool:
        return self._task is None and self._linger is None

    def close_when_idle(self) -> None:
        self._closing = True
        if self._task is None:
            self.close()
        else:
            self.keep_alive = False  # the reply in progress says Connection: close if its head is not out yet

    async def finish(self, timeout_s: float) -> None:
        deadline = self.loop.time() + timeout_s
        task = self._task
        if task is not None:
            try:
                async with asyncio.timeout_at(deadline):
                    await asyncio.shield(task)
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()
                await asyncio.wait([task], timeout=1.0)
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # the drain itself was cancelled, not only the handler
            except Exception:  # _serve logged it
                pass
        if self._transport is not None and not self._lost:
            # What the last reply left in the transport's buffer still goes out, within the time left.
            self._lost_waiter = lost = self.loop.create_future()
            self.close()
            with suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await lost
        self.abort()


def _refused_form(request: Request) -> GatewayError | None:
    """What RFC 9110/9112 make us refuse in a request that parsed: a version, a missing Host, a tunnel."""
    version = request.version
    if version != "1.1" and version != "1.0":
        return VersionNotSupported(f"HTTP/{version} is not supported: send HTTP/1.1")
    if version == "1.1" and len(request.headers.getall(_HOST, ())) != 1:  # RFC 9112 §3.2: exactly one
        return BadRequest("an HTTP/1.1 request needs exactly one Host header")
    if request.method == "CONNECT":
        return UnsupportedRequest("CONNECT is not supported: the gateway forwards requests, it opens no tunnels")
    if request.raw_path == "*":
        return UnsupportedRequest("an asterisk-form request (OPTIONS *) is about the gateway itself and is not "
                                  "forwarded: send OPTIONS with a path")
    return None


def _canonical_length(headers: CIMultiDictProxy[str], length: int) -> CIMultiDictProxy[str]:
    copied = CIMultiDict(headers)
    copied[CONTENT_LENGTH] = str(length)
    return CIMultiDictProxy(copied)


def _parser_message(exc: HttpParserError) -> str:
    return str(exc).removeprefix("HPE_").split(":", 1)[-1].strip()[:200] or exc.__class__.__name__


class Server:
    """The protocol factory a BaseRunner's sites listen with (aiohttp's web.Server's part)."""

    def __init__(self, handler: Handler, max_head_bytes: int, idle_timeout_s: float = IDLE_TIMEOUT_S) -> None:
        self.handler = handler
        self.max_head_bytes = max_head_bytes
        self.idle_timeout_s = idle_timeout_s
        self.read_pauses = 0  # how often back-pressure paused reading from a client (a test reads it)
        self.connections: set[ClientConnection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._second = 0
        self._date = ""
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def __call__(self) -> ClientConnection:
        return ClientConnection(self)

    def connected(self, connection: ClientConnection) -> None:
        self.connections.add(connection)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self.idle_timeout_s / 5, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle for idle_timeout_s: one timer for all, not one per request."""
        self._sweeper = None
        oldest = self.loop.time() - self.idle_timeout_s
        for connection in list(self.connections):
            if connection.idle_since < oldest and connection.idle:
                connection.close()
        if self.connections:
            self._sweeper = self.loop.call_later(self.idle_timeout_s / 5, self._sweep)

    def date(self) -> str:
        """The Date header's value (RFC 9110 §6.6.1), formatted once a second."""
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(second))
        return self._date

    def pre_shutdown(self) -> None:
        for connection in list(self.connections):
            connection.close_when_idle()

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (BaseRunner calls it so)
        await asyncio.gather(*(connection.finish(timeout or 0.0) for connection in list(self.connections)))
        self.connections.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
