"""Call an MCP tool through the gateway with the official `mcp` Python client, and print the result.

    python examples/client.py                                   # add(2, 3) via 127.0.0.1:8081 to 127.0.0.1:9000
    python examples/client.py --tool count --args '{"n": 3, "delay_s": 0.5}'   # prints progress as it comes
    python examples/client.py --transport sse --upstream http://127.0.0.1:9001

The client talks to the gateway only; the AEnvCore-MCPProxy-URL header tells the gateway which
upstream MCP server to forward to (the example server: examples/mcp_server.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx2
from mcp import ClientSession
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

ROUTE_HEADER = "AEnvCore-MCPProxy-URL"


async def show_http_error(response: httpx2.Response) -> None:
    """Print what the gateway (or the server) said when it refused: the MCP client only logs a status."""
    if response.status_code >= 400:
        body = (await response.aread()).decode(errors="replace")
        print(f"{response.request.method} {response.request.url.path} -> {response.status_code} {body}",
              file=sys.stderr, flush=True)


def http_client(
    headers: dict[str, str] | None = None, timeout: httpx2.Timeout | None = None, auth: httpx2.Auth | None = None
) -> httpx2.AsyncClient:
    # The SDK's own defaults: 30 s to connect, 300 s of silence allowed on a stream.
    return httpx2.AsyncClient(headers=headers, timeout=timeout or httpx2.Timeout(30.0, read=300.0), auth=auth,
                              event_hooks={"response": [show_http_error]})


@asynccontextmanager
async def connect(gateway: str, upstream: str, transport: str) -> AsyncIterator[ClientSession]:
    """An initialized MCP session with the upstream, every request sent to the gateway."""
    headers = {ROUTE_HEADER: upstream}
    if transport == "sse":
        streams = sse_client(f"{gateway}/sse", headers=headers, httpx_client_factory=http_client)
    else:
        streams = _streamable(http_client(headers), f"{gateway}/mcp")
    async with streams as (read_stream, write_stream), ClientSession(read_stream, write_stream) as session:
        await session.initialize()
        yield session


@asynccontextmanager
async def _streamable(http_client: httpx2.AsyncClient, url: str) -> AsyncIterator[Any]:
    async with http_client, streamable_http_client(url, http_client=http_client) as streams:
        yield streams


async def show_progress(progress: float, total: float | None, message: str | None) -> None:
    print(f"progress {progress:g}/{total:g}: {message}" if total else f"progress {progress:g}: {message}", flush=True)


async def run(args: argparse.Namespace) -> int:
    async with connect(args.gateway.rstrip("/"), args.upstream, args.transport) as session:
        tools = await session.list_tools()
        print("tools:", ", ".join(tool.name for tool in tools.tools), flush=True)
        result = await session.call_tool(args.tool, json.loads(args.args), progress_callback=show_progress)
    for block in result.content:
        print(getattr(block, "text", block), flush=True)
    return 1 if result.is_error else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway", default="http://127.0.0.1:8081", help="gateway base URL (default: %(default)s)")
    parser.add_argument("--upstream", default="http://127.0.0.1:9000",
                        help="MCP server the gateway forwards to, sent as " + ROUTE_HEADER + " (default: %(default)s)")
    parser.add_argument("--transport", choices=("streamable-http", "sse"), default="streamable-http",
                        help="MCP transport the upstream serves (default: %(default)s)")
    parser.add_argument("--tool", default="add", help="tool to call (default: %(default)s)")
    parser.add_argument("--args", default='{"a": 2, "b": 3}', help="tool arguments as JSON (default: %(default)s)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return asyncio.run(run(args))
    except Exception as exc:  # one line for a person, not a task-group traceback
        while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        print(f"client.py: error: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
