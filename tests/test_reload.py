"""Reload without a restart: SIGHUP (and a changed file) swaps tokens, target policy and limits in place.

Real gateway processes and a real upstream in the test: an SSE stream and a slow call opened before
the reload must finish untouched, while requests after it obey the new tokens and policy.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from gateway.config import Settings
from gateway.configuration import RESTART_ONLY, build_configuration, keep_running
from gateway.headers import MCP_PROXY_URL
from gateway.reload import changed_names
from tests.process import GatewayProcess, gateway_process
from tests.raw_servers import running_app
from tests.test_sse import event
from tests.test_supervisor import StartSupervisor, start_supervisor  # noqa: F401 (a fixture)
from tests.test_tls import metric_values, stop

TIMEOUT_S = 30.0
EVENTS = 8
EVENT_EVERY_S = 0.25


@dataclass(slots=True)
class Upstreams:
    """Two upstreams on their own ports (the policy refuses one by port); /sse streams, /slow takes a while."""

    allowed: URL
    refused: URL
    slow_started: asyncio.Event = field(default_factory=asyncio.Event)
    release_slow: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
async def upstreams() -> AsyncIterator[Upstreams]:
    state = Upstreams(URL(), URL())

    async def answer(request: web.Request) -> web.StreamResponse:
        if request.path == "/sse":
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for n in range(EVENTS):
                await response.write(event(n))
                await asyncio.sleep(EVENT_EVERY_S)
            await response.write_eof()
            return response
        if request.path == "/slow":
            state.slow_started.set()
            await state.release_slow.wait()
            return web.json_response({"slow": "done"})
        return web.json_response({"ok": request.path})

    def app() -> web.Application:
        application = web.Application()
        application.router.add_route("*", "/{tail:.*}", answer)
        return application

    async with running_app(app()) as state.allowed, running_app(app()) as state.refused:
        yield state
        state.release_slow.set()


def write_config(path: Path, tokens: Path, deny: list[str], extra: str = "") -> None:
    path.write_text(f"auth_token_file = {json.dumps(str(tokens))}\ntarget_deny = {json.dumps(deny)}\n"
                    f"log_format = \"json\"\n{extra}")


async def call(session: aiohttp.ClientSession, gateway: URL, upstream: URL, token: str,
               path: str = "/mcp") -> tuple[int, str]:
    headers = {MCP_PROXY_URL: str(upstream), "Authorization": f"Bearer {token}"}
    async with session.post(gateway / path.lstrip("/"), data=b"{}", headers=headers) as response:
        return response.status, await response.text()


async def wait_for_reloads(gateway: GatewayProcess, result: str, count: int) -> None:
    deadline = time.monotonic() + 10
    while metric_values(gateway.admin_url, "aenv_gateway_config_reloads_total")[f'result="{result}"'] < count:
        assert time.monotonic() < deadline, f"no {count} {result} reload(s)"
        await asyncio.sleep(0.05)


def code_of(body: str) -> str:
    return str(json.loads(body).get("code") or json.loads(body).get("error", {}).get("data", {}).get("code"))


@pytest.mark.parametrize("transport", ["lean", "aiohttp"])  # each reconfigures its own policy and pool
async def test_sighup_swaps_tokens_and_policy_while_a_stream_and_a_slow_call_finish(
    upstreams: Upstreams, transport: str, tmp_path: Path
) -> None:
    tokens, config = tmp_path / "tokens", tmp_path / "gateway.toml"
    tokens.write_text("old-token\n")
    write_config(config, tokens, deny=[])
    with gateway_process("--config", str(config), "--upstream-client", transport,
                         "--watch-interval", "0") as gateway:
        async with asyncio.timeout(TIMEOUT_S), aiohttp.ClientSession() as session:
            before = await call(session, gateway.url, upstreams.refused, "old-token")  # pooled, for the lean client
            stream_headers = {MCP_PROXY_URL: str(upstreams.allowed), "Authorization": "Bearer old-token"}
            stream = await session.get(gateway.url / "sse", headers=stream_headers)
            first = await stream.content.readuntil(b"\n\n")
            slow = asyncio.ensure_future(call(session, gateway.url, upstreams.allowed, "old-token", "/slow"))
            await upstreams.slow_started.wait()

            tokens.write_text("# rotated\nnew-token\n")
            write_config(config, tokens, deny=[f"127.0.0.1:{upstreams.refused.port}"])
            gateway.process.send_signal(signal.SIGHUP)
            await wait_for_reloads(gateway, "ok", 1)

            old_token = await call(session, gateway.url, upstreams.allowed, "old-token")
            new_token = await call(session, gateway.url, upstreams.allowed, "new-token")
            now_refused = await call(session, gateway.url, upstreams.refused, "new-token")
            upstreams.release_slow.set()
            slow_answer = await slow
            rest = await stream.content.read()
            stream.release()
        logged = stop(gateway)

    assert before == (200, '{"ok": "/mcp"}')
    assert (first + rest).decode() == "".join(event(n).decode() for n in range(EVENTS))  # every event, in order
    assert slow_answer == (200, '{"slow": "done"}')
    assert (old_token[0], code_of(old_token[1])) == (401, "unauthorized")
    assert new_token == (200, '{"ok": "/mcp"}')
    assert (now_refused[0], code_of(now_refused[1])) == (403, "target_forbidden")
    [reloaded] = [json.loads(line) for line in logged.splitlines() if '"config_reloaded"' in line]
    assert (reloaded["cause"], reloaded["changed"], reloaded["needs_restart"], reloaded["auth_tokens"]) == (
        "SIGHUP", ["target_deny", "auth_tokens"], [], 1)
    assert "old-token" not in logged and "new-token" not in logged


async def test_an_invalid_configuration_on_sighup_is_refused_whole_and_the_running_one_stays(
    upstreams: Upstreams, tmp_path: Path
) -> None:
    tokens, config = tmp_path / "tokens", tmp_path / "gateway.toml"
    tokens.write_text("old-token\n")
    write_config(config, tokens, deny=[])
    with gateway_process("--config", str(config), "--watch-interval", "0") as gateway:
        async with asyncio.timeout(TIMEOUT_S), aiohttp.ClientSession() as session:
            tokens.write_text("new-token\n")  # valid on its own, but goes with a broken file
            write_config(config, tokens, deny=["not a rule!"], extra="max_streams = 5\n")
            gateway.process.send_signal(signal.SIGHUP)
            await wait_for_reloads(gateway, "failed", 1)
            old_still = await call(session, gateway.url, upstreams.allowed, "old-token")
            new_not_yet = await call(session, gateway.url, upstreams.allowed, "new-token")

            write_config(config, tokens, deny=[],
                         extra='upstream_max_idle = 7\nschedule_type = "standard"\nlog_level = "warning"\n')
            gateway.process.send_signal(signal.SIGHUP)
            await wait_for_reloads(gateway, "ok", 1)
            new_now = await call(session, gateway.url, upstreams.allowed, "new-token")
        logged = stop(gateway)

    assert old_still == (200, '{"ok": "/mcp"}')
    assert new_not_yet[0] == 401
    assert new_now == (200, '{"ok": "/mcp"}')
    [failed] = [json.loads(line) for line in logged.splitlines() if '"config_reload_failed"' in line]
    assert failed["error"].startswith("--target-deny: ['not a rule!'] from target_deny in ")
    [reloaded] = [json.loads(line) for line in logged.splitlines() if '"config_reloaded"' in line]
    # An engine and a pool size cannot change in place: named, and left as they run.
    assert (reloaded["level"], reloaded["needs_restart"]) == ("warning", ["schedule_type", "upstream_max_idle"])
    assert reloaded["changed"] == ["log_level", "auth_tokens"]
    # --log-level warning: the access lines of the two requests before the reload, none after it
    assert [json.loads(line)["status"] for line in logged.splitlines() if '"event":"request"' in line] == [200, 401]


async def test_a_rotated_token_file_is_picked_up_by_the_watch_without_a_signal(
    upstreams: Upstreams, tmp_path: Path
) -> None:
    # A Kubernetes Secret volume: the file is a symlink through ..data, swapped to a new directory.
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "tokens").write_text("old-token\n")
    (tmp_path / "..data").symlink_to("v1")
    (tmp_path / "tokens").symlink_to("..data/tokens")
    with gateway_process("--auth-token-file", str(tmp_path / "tokens"), "--watch-interval", "0.2") as gateway:
        async with asyncio.timeout(TIMEOUT_S), aiohttp.ClientSession() as session:
            assert (await call(session, gateway.url, upstreams.allowed, "old-token"))[0] == 200
            (tmp_path / "v2").mkdir()
            (tmp_path / "v2" / "tokens").write_text("new-token\n")
            (tmp_path / "..data_tmp").symlink_to("v2")
            (tmp_path / "..data_tmp").rename(tmp_path / "..data")
            await wait_for_reloads(gateway, "ok", 1)
            statuses = [(await call(session, gateway.url, upstreams.allowed, token))[0]
                        for token in ("old-token", "new-token")]
        logged = stop(gateway)

    assert statuses == [401, 200]
    assert '"cause": "file_changed"' in logged


async def test_the_supervisor_forwards_sighup_and_every_worker_reloads(
    upstreams: Upstreams, start_supervisor: StartSupervisor, tmp_path: Path  # noqa: F811
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("old-token\n")
    supervised = await start_supervisor("--workers", "2", "--auth-token-file", str(tokens), "--log-format", "json",
                                        "--watch-interval", "0")
    [started] = await supervised.wait_for("supervisor_started")
    await supervised.wait_for("gateway_started", count=2)
    gateway = URL(f"http://127.0.0.1:{started['port']}")
    tokens.write_text("new-token\n")
    assert supervised.process.pid is not None
    supervised.process.send_signal(signal.SIGHUP)
    reloads = await supervised.wait_for("config_reloaded", count=2)

    async def fresh_call(token: str) -> int:  # a new connection each: the kernel spreads them over workers
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            return (await call(session, gateway, upstreams.allowed, token))[0]

    async with asyncio.timeout(TIMEOUT_S):
        old = [await fresh_call("old-token") for _ in range(12)]
        new = [await fresh_call("new-token") for _ in range(12)]

    assert [line["changed"] for line in reloads] == [["auth_tokens"], ["auth_tokens"]]
    assert (set(old), set(new)) == ({401}, {200})
    [forwarded] = [line for line in supervised.events if line.get("event") == "supervisor_reload_forwarded"]
    assert forwarded["workers"] == 2


def test_restart_only_settings_keep_their_running_values_and_are_named(tmp_path: Path) -> None:
    running = Settings(port=8081, workers=1, max_streams=3)
    wanted = Settings(port=9000, workers=4, max_streams=7, tls_cert="/x.crt", tls_key="/x.key")

    kept, names = keep_running(wanted, running)

    assert (kept.port, kept.workers, kept.max_streams, kept.tls_cert) == (8081, 1, 7, None)
    assert names == ["port", "workers", "tls_cert"]
    assert set(RESTART_ONLY) <= {name for name in Settings.__dataclass_fields__}


def test_changed_names_never_carry_a_value(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("one\n")
    running = build_configuration(Settings(auth_token_file=str(tokens), arca_api_key="key-one"))
    tokens.write_text("two\nthree\n")
    new = build_configuration(Settings(auth_token_file=str(tokens), arca_api_key="key-two", max_streams=2))

    names = changed_names(running, new)

    assert names == ["arca_api_key", "max_streams", "auth_tokens"]
    assert not re.search(r"one|two|three|key-", " ".join(names))
