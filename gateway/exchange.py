"""The record of one request that the proxy fills in and the access log and metrics read at its end.

Plain slots and no logic beyond bookkeeping: filling it costs attribute writes, nothing more.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import TYPE_CHECKING, Final

from gateway.errors import GatewayError
from gateway.jsonrpc import PEEK_BYTES
from gateway.streams import OpenStream

if TYPE_CHECKING:
    from gateway.tracing import RequestSpan

# Outcomes, the `outcome` field of the access log line.
OK: Final = "ok"
CLIENT_CLOSED: Final = "client_closed"
REFUSED: Final = "refused"
UPSTREAM_ERROR: Final = "upstream_error"
INTERNAL_ERROR: Final = "internal_error"

# Request ids we make up: a random per-process prefix and a counter, unique without a syscall
# per request (uuid4 reads os.urandom each time).
_ID_PREFIX: Final = os.urandom(6).hex()
# The counter starts at 8 hex digits, so that ids keep one length (for 4 billion requests) without a format.
_ids = itertools.count(0x10000000)


def new_request_id() -> str:
    return _ID_PREFIX + hex(next(_ids))[2:]


class Exchange:
    """What happened to one request: filled by the proxy, read once when the response ends."""

    __slots__ = (
        "body_head",
        "bytes_out",
        "counted_as",
        "elapsed_ms",
        "error",
        "is_stream",
        "log_body_bytes",
        "outcome",
        "request_id",
        "response_head",
        "span",
        "started",
        "status",
        "stream",
        "target",
        "upstream_error",
        "upstream_ms",
    )

    def __init__(self, request_id: str, log_body_bytes: int = 0) -> None:
        self.request_id = request_id
        self.started = time.perf_counter()
        self.elapsed_ms = 0.0  # until the handler returned or raised
        self.error: GatewayError | None = None  # what we answered, when we answered ourselves
        self.log_body_bytes = log_body_bytes  # --log-bodies: keep this many response bytes
        self.target = ""  # host:port of the upstream, never more of the URL
        self.body_head: bytes | bytearray = b""  # the request body, or its first bytes when streamed
        self.response_head: bytearray | None = None  # first response bytes, only under --log-bodies
        self.outcome = OK
        self.upstream_error = ""  # a kind from metrics.UPSTREAM_ERROR_KINDS when the upstream failed
        self.upstream_ms: float | None = None  # forward until upstream response headers
        self.is_stream = False
        self.status = 0  # set when the response starts
        self.bytes_out = 0  # relayed response body bytes
        self.counted_as: str | None = None  # the --max-inflight-per-target key it holds (limits.py)
        self.stream: OpenStream | None = None  # the SSE stream it relays (streams.py)
        self.span: RequestSpan | None = None  # its server span, when tracing is on (tracing.py)

    def keep_body_chunk(self, chunk: bytes) -> None:
        """Keep the first bytes of a streamed request body, for the rpc_method label only."""
        head = self.body_head
        if len(head) < PEEK_BYTES:
            if not isinstance(head, bytearray):
                head = self.body_head = bytearray(head)
            head += chunk[: PEEK_BYTES - len(head)]

    def keep_response_chunk(self, chunk: bytes) -> None:
        """Keep the first --log-bodies bytes of a non-stream response, for the access log only."""
        head = self.response_head
        if head is None:
            head = self.response_head = bytearray()
        if len(head) < self.log_body_bytes:
            head += chunk[: self.log_body_bytes - len(head)]

    def finished(self) -> None:
        self.elapsed_ms = (time.perf_counter() - self.started) * 1000

    def upstream_failed(self, kind: str) -> None:
        self.outcome = UPSTREAM_ERROR
        self.upstream_error = kind

