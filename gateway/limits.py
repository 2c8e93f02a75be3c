"""Limits: body and header sizes, in-flight requests per target, open SSE streams, and the drain.

Plain counters on one Limits value per app; the data plane (dataplane.py) checks sizes, enters and
releases every request, and the proxy calls admit() and admit_stream() where it knows the target.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from typing import TYPE_CHECKING, Final

from gateway.engines.base import Target
from gateway.errors import BodyTooLarge, HeadersTooLarge, TargetBusy, TooManyStreams, authority
from gateway.exchange import Exchange
from gateway.headers import SANDBOX_ID
from gateway.messages import Request
from gateway.streams import OpenStream

if TYPE_CHECKING:
    from gateway.config import Settings

_SANDBOX_ID: Final = SANDBOX_ID.lower()


def target_key(target: Target) -> str:
    """What --max-inflight-per-target counts by: the arca instance id, else the upstream host:port."""
    for name, value in target.added_headers:
        if name.lower() == _SANDBOX_ID:
            return value
    return authority(target.url)


class Limits:
    def __init__(self, settings: Settings) -> None:
        self.max_body_size = settings.max_body_size
        self.max_header_size = settings.max_header_size
        self.max_per_target = settings.max_inflight_per_target
        self.max_streams = settings.max_streams
        self.inflight = 0
        self.per_target: dict[str, int] = {}
        self.streams: set[OpenStream] = set()
        self._idle: asyncio.Event | None = None  # set by the last request to finish while draining

    def admit(self, exchange: Exchange, target: Target) -> None:
        """Count the request against its target; 429 when the target is at --max-inflight-per-target."""
        if not self.max_per_target:
            return
        key = target_key(target)
        count = self.per_target.get(key, 0)
        if count >= self.max_per_target:
            raise TargetBusy(f"target {key} already has {count} requests in flight (--max-inflight-per-target)")
        self.per_target[key] = count + 1
        exchange.counted_as = key

    def admit_stream(self, exchange: Exchange) -> OpenStream:
        """Register an SSE stream before its status line is sent; 503 when --max-streams are open."""
        if self.max_streams and len(self.streams) >= self.max_streams:
            raise TooManyStreams(f"the gateway already relays {len(self.streams)} streams (--max-streams)")
        stream = OpenStream()
        self.streams.add(stream)
        exchange.stream = stream
        return stream

    def check(self, request: Request) -> None:
        """413 and 431 before anything is forwarded."""
        length = request.content_length
        if length is not None and length > self.max_body_size:
            raise BodyTooLarge(f"request body of {length} bytes exceeds --max-body-size {self.max_body_size}")
        header_bytes = request.header_bytes  # each line counted as "name: value\r\n" by the server
        if header_bytes > self.max_header_size:
            raise HeadersTooLarge(f"request headers of {header_bytes} bytes exceed --max-header-size "
                                  f"{self.max_header_size}")

    def enter(self) -> None:
        """A request is in flight until release(): the drain waits for it."""
        self.inflight += 1

    def release(self, exchange: Exchange) -> None:
        """Give back whatever the request took: its place in flight, its target's count, its stream."""
        self.inflight -= 1
        if not self.inflight and self._idle is not None:
            self._idle.set()
        key = exchange.counted_as
        if key is not None:
            left = self.per_target[key] - 1
            if left:
                self.per_target[key] = left
            else:
                del self.per_target[key]
        stream = exchange.stream
        if stream is not None:
            self.streams.discard(stream)

    def limited(self, chunks: AsyncIterable[bytes], exchange: Exchange) -> AsyncIterator[bytes]:
        """A streamed body, raising BodyTooLarge past --max-body-size: the upstream sees a broken request."""
        return LimitedBody(chunks, self.max_body_size, exchange)

    async def drain(self, timeout_s: float) -> None:
        """Wait until no request is in flight or timeout_s passed, then end every open SSE stream."""
        if self.inflight:
            self._idle = asyncio.Event()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._idle.wait()
            except TimeoutError:
                pass
        for stream in list(self.streams):
            stream.close()


class LimitedBody:
    """A streamed request body on its way upstream: BodyTooLarge past max_bytes, its first bytes kept for
    the rpc_method label. An iterator object rather than an async generator, which mypyc cannot compile."""

    __slots__ = ("_chunks", "_exchange", "_max_bytes", "_received")

    def __init__(self, chunks: AsyncIterable[bytes], max_bytes: int, exchange: Exchange) -> None:
        self._chunks = chunks.__aiter__()
        self._max_bytes = max_bytes
        self._exchange = exchange
        self._received = 0

    def __aiter__(self) -> LimitedBody:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._chunks.__anext__()
        self._received += len(chunk)
        if self._received > self._max_bytes:
            raise BodyTooLarge(f"request body exceeds --max-body-size {self._max_bytes}")
        self._exchange.keep_body_chunk(chunk)
        return chunk
