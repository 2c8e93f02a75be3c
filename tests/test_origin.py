"""DNS-rebinding protection (issue #13): Origin and, with --allow-host, Host. Pure rules, then over sockets."""

from __future__ import annotations

import io
import json

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from pytest_aiohttp import AiohttpClient

from gateway.admin import Readiness
from gateway.app import build_admin_app, build_gateway_app
from gateway.errors import HostForbidden, OriginForbidden
from gateway.headers import MCP_PROXY_URL
from gateway.log import configure_logging
from gateway.metrics import Metrics
from gateway.origin import OriginPolicy, canonical_origin
from tests.conftest import Upstream, gateway_settings, serve_gateway
from tests.test_observability import samples

DEFAULT = OriginPolicy.build((), ())


@pytest.mark.parametrize("origin", [
    "http://localhost", "http://localhost:6274", "https://localhost:8443", "http://127.0.0.1:3000",
    "http://[::1]:8080", "http://[::1]", "HTTP://LOCALHOST:80",
])
def test_loopback_origins_pass_by_default(origin: str) -> None:
    DEFAULT.check({"Origin": origin})


@pytest.mark.parametrize("origin", [
    "http://evil.example.com", "http://localhost.evil.example.com", "http://127.0.0.1.nip.io",
    "http://127.0.0.2", "null", "file://", "chrome-extension://abcdef", "http://localhost/path",
    "http://localhost:99999", "", "http://user@localhost",
])
def test_other_origins_are_refused_by_default(origin: str) -> None:
    with pytest.raises(OriginForbidden, match="is not allowed: only loopback origins and --allow-origin"):
        DEFAULT.check({"Origin": origin})


def test_requests_without_origin_pass() -> None:
    DEFAULT.check({"Host": "evil.example.com"})


def test_allowed_origins_match_exactly_after_canonicalisation() -> None:
    policy = OriginPolicy.build(("https://app.example.com", "http://tools.example.com:8080"), ())

    policy.check({"Origin": "https://APP.example.com:443"})
    policy.check({"Origin": "http://tools.example.com:8080"})
    for refused in ("http://app.example.com", "https://app.example.com:8443", "http://tools.example.com"):
        with pytest.raises(OriginForbidden):
            policy.check({"Origin": refused})


def test_a_star_turns_the_origin_check_off() -> None:
    policy = OriginPolicy.build(("*",), ())
    policy.check({"Origin": "http://evil.example.com"})
    assert not policy.checks_anything


def test_allowed_hosts_with_and_without_a_port() -> None:
    policy = OriginPolicy.build(("*",), ("gw.example.com", "127.0.0.1:8081", "[::1]:8081"))

    for host in ("gw.example.com", "GW.example.com:9999", "gw.example.com.", "127.0.0.1:8081", "[::1]:8081"):
        policy.check({"Host": host})
    for host in ("evil.example.com", "127.0.0.1", "127.0.0.1:8082", "gw.example.com.evil", "[::1]"):
        with pytest.raises(HostForbidden, match="is not one of this gateway's names"):
            policy.check({"Host": host})
    with pytest.raises(HostForbidden, match=r"Host \(none\)"):
        policy.check({})


@given(st.text(max_size=60))
def test_any_origin_value_either_passes_or_is_refused_with_403(origin: str) -> None:
    try:
        DEFAULT.check({"Origin": origin})
    except OriginForbidden as refused:
        assert refused.status == 403
        assert len(refused.message) < 400
    else:
        canonical = canonical_origin(origin)
        assert canonical is not None
        scheme, _, authority = canonical.partition("://")
        host = authority.partition("]")[0] + "]" if authority.startswith("[") else authority.partition(":")[0]
        assert (scheme, host) in {(scheme, "localhost"), (scheme, "127.0.0.1"), (scheme, "[::1]")}
        assert scheme in ("http", "https")


# Over sockets: the conformance suite's dns-rebinding-protection request, and what it is told.

EVIL = {"Host": "evil.example.com", "Origin": "http://evil.example.com"}
INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}


async def test_a_rebinding_request_is_refused_logged_and_counted_and_never_forwarded(
    upstream: Upstream, aiohttp_client: AiohttpClient
) -> None:
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream, cache=False)
    metrics = Metrics.build(CollectorRegistry())
    try:
        gateway = await aiohttp_client(build_gateway_app(gateway_settings(), metrics=metrics))
        admin = await aiohttp_client(build_admin_app(Readiness(ready=True), metrics))
        route: dict[str, str] = {MCP_PROXY_URL: str(upstream.url)}
        json_rpc = await gateway.post("/mcp", json=INITIALIZE, headers={**route, **EVIL})
        plain = await gateway.get("/mcp", headers={**route, **EVIL})
        local = await gateway.post("/mcp", json=INITIALIZE, headers={**route, "Origin": "http://localhost:6274"})
        text = await (await admin.get("/metrics")).text()
        bodies = (await json_rpc.json(), await plain.json())
    finally:
        structlog.reset_defaults()

    message = ("Origin http://evil.example.com is not allowed: only loopback origins and --allow-origin are "
               "accepted (DNS-rebinding protection)")
    assert (json_rpc.status, plain.status, local.status) == (403, 403, 200)
    assert bodies == (
        {"jsonrpc": "2.0", "id": 1, "error": {"code": -32011, "message": message,
                                              "data": {"status": 403, "code": "origin_forbidden"}}},
        {"error": message, "code": "origin_forbidden"},
    )
    assert len(upstream.seen) == 1  # only the loopback origin's call
    refused_lines = [line for line in map(json.loads, stream.getvalue().splitlines())
                     if line["event"] == "request" and line["status"] == 403]
    assert [(line["outcome"], line["code"], "upstream_error" in line) for line in refused_lines] == [
        ("refused", "origin_forbidden", False)] * 2
    assert samples(text, "aenv_gateway_refused_requests_total") == {
        (("reason", "origin_forbidden"), ("status", "403")): 2.0}
    assert samples(text, "aenv_gateway_upstream_errors_total")[(("kind", "policy"),)] == 0.0


async def test_allow_origin_star_lets_any_origin_through(upstream: Upstream, aiohttp_client: AiohttpClient) -> None:
    gateway = await serve_gateway(aiohttp_client, allow_origin=("*",))

    answered = await gateway.post("/mcp", json=INITIALIZE, headers={MCP_PROXY_URL: str(upstream.url), **EVIL})

    assert answered.status == 200


async def test_allow_host_refuses_other_hosts(upstream: Upstream, aiohttp_client: AiohttpClient) -> None:
    gateway = await serve_gateway(aiohttp_client, allow_host=("127.0.0.1",))
    route: dict[str, str] = {MCP_PROXY_URL: str(upstream.url)}

    ours = await gateway.post("/mcp", json=INITIALIZE, headers=route)  # the test client sends Host: 127.0.0.1:port
    other = await gateway.post("/mcp", json=INITIALIZE, headers={**route, "Host": "evil.example.com"})

    assert (ours.status, other.status, (await other.json())["error"]["data"]) == (
        200, 403, {"status": 403, "code": "host_forbidden"})
