"""The gateway's own answers to JSON-RPC requests are JSON-RPC error responses (issue #13), over sockets.

Same status, headers, access line and metrics as the plain {"error", "code"} answer, which
notifications, non-JSON-RPC bodies and bodies too large to have been read keep.
"""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import structlog
from aiohttp import web
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.engines.arca import REJECT_MESSAGE
from gateway.headers import ENV_INSTANCE_ID, MCP_PROXY_URL
from gateway.log import configure_logging
from gateway.proxy import SMALL_BODY_BYTES
from tests.conftest import Upstream, serve_gateway
from tests.process import free_port

MISSING = "AEnvCore-MCPProxy-URL header is required"
PLAIN_MISSING = {"error": MISSING, "code": "missing_header"}


def rpc(request_id: Any = 1, method: str = "tools/call", **extra: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": {}, **extra}


def rpc_missing(request_id: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id,
            "error": {"code": -32600, "message": MISSING, "data": {"status": 400, "code": "missing_header"}}}


async def test_a_refused_json_rpc_request_is_answered_with_its_id(aiohttp_client: AiohttpClient) -> None:
    gateway = await serve_gateway(aiohttp_client)

    by_number = await gateway.post("/mcp", json=rpc(7))
    by_string = await gateway.post("/mcp", json=rpc("call-7"))

    assert (by_number.status, by_number.headers["Content-Type"], await by_number.json()) == (
        400, "application/json; charset=utf-8", rpc_missing(7))
    assert (by_string.status, await by_string.json()) == (400, rpc_missing("call-7"))


async def test_a_refused_batch_gets_one_error_per_request_with_an_id(aiohttp_client: AiohttpClient) -> None:
    gateway = await serve_gateway(aiohttp_client)
    batch = [rpc(1), {"jsonrpc": "2.0", "method": "notifications/initialized"}, rpc("two", "tools/list")]

    answered = await gateway.post("/mcp", json=batch)

    assert (answered.status, await answered.json()) == (400, [rpc_missing(1), rpc_missing("two")])


async def test_notifications_and_other_bodies_keep_the_plain_error(aiohttp_client: AiohttpClient) -> None:
    gateway = await serve_gateway(aiohttp_client)
    bodies = [
        json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode(),
        json.dumps([{"jsonrpc": "2.0", "method": "notifications/initialized"}]).encode(),
        json.dumps({"jsonrpc": "2.0", "id": 1, "result": {}}).encode(),  # a response to a server request
        b"not json",
        b"",
    ]

    answers = [await gateway.post("/mcp", data=body) for body in bodies]

    assert [(answer.status, await answer.json()) for answer in answers] == [(400, PLAIN_MISSING)] * len(bodies)


async def test_a_body_over_the_small_body_size_is_not_read_for_its_id(aiohttp_client: AiohttpClient) -> None:
    gateway = await serve_gateway(aiohttp_client)
    large = json.dumps(rpc(1, blob="x" * SMALL_BODY_BYTES)).encode()

    answered = await gateway.post("/mcp", data=large)

    assert (answered.status, await answered.json()) == (400, PLAIN_MISSING)


async def test_the_access_line_and_the_rule_are_kept_for_a_json_rpc_refusal(
    upstream: Upstream, aiohttp_client: AiohttpClient
) -> None:
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream, cache=False)
    try:
        gateway = await serve_gateway(aiohttp_client, target_deny=("127.0.0.0/8",))
        refused = await gateway.post("/mcp", json=rpc(3), headers={MCP_PROXY_URL: str(upstream.url)})
        body = await refused.json()
    finally:
        structlog.reset_defaults()

    rule = "target_deny 127.0.0.0/8"
    assert (refused.status, body) == (403, {"jsonrpc": "2.0", "id": 3, "error": {
        "code": -32011, "message": f"target 127.0.0.1:{upstream.url.port} is refused by rule: {rule}",
        "data": {"status": 403, "code": "target_forbidden", "rule": rule}}})
    [line] = [json.loads(text) for text in stream.getvalue().splitlines() if '"event":"request"' in text]
    assert (line["status"], line["code"], line["outcome"]) == (403, "target_forbidden", "refused")
    assert upstream.seen == []


async def test_a_busy_target_answers_json_rpc_with_retry_after(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient
) -> None:
    arrived, release = asyncio.Event(), asyncio.Event()

    async def hold(request: web.Request) -> web.Response:
        arrived.set()
        await asyncio.wait_for(release.wait(), 10)
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/mcp", hold)
    slow = await aiohttp_server(app)
    gateway = await serve_gateway(aiohttp_client, max_inflight_per_target=1)
    route = {MCP_PROXY_URL: str(slow.make_url(""))}

    holding = asyncio.ensure_future(gateway.post("/mcp", json=rpc(1), headers=route))
    await asyncio.wait_for(arrived.wait(), 10)
    busy = await gateway.post("/mcp", json=rpc(2), headers=route)
    busy_body = await busy.json()
    release.set()
    held = await asyncio.wait_for(holding, 10)

    assert (held.status, busy.status, busy.headers["Retry-After"]) == (200, 429, "1")
    assert busy_body == {"jsonrpc": "2.0", "id": 2, "error": {
        "code": -32012, "message": f"target 127.0.0.1:{slow.port} already has 1 requests in flight "
                                   "(--max-inflight-per-target)", "data": {"status": 429, "code": "target_busy"}}}


async def test_an_unreachable_upstream_answers_json_rpc(aiohttp_client: AiohttpClient) -> None:
    gateway = await serve_gateway(aiohttp_client, connect_retry_budget_s=0.0)
    port = free_port()  # nothing listens there

    failed = await gateway.post("/mcp", json=rpc(1), headers={MCP_PROXY_URL: f"http://127.0.0.1:{port}"})

    assert (failed.status, await failed.json()) == (502, {"jsonrpc": "2.0", "id": 1, "error": {
        "code": -32014, "message": f"cannot connect to upstream 127.0.0.1:{port}: connection refused",
        "data": {"status": 502, "code": "upstream_unreachable"}}})


async def test_arca_reject_answers_a_json_rpc_request_for_both_readers(aiohttp_client: AiohttpClient) -> None:
    gateway = await serve_gateway(aiohttp_client, schedule_type="arca", arca_base_url="http://127.0.0.1:9",
                                  arca_api_key="k")
    headers = {ENV_INSTANCE_ID: "sbx-1"}

    json_rpc = await gateway.post("/mcp", json=rpc(5), headers=headers)
    plain = await gateway.get("/sse", headers=headers)

    envelope = {"success": False, "code": 501, "message": REJECT_MESSAGE, "data": None}
    assert (json_rpc.status, await json_rpc.json()) == (501, {
        "jsonrpc": "2.0", "id": 5, "error": {"code": -32013, "message": REJECT_MESSAGE,
                                             "data": {"status": 501, "code": "data_plane_unsupported"}},
        **envelope})
    assert (plain.status, await plain.json()) == (501, envelope)


async def raw_exchange(gateway: Any, chunks: list[bytes], pause_s: float) -> tuple[bytes, float]:
    """Send chunks with a pause between them, then read the whole answer (the refusal closes or is complete)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    started = asyncio.get_running_loop().time()
    try:
        for index, chunk in enumerate(chunks):
            if index:
                await asyncio.sleep(pause_s)
            writer.write(chunk)
            await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        answer = head + await asyncio.wait_for(reader.readexactly(length), 5)
        return answer, asyncio.get_running_loop().time() - started
    finally:
        writer.close()


def post_head(body: bytes, *extra: bytes) -> bytes:
    lines = [b"POST /mcp HTTP/1.1", b"Host: 127.0.0.1", b"Content-Type: application/json",
             b"Content-Length: %d" % len(body), *extra]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def test_a_body_sent_after_the_head_is_waited_for_to_answer_its_id(aiohttp_client: AiohttpClient) -> None:
    # Regression: httpx writes the head and the body apart, so across processes the refusal came before
    # the body and fastmcp users saw "Server returned an error response" nearly every time.
    gateway = await serve_gateway(aiohttp_client)
    body = json.dumps(rpc(9)).encode()

    answer, _ = await raw_exchange(gateway.server, [post_head(body), body], pause_s=0.1)

    assert answer.startswith(b"HTTP/1.1 400 ")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == rpc_missing(9)


async def test_a_body_that_does_not_come_gets_the_plain_answer_within_the_wait(aiohttp_client: AiohttpClient) -> None:
    gateway = await serve_gateway(aiohttp_client)
    body = json.dumps(rpc(9)).encode()

    withheld, withheld_s = await raw_exchange(gateway.server, [post_head(body)], pause_s=0)
    held_back, held_back_s = await raw_exchange(gateway.server, [post_head(body, b"Expect: 100-continue")], pause_s=0)

    assert [json.loads(answer.split(b"\r\n\r\n", 1)[1]) for answer in (withheld, held_back)] == [PLAIN_MISSING] * 2
    assert 0.4 < withheld_s < 2.0
    assert held_back_s < 0.4  # a caller waiting for 100 Continue is not kept waiting for nothing
