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


@asynccontextmanager
async def connect(gateway: str, upstream: str, transport: str) -> AsyncIterator[ClientSession]:
    """An initialized MCP session with the upstream, every request sent to the gateway."""
    headers = {ROUTE_HEADER: upstream}
    if transport == "sse":
        streams = sse_client(f"{gateway}/sse", headers=headers)
    else:
        # The SDK's own defaults: 30 s to connect, 300 s of silence allowed on a stream.
        http_client = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0, read=300.0))
        streams = _streamable(http_client, f"{gateway}/mcp")
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
        print("tools:", ", ".join(tool.name for tool in tools.tools))
        result = await session.call_tool(args.tool, json.loads(args.args), progress_callback=show_progress)
    for block in result.content:
        print(getattr(block, "text", block))
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
    return asyncio.run(run(parser.parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
