"""Relaying text/event-stream: each chunk is written the moment it arrives, never parsed or held.

No idle limit applies (streams sit quiet between events). An upstream that ends or breaks ends
the downstream stream cleanly; a downstream that leaves ends the relay (the handler is cancelled).
"""

from __future__ import annotations

import structlog
from aiohttp import web

from gateway.exchange import Exchange
from gateway.upstream import UpstreamResponse

log = structlog.get_logger(__name__)


async def relay(
    upstream_response: UpstreamResponse, downstream_response: web.StreamResponse, exchange: Exchange
) -> None:
    """Pump upstream bytes into an already prepared downstream response until either side ends."""
    while True:
        try:
            chunk = await upstream_response.read_chunk()
        except OSError:
            exchange.upstream_failed("reset_mid_stream")  # the access log line records it
            break
        if not chunk:
            break
        exchange.bytes_out += len(chunk)
        await downstream_response.write(chunk)  # raises ConnectionResetError once the client left
    await downstream_response.write_eof()
