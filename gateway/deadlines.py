"""Idle deadlines for every request in flight, checked by one periodic tick instead of a timer each.

A uvloop timer is a libuv handle allocated, started, stopped and closed per use: an asyncio.timeout
per request cost ~20 µs of CPU (docs/performance.md). Here a request's deadline is one dict entry,
and expiry cancels the task the way asyncio.Timeout does, so TimeoutError behaves the same.
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class Deadlines:
    """Deadlines that fire between `seconds` and `seconds + resolution_s` after the last progress."""

    def __init__(self, resolution_s: float) -> None:
        self.resolution_s = resolution_s
        self._due: dict[IdleTimeout, float] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ticking: asyncio.Task[None] | None = None

    def within(self, seconds: float) -> IdleTimeout:
        """A context (inside a task) raising TimeoutError when it makes no progress for `seconds`."""
        return IdleTimeout(self, seconds)

    def start(self) -> None:
        """Start the tick (the app does, on startup): from here on deadlines fire."""
        self._loop = asyncio.get_running_loop()
        self._ticking = asyncio.create_task(self._tick())

    def stop(self) -> None:
        if self._ticking is not None:
            self._ticking.cancel()
            self._ticking = None

    def loop(self) -> asyncio.AbstractEventLoop:
        # Cached: asyncio.get_running_loop() makes a getpid() system call each time (fork check).
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def _now(self) -> float:
        return self.loop().time()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.resolution_s)
            now = self._now()
            for idle in [idle for idle, due in self._due.items() if due <= now]:
                del self._due[idle]
                idle.expire()


class IdleTimeout:
    """Like asyncio.timeout(): the task is cancelled when due and the cancellation leaves as TimeoutError."""

    __slots__ = ("_cancelling", "_deadlines", "_expired", "_seconds", "_task")

    def __init__(self, deadlines: Deadlines, seconds: float) -> None:
        self._deadlines = deadlines
        self._seconds = seconds
        self._expired = False
        self._cancelling = 0
        self._task: asyncio.Task[object] | None = None

    # A plain `with`, not `async with`: nothing here waits, and an async context costs two coroutines.
    def __enter__(self) -> IdleTimeout:
        self._task = asyncio.current_task(self._deadlines.loop())  # with the loop: no getpid()
        if self._task is None:
            raise RuntimeError("IdleTimeout should be used inside a task")
        self._cancelling = self._task.cancelling()
        self.progressed()
        return self

    def progressed(self) -> None:
        """Bytes moved: the idle clock starts again."""
        self._deadlines._due[self] = self._deadlines._now() + self._seconds

    def pause(self) -> None:
        """Stop the clock (while waiting on the other side) until the next progressed()."""
        self._deadlines._due.pop(self, None)

    def expire(self) -> None:
        if self._task is not None and not self._task.done():
            self._expired = True
            self._task.cancel()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._deadlines._due.pop(self, None)
        task, self._task = self._task, None  # a traceback may keep this object: no cycle back to the task
        # As asyncio.Timeout does: our cancel becomes TimeoutError, anyone else's stays a cancellation.
        if self._expired and task is not None and task.uncancel() <= self._cancelling \
                and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc
