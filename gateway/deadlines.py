"""Idle deadlines for every request in flight, checked by one periodic tick instead of a timer each.

A uvloop timer is a libuv handle allocated, started, stopped and closed per use: an asyncio.timeout
per request cost ~20 µs of CPU (docs/performance.md). Here a request's deadline is one dict entry,
and expiry goes through asyncio.Timeout itself, so cancellation and TimeoutError behave the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import TracebackType


class Deadlines:
    """Deadlines that fire between `seconds` and `seconds + resolution_s` after the last progress."""

    def __init__(self, resolution_s: float) -> None:
        self.resolution_s = resolution_s
        self._due: dict[asyncio.Timeout, float] = {}

    def within(self, seconds: float) -> IdleTimeout:
        """An async context raising TimeoutError when it makes no progress for `seconds`."""
        return IdleTimeout(self._due, seconds)

    async def run(self) -> AsyncIterator[None]:
        """A cleanup_ctx generator: the tick runs while the application does."""
        tick = asyncio.create_task(self._tick())
        yield
        tick.cancel()

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.resolution_s)
            now = loop.time()
            expired = [timeout for timeout, due in self._due.items() if due <= now]
            for timeout in expired:
                del self._due[timeout]
                timeout.reschedule(now)  # asyncio.Timeout cancels the task and raises TimeoutError


class IdleTimeout:
    __slots__ = ("_due", "_seconds", "_timeout")

    def __init__(self, due: dict[asyncio.Timeout, float], seconds: float) -> None:
        self._due = due
        self._seconds = seconds
        self._timeout = asyncio.timeout(None)  # no timer of its own: the tick reschedules it when due

    async def __aenter__(self) -> IdleTimeout:
        await self._timeout.__aenter__()
        self.progressed()
        return self

    def progressed(self) -> None:
        """Bytes moved: the idle clock starts again."""
        self._due[self._timeout] = asyncio.get_running_loop().time() + self._seconds

    def pause(self) -> None:
        """Stop the clock (while waiting on the other side) until the next progressed()."""
        self._due.pop(self._timeout, None)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._due.pop(self._timeout, None)
        await self._timeout.__aexit__(exc_type, exc, traceback)  # raises TimeoutError once expired
