"""Relaying text/event-stream: each chunk is written the moment it arrives, never parsed or held.

No idle limit applies (streams sit quiet between events); with --sse-keepalive a comment line is
written while the upstream is quiet, only between events. An upstream that ends or breaks, or the
drain at shutdown, ends the downstream stream cleanly; a downstream that leaves ends the relay.
Needs read_chunk() to be cancel-safe: a read cut by the keepalive timer loses no bytes.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

import structlog

from gateway.exchange import Exchange
from gateway.messages import StreamResponse
from gateway.streams import OpenStream
from gateway.upstream import UpstreamResponse

log = structlog.get_logger(__name__)

KEEPALIVE: Final = b": keepalive\n\n"
# An event ends at a blank line; the three line endings of the SSE spec (WHATWG HTML §9.2.5).
_EVENT_ENDS: Final = (b"\n\n", b"\r\r", b"\r\n\r\n")


async def relay(
    upstream_response: UpstreamResponse,
    downstream_response: StreamResponse,
    exchange: Exchange,
    stream: OpenStream | None = None,
    keepalive_s: float = 0.0,
) -> None:
    """Pump upstream bytes into an already prepared downstream response until either side ends."""
    stream = stream or OpenStream()
    task = asyncio.current_task()
    assert task is not None
    try:
        if not keepalive_s:
            if await _piped(upstream_response, downstream_response, exchange, stream, task):
                await downstream_response.write_eof()
                return
        tail = b"\n\n"  # the last bytes written, to know whether we are between events (at the start: yes)
        while not stream.closing:
            try:
                chunk = await _next_chunk(upstream_response, exchange, stream, task, keepalive_s)
            except TimeoutError:  # keepalive_s without a byte
                if not stream.closing and tail.endswith(_EVENT_ENDS):
                    await downstream_response.write(KEEPALIVE)
                continue
            if not chunk:
                break
            exchange.bytes_out += len(chunk)
            await downstream_response.write(chunk)  # raises ConnectionResetError once the client left
            if keepalive_s:  # only a keepalive needs to know whether we stopped between events
                tail = (tail + chunk)[-4:] if len(chunk) < 4 else chunk[-4:]
        if stream.closing:
            log.info("sse_closed_by_drain", request_id=exchange.request_id)
        await downstream_response.write_eof()
    finally:
        # A cancellation's traceback keeps this frame: without the task in it, no reference cycle
        # (task, exception, traceback, frame, task) waits for the garbage collector.
        task = None


async def _next_chunk(upstream_response: UpstreamResponse, exchange: Exchange, stream: OpenStream,
                      task: asyncio.Task[Any] | None, keepalive_s: float) -> bytes:
    """The next bytes; b"" at the end, the upstream's, the drain's or a reset's; TimeoutError after
    keepalive_s without any. (Its own function: mypyc compiles no break or continue across a finally.)"""
    try:
        if keepalive_s:
            async with asyncio.timeout(keepalive_s) as stream.timer:
                return await upstream_response.read_chunk()
        # no timer per read (each would cost a timer handle and a getpid()): the drain cancels
        stream.reader = task
        return await upstream_response.read_chunk()
    except TimeoutError:  # an OSError too: the keepalive's, for the caller
        raise
    except asyncio.CancelledError:
        if task is not None and stream.interrupted(task):
            return b""  # the drain's: the stream ends cleanly
        raise
    except OSError:
        exchange.upstream_failed("reset_mid_stream")  # the access log line records it
        return b""
    finally:
        stream.timer = None
        stream.reader = None
        task = None  # no reference cycle through this frame (relay() says why)


async def _piped(upstream_response: UpstreamResponse, downstream_response: StreamResponse, exchange: Exchange,
                 stream: OpenStream, task: asyncio.Task[Any] | None) -> bool:
    """Relay from the upstream transport's callback straight into the downstream one: no task wakes up
    per event. This task only waits for the end (the upstream's, the drain's or the client's).
    False if the transport cannot pipe (then relay() pumps)."""

    def deliver(chunk: bytes) -> bool:
        exchange.bytes_out += len(chunk)
        return downstream_response.write_nowait(chunk)  # False: the client is slow, reading pauses

    assert task is not None
    if not upstream_response.pipe(deliver):
        return False
    downstream_response.when_drained(upstream_response.resume)
    stream.reader = task
    try:
        await upstream_response.read_chunk()  # b"" at the end: every byte went through deliver()
    except asyncio.CancelledError:
        if not stream.interrupted(task):
            raise
        log.info("sse_closed_by_drain", request_id=exchange.request_id)
    except OSError:
        exchange.upstream_failed("reset_mid_stream")  # the access log line records it
    finally:
        stream.reader = None
        upstream_response.pipe(None)
        downstream_response.when_drained(None)
        task = None  # no reference cycle through this frame (relay() says why)
    return True
