"""Raw asyncio TCP servers on 127.0.0.1 for upstreams that write exact bytes, torn down cleanly; and aiohttp
apps served without pytest-aiohttp's fixtures, for tests of a gateway subprocess that need not run once per
upstream transport (conftest parametrizes every test using those fixtures)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from aiohttp import web
from yarl import URL

Handle = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServers:
    """Each server calls handle per connection; close() cancels and awaits every handler still running, so
    a kept-alive connection ends with the test, not with asyncio logging a task destroyed while pending."""

    def __init__(self) -> None:
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, handle: Handle) -> URL:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._tasks.add(task)  # type: ignore[arg-type]
            try:
                await handle(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, asyncio.CancelledError):
                pass
            finally:
                writer.close()
                self._tasks.discard(task)  # type: ignore[arg-type]

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self._servers.append(server)
        return URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()


@asynccontextmanager
async def running_app(app: web.Application) -> AsyncIterator[URL]:
    """An aiohttp app on 127.0.0.1 and a free port, for as long as the block runs."""
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield URL(f"http://127.0.0.1:{runner.addresses[0][1]}")
    finally:
        await runner.cleanup()
