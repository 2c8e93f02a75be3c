"""The SDK's id generator for the gateway's spans: the trace id of a new trace is the one tracing.py drew.

Apart from tracing.py because it subclasses an SDK class, so importing it imports the SDK: only
tracing.Tracing does, when tracing is on.
"""

from __future__ import annotations

import random

from opentelemetry.sdk.trace.id_generator import IdGenerator


class ChosenTraceIds(IdGenerator):
    """tracing.Tracing samples a new trace before the SDK sees it (a sampled-out request never reaches
    the SDK), so the span it then starts must carry the trace id that was sampled: set `next_trace_id`
    just before each start_span() of a new trace. One event loop per process: nothing interleaves."""

    def __init__(self) -> None:
        self.next_trace_id = 0

    def generate_span_id(self) -> int:
        return random.getrandbits(64) or 1

    def generate_trace_id(self) -> int:
        return self.next_trace_id or random.getrandbits(128) or 1
