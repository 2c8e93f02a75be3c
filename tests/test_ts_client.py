"""The TypeScript SDK's client (@modelcontextprotocol/sdk on Node 22) through the gateway to a real FastMCP
server: a tool call, and what its user is told when the gateway refuses (issue #13).

Skipped where npm is absent (make test installs js/package.json where it is: tests/js_tools.py).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import js_tools
from tests.mcp_upstream import McpUpstream, running_example_server
from tests.process import gateway_process

RUN_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def node() -> Path:
    try:
        return js_tools.node()
    except js_tools.Unavailable as unavailable:
        pytest.skip(str(unavailable))


@pytest.fixture(scope="module")
def streamable_upstream() -> Iterator[McpUpstream]:
    with running_example_server("streamable-http") as upstream:
        yield upstream


@pytest.mark.timeout(RUN_TIMEOUT_S + 30)
def test_the_typescript_client_calls_a_tool_and_shows_the_refusal(node: Path, streamable_upstream: McpUpstream) -> None:
    with gateway_process() as gateway:  # the real program, as a laptop user starts it
        ran = subprocess.run([str(node), str(js_tools.JS_DIR / "ts_client.mjs"), str(gateway.url / "mcp"),
                              str(streamable_upstream.url)], capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert ran.returncode == 0, ran.stderr
    seen = json.loads(ran.stdout.strip().splitlines()[-1])

    assert (seen["tools"], seen["added"]) == (["add", "count", "notify", "request_headers"], ["5"])
    # The SDK puts the body of a non-2xx answer in its message: the JSON-RPC error, the gateway's message in it.
    refusal = seen["refusal"]
    prefix = "Streamable HTTP error: Error POSTing to endpoint: "
    assert (refusal["code"], refusal["message"][:len(prefix)]) == (400, prefix)
    body = json.loads(refusal["message"][len(prefix):])
    assert body["error"]["message"] == "AEnvCore-MCPProxy-URL header is required"
    assert seen["refusalMs"] < 1000
