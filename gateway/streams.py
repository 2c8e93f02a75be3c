"""An open SSE stream's handle: how the drain (limits.py) ends a relay (sse.py) between reads.

A module of its own because three hold it: the relay that reads under it, the Limits that count and
close the open ones, and the request's Exchange that carries it from one to the other (exchange.py
imported it from limits while limits imported Exchange: a cycle).
"""

from __future__ import annotations

import asyncio
from typing import Any


class OpenStream:
    """One relayed SSE stream; the drain ends it between reads (sse.relay):

    - with a keepalive, a read waits under `timer`, which the drain expires;
    - without, the task waiting in a read is `reader`, which the drain cancels; relay() takes
      that cancellation back (interrupted()) as asyncio.timeout does, so nobody else's is lost.
    """

    __slots__ = ("_cancelled", "closing", "reader", "timer")

    def __init__(self) -> None:
        self.closing = False
        self.timer: asyncio.Timeout | None = None
        self.reader: asyncio.Task[Any] | None = None
        self._cancelled = False

    def close(self) -> None:
        self.closing = True
        if self.timer is not None and not self.timer.expired():
            self.timer.reschedule(asyncio.get_running_loop().time())
        elif self.reader is not None and not self._cancelled:
            self._cancelled = True
            self.reader.cancel()

    def interrupted(self, task: asyncio.Task[Any]) -> bool:
        """After a CancelledError in a read: True if it was the drain's alone (then it is taken back)."""
        if not self._cancelled:
            return False
        self._cancelled = False
        return task.uncancel() == 0
