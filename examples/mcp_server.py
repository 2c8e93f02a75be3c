"""A small MCP server to try the gateway with: FastMCP over streamable HTTP or the legacy SSE transport.

    python examples/mcp_server.py --port 9000                    # streamable HTTP at /mcp
    python examples/mcp_server.py --port 9000 --transport sse    # legacy SSE at /sse + /messages/

Tools: add(a, b); count(n, delay_s), which sends one progress notification per step while it runs;
notify(message), which sends a log notification on the session's standalone stream (the long-lived
GET /mcp under streamable HTTP, the GET /sse stream under SSE) rather than on its own response;
request_headers(), which answers the HTTP headers its call arrived with (what the gateway forwarded).
Prints one line `listening on http://HOST:PORT/PATH` once the port is bound (with --port 0, the
port the system chose), then serves until interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys

import mcp_types
from fastmcp import Context, FastMCP
from fastmcp.server.dependencies import get_http_headers

server: FastMCP = FastMCP("aenv-example")


@server.tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool
async def count(n: int, delay_s: float, ctx: Context) -> str:
    """Count to n, one step every delay_s seconds, reporting progress after each step."""
    for step in range(1, n + 1):
        await asyncio.sleep(delay_s)
        await ctx.report_progress(step, n, f"step {step} of {n}")
    return f"counted to {n}"


@server.tool
async def notify(message: str, ctx: Context) -> str:
    """Send `message` as a log notification on the session's standalone stream, not on this response."""
    notification = mcp_types.LoggingMessageNotification(
        params=mcp_types.LoggingMessageNotificationParams(level="info", data=message, logger="notify")
    )
    await ctx.session.send_notification(notification)  # no related request: the standalone stream
    return "sent"


@server.tool
async def request_headers() -> dict[str, str]:
    """The HTTP headers this tools/call arrived with, as the server saw them (names lower-cased)."""
    return get_http_headers(include_all=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9000, help="listen port, 0 for any free one (default: 9000)")
    parser.add_argument(
        "--transport", choices=("streamable-http", "sse"), default="streamable-http",
        help="streamable-http serves /mcp; sse serves /sse and /messages/ (default: streamable-http)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # Bind first, so the printed port is the real one even with --port 0.
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    listener = socket.create_server((args.host, args.port), family=family)
    # Accepted connections inherit this. uvloop sets it only on sockets it binds itself; without it,
    # Nagle holds each SSE event back until the client's delayed ACK, some 40 ms per response.
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    host, port = listener.getsockname()[:2]
    path = "/mcp" if args.transport == "streamable-http" else "/sse"
    shown_host = f"[{host}]" if ":" in host else host
    print(f"listening on http://{shown_host}:{port}{path}", flush=True)
    server.run(
        transport=args.transport, host=host, port=port, sockets=[listener],
        show_banner=False, log_level="WARNING",
    )


if __name__ == "__main__":
    main()
