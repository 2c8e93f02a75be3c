"""A real MCP server as an upstream: examples/mcp_server.py in a subprocess on 127.0.0.1, plus an SSE reader.

The server binds port 0 itself and prints its URL, so there is no race for a free port. Every wait
is bounded and the process is always stopped (terminate, then kill).
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

EXAMPLE_SERVER = Path(__file__).resolve().parent.parent / "examples" / "mcp_server.py"
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class McpUpstream:
    """A running example server: its base URL (what AEnvCore-MCPProxy-URL carries) and endpoint path."""

    url: URL
    path: str


@contextmanager
def running_example_server(transport: str) -> Iterator[McpUpstream]:
    with running_mcp_server([str(EXAMPLE_SERVER), "--port", "0", "--transport", transport]) as upstream:
        yield upstream


@contextmanager
def running_mcp_server(args: list[str]) -> Iterator[McpUpstream]:
    """A Python MCP server started with these arguments, which prints `listening on URL` once bound."""
    process = subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,  # stderr is inherited: pytest shows it when a test fails
        text=True,
    )
    try:
        url = URL(_first_line(process).removeprefix("listening on "))
        yield McpUpstream(url=url.with_path(""), path=url.path)
    finally:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT_S)
        assert process.stdout is not None
        process.stdout.close()


def _first_line(process: subprocess.Popen[str]) -> str:
    """The server's `listening on URL` line, or a failure once it exits or STARTUP_TIMEOUT_S passes."""
    assert process.stdout is not None
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while (remaining := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([process.stdout], [], [], remaining)
        if readable:
            line = process.stdout.readline().strip()
            if line.startswith("listening on "):
                return line
            if not line and process.poll() is not None:
                break
    raise RuntimeError(f"MCP server did not start (exit code {process.poll()})")


@dataclass(frozen=True, slots=True)
class Event:
    """One server-sent event: its type (`message` unless named) and its data lines joined."""

    event: str
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


async def next_event(response: aiohttp.ClientResponse) -> Event:
    """Read the next SSE event from a streaming response; comments (keep-alives) are skipped."""
    event_type, data_lines = "message", list[str]()
    while True:
        raw_line = await response.content.readline()
        if not raw_line:
            raise EOFError("the event stream ended")
        line = raw_line.decode().rstrip("\r\n")
        if not line:
            if data_lines:
                return Event(event_type, "\n".join(data_lines))
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event_type = value
        elif name == "data":
            data_lines.append(value)
