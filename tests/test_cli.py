"""The program as a user starts it: exit codes, one-line errors, serving, signals."""

from __future__ import annotations

import asyncio
import gc
import signal
import socket

from aiohttp import ClientSession, web
from pytest_aiohttp import AiohttpServer

from gateway.cli import GC_THRESHOLDS, settle_garbage_collector
from gateway.headers import MCP_PROXY_URL
from tests.process import free_port, gateway_process, run_gateway_command
from tests.test_sse import event, silent_upstream


def test_bad_flag_value_stops_startup_with_one_line_and_exit_2() -> None:
    result = run_gateway_command(["--port", "abc"])

    assert (result.returncode, result.stdout, result.stderr) == (
        2, "", "mcp-gateway: error: --port: 'abc' from --port is not valid\n")


def test_bad_environment_value_and_unknown_engine_are_refused() -> None:
    bad_env = run_gateway_command([], env={"GATEWAY_SCHEDULE_TYPE": "nomad"})
    unknown_flag = run_gateway_command(["--bogus"])

    assert (bad_env.returncode, bad_env.stderr) == (
        2, "mcp-gateway: error: --schedule-type: 'nomad' from GATEWAY_SCHEDULE_TYPE must be one of arca, faas, "
           "k8s, standard\n")
    assert (unknown_flag.returncode, unknown_flag.stderr) == (
        2, "mcp-gateway: error: unrecognized arguments: --bogus\n")


def test_port_in_use_is_one_line_and_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_gateway_command(["--host", "127.0.0.1", "--port", str(port), "--admin-port", str(free_port())])

    assert result.returncode == 2
    assert result.stderr.startswith("mcp-gateway: error: cannot listen: ") and result.stderr.count("\n") == 1


def test_help_lists_every_flag_with_its_environment_variable() -> None:
    result = run_gateway_command(["--help"])

    assert result.returncode == 0
    for flag, env in [("--host", "GATEWAY_HOST"), ("--port", "GATEWAY_PORT"), ("--admin-port", "GATEWAY_ADMIN_PORT"),
                      ("--schedule-type", "GATEWAY_SCHEDULE_TYPE"), ("--config", "GATEWAY_CONFIG"),
                      ("--arca-base-url", "ARCA_BASE_URL"), ("--arca-api-key", "ARCA_API_KEY")]:
        assert flag in result.stdout and env in result.stdout


async def test_serves_proxy_and_admin_ports_and_exits_0_on_sigterm(aiohttp_server: AiohttpServer) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"path": request.raw_path, "body": (await request.read()).decode()})

    app = web.Application()
    app.router.add_post("/{tail:.*}", hello)
    upstream = await aiohttp_server(app)

    with gateway_process("--config", "config/gateway.toml") as gateway:
        async with ClientSession() as client:
            proxied = await client.post(gateway.url / "mcp", data=b"{}",
                                        headers={MCP_PROXY_URL: str(upstream.make_url(""))})
            health = await client.get(gateway.url / "health")
            healthz = await client.get(gateway.admin_url / "healthz")
            readyz = await client.get(gateway.admin_url / "readyz")

            assert (proxied.status, await proxied.json()) == (200, {"path": "/mcp", "body": "{}"})
            assert (health.status, await health.json()) == (200, {"status": "ok", "engine": "k8s"})
            assert (healthz.status, readyz.status) == (200, 200)

        gateway.process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(gateway.process.wait, 10) == 0


async def test_program_closes_the_upstream_when_an_sse_client_leaves(aiohttp_server: AiohttpServer) -> None:
    # Regression guard for aiohttp's default: AppRunner does not cancel handlers on disconnect.
    server, upstream_gone = await silent_upstream(aiohttp_server)

    with gateway_process() as gateway:
        async with ClientSession() as client:
            resp = await client.get(gateway.url / "sse", headers={MCP_PROXY_URL: str(server.make_url(""))})
            assert await resp.content.readuntil(b"\n\n") == event(0)
            resp.close()

            async with asyncio.timeout(3):
                await upstream_gone.wait()


def test_the_garbage_collector_is_settled_once_the_program_is_built() -> None:
    """Startup objects frozen out of every collection, young ones collected less often (docs/performance.md)."""
    thresholds = gc.get_threshold()
    try:
        settle_garbage_collector()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 10_000  # the modules and everything built at startup
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
