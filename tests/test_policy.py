"""Target policy: rule parsing and decisions (pure), and the connect-time seam over real sockets."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pytest_aiohttp import AiohttpClient
from yarl import URL

from gateway.app import build_gateway_app
from gateway.engines.proxy_url import ProxyUrlEngine
from gateway.errors import MalformedHeader, TargetForbidden
from gateway.headers import MCP_PROXY_URL
from gateway.policy import TargetPolicy
from gateway.rules import Rule, literal_address
from gateway.upstream import AiohttpClient as Transport
from tests.conftest import Upstream, gateway_settings

METADATA = "built-in: link-local and cloud metadata 169.254.0.0/16"


@pytest.mark.parametrize(("spelling", "address"), [
    ("169.254.169.254", "169.254.169.254"),
    ("2852039166", "169.254.169.254"),
    ("0xa9.254.169.254", "169.254.169.254"),
    ("0XA9.0xFE.0xa9.0xfe", "169.254.169.254"),
    ("0251.0376.0251.0376", "169.254.169.254"),
    ("169.254.169.254.", "169.254.169.254"),
    ("::ffff:a9fe:a9fe", "169.254.169.254"),
    ("[::ffff:169.254.169.254]", "169.254.169.254"),
    ("127.1", "127.0.0.1"),
    ("FD00:EC2::254", "fd00:ec2::254"),
    ("metadata.internal", None),
    ("cafe.be", None),
    ("1.2.3.4 extra", None),
])
def test_literal_address_reads_every_spelling_getaddrinfo_would(spelling: str, address: str | None) -> None:
    assert literal_address(spelling) == address


@pytest.mark.parametrize(("text", "rule"), [
    ("10.0.0.0/8", Rule("10.0.0.0/8", network=ipaddress.ip_network("10.0.0.0/8"))),
    ("10.1.2.3:8081", Rule("10.1.2.3:8081", network=ipaddress.ip_network("10.1.2.3/32"), port=8081)),
    ("[fd00::/8]:8081", Rule("[fd00::/8]:8081", network=ipaddress.ip_network("fd00::/8"), port=8081)),
    (":8081", Rule(":8081", port=8081)),
    ("*.svc.cluster.local:8081", Rule("*.svc.cluster.local:8081", host="*.svc.cluster.local", port=8081)),
    ("Sandbox.Internal.", Rule("Sandbox.Internal.", host="sandbox.internal")),
])
def test_rules_parse(text: str, rule: Rule) -> None:
    assert Rule.parse(text) == rule


@pytest.mark.parametrize("text", ["", "*", "10.0.0.0/8:0", "10.0.0.0/8:70000", "bad rule", "http://x"])
def test_bad_rules_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"^must"):
        Rule.parse(text)


def test_defaults_allow_loopback_and_refuse_metadata_and_own_ports() -> None:
    policy = TargetPolicy.from_settings(gateway_settings(host="0.0.0.0", port=8081, admin_port=8082))
    decisions = {
        (address, port): policy.refusal(None, address, port)
        for address, port in [("127.0.0.1", 9000), ("10.1.2.3", 8081), ("127.0.0.1", 8081), ("::1", 8082),
                              ("169.254.169.254", 80), ("100.100.100.200", 80), ("fd00:ec2::254", 80),
                              ("fe80::1", 80), ("0.0.0.0", 9000), ("::", 9000)]
    }
    assert decisions == {
        ("127.0.0.1", 9000): None,
        ("10.1.2.3", 8081): None,
        ("127.0.0.1", 8081): "built-in: the gateway's own port 8081 on 127.0.0.0/8",
        ("::1", 8082): "built-in: the gateway's own port 8082 on ::1/128",
        ("169.254.169.254", 80): METADATA,
        ("100.100.100.200", 80): "built-in: cloud metadata 100.100.100.200",
        ("fd00:ec2::254", 80): "built-in: cloud metadata fd00:ec2::254",
        ("fe80::1", 80): "built-in: link-local fe80::/10",
        ("0.0.0.0", 9000): "built-in: unspecified 0.0.0.0/8",
        ("::", 9000): "built-in: unspecified ::",
    }


def test_allow_list_is_strict_and_deny_wins() -> None:
    policy = TargetPolicy(allow=["10.0.0.0/8:8081", "*.svc.local"], deny=["10.9.0.0/16"])
    assert [
        policy.refusal(None, "10.1.2.3", 8081),
        policy.refusal(None, "10.1.2.3", 22),
        policy.refusal(None, "10.9.0.1", 8081),
        policy.refusal("a.svc.local", "192.168.1.1", 80),
        policy.refusal(None, "192.168.1.1", 80),
    ] == [None, "not in target_allow", "target_deny 10.9.0.0/16", None, "not in target_allow"]


def test_only_a_specific_allow_rule_lifts_a_builtin_denial() -> None:
    broad = TargetPolicy(allow=["0.0.0.0/0"])
    specific = TargetPolicy(allow=["169.254.10.0/24:8080"])
    assert broad.refusal(None, "169.254.169.254", 80) == METADATA
    assert specific.refusal(None, "169.254.10.7", 8080) is None
    assert specific.refusal(None, "169.254.169.254", 80) == METADATA


async def test_a_name_is_refused_if_any_address_it_resolves_to_is_refused() -> None:
    policy = TargetPolicy(deny=["127.0.0.0/8"])
    with pytest.raises(TargetForbidden, match=r"127\.0\.0\.1:80 is refused by rule: target_deny 127\.0\.0\.0/8"):
        await policy.resolve_allowed("localhost.", 80)


async def test_the_gateway_answers_403_naming_the_rule(aiohttp_client: AiohttpClient) -> None:
    gateway = await aiohttp_client(build_gateway_app(gateway_settings()))

    response = await gateway.get("/mcp", headers={MCP_PROXY_URL: "http://0xa9.254.169.254:80"})

    assert (response.status, await response.json()) == (403, {
        "error": f"target 169.254.169.254:80 is refused by rule: {METADATA}",
        "code": "target_forbidden",
        "rule": METADATA,
    })


async def test_a_name_is_checked_at_connect_time_through_the_resolver(
    upstream: Upstream, aiohttp_client: AiohttpClient
) -> None:
    gateway = await aiohttp_client(build_gateway_app(gateway_settings(target_deny=("127.0.0.0/8",))))

    response = await gateway.get("/mcp", headers={MCP_PROXY_URL: f"http://localhost:{upstream.url.port}"})

    assert (response.status, await response.json()) == (403, {
        "error": f"target 127.0.0.1:{upstream.url.port} is refused by rule: target_deny 127.0.0.0/8",
        "code": "target_forbidden",
        "rule": "target_deny 127.0.0.0/8",
    })
    assert upstream.seen == []


async def test_the_gateways_own_port_is_refused(upstream: Upstream, aiohttp_client: AiohttpClient) -> None:
    # Pretend the upstream's port is the gateway's own: what a request for itself looks like.
    port = upstream.url.port
    assert port is not None
    gateway = await aiohttp_client(build_gateway_app(gateway_settings(admin_port=port)))

    response = await gateway.get("/mcp", headers={MCP_PROXY_URL: f"http://127.0.0.1:{port}"})

    rule = f"built-in: the gateway's own port {port} on 127.0.0.0/8"
    assert (response.status, await response.json()) == (403, {
        "error": f"target 127.0.0.1:{port} is refused by rule: {rule}", "code": "target_forbidden", "rule": rule})
    assert upstream.seen == []


async def test_an_allowed_odd_spelling_is_proxied(upstream: Upstream, aiohttp_client: AiohttpClient) -> None:
    gateway = await aiohttp_client(build_gateway_app(gateway_settings()))
    odd = f"http://2130706433:{upstream.url.port}"  # 127.0.0.1 as one decimal number

    response = await gateway.post("/mcp", data=b"{}", headers={MCP_PROXY_URL: odd})

    assert (response.status, await response.json()) == (200, {"ok": True})
    assert [(seen.method, seen.path_qs, seen.body) for seen in upstream.seen] == [("POST", "/mcp", b"{}")]


# --- fuzzing: no forbidden address is ever connected to, whatever the spelling -----------------

def _spellings(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> st.SearchStrategy[str]:
    if isinstance(address, ipaddress.IPv6Address):
        return st.sampled_from([f"[{address}]", f"[{address.exploded.upper()}]"])
    octets = address.packed
    return st.sampled_from([
        str(address),
        f"{address}.",
        str(int(address)),
        hex(int(address)),
        ".".join(hex(o) for o in octets),
        ".".join(f"0{o:o}" for o in octets),
        f"{octets[0]}.{int.from_bytes(octets[1:], 'big')}",
        f"[::ffff:{address}]",
        f"[::ffff:{octets[0]:02x}{octets[1]:02x}:{octets[2]:02x}{octets[3]:02x}]",
    ])


def _addresses_in(cidr: str) -> st.SearchStrategy[Any]:
    network = ipaddress.ip_network(cidr)
    return st.integers(0, network.num_addresses - 1).map(lambda i: network[i])


forbidden = st.one_of(
    st.tuples(st.one_of(_addresses_in("169.254.0.0/16"), _addresses_in("0.0.0.0/8"), _addresses_in("fe80::/10"),
                        st.just(ipaddress.ip_address("100.100.100.200")),
                        st.just(ipaddress.ip_address("fd00:ec2::254"))),
              st.integers(1, 65535)),
    st.tuples(_addresses_in("127.0.0.0/8"), st.sampled_from([8081, 8082])),
)


@pytest.fixture(scope="module")
def transport() -> Iterator[tuple[asyncio.AbstractEventLoop, Transport, list[Any]]]:
    connects: list[Any] = []

    def recording_socket(addr_info: Any) -> socket.socket:
        family, type_, proto, _, sockaddr = addr_info
        connects.append(sockaddr)
        return socket.socket(family, type_, proto)

    loop = asyncio.new_event_loop()
    settings_ = gateway_settings(host="0.0.0.0", port=8081, admin_port=8082, connect_timeout_s=0.2,
                                 connect_retry_budget_s=0.0)
    client = loop.run_until_complete(_make_transport(settings_, recording_socket))
    yield loop, client, connects
    loop.run_until_complete(client.close())
    loop.close()


async def _make_transport(settings_: Any, factory: Any) -> Transport:
    return Transport(settings_, socket_factory=factory)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), target=forbidden, prefix=st.sampled_from(["", "/", "/api", "/x?y=1"]),
       path=st.sampled_from(["/", "/mcp", "/sse?x=1", "/messages/?session_id=a"]))
def test_no_forbidden_address_is_ever_connected(
    transport: tuple[asyncio.AbstractEventLoop, Transport, list[Any]], data: st.DataObject,
    target: tuple[Any, int], prefix: str, path: str,
) -> None:
    # The routing header goes through the engine as in production; what it yields goes to the transport.
    loop, client, connects = transport
    address, port = target
    host = data.draw(_spellings(address))
    header = f"http://{host}:{port}{prefix}"
    try:
        resolved = ProxyUrlEngine(name="k8s").resolve({MCP_PROXY_URL: header}, path)
    except MalformedHeader:
        return  # refused before any routing: nothing to connect to
    connects.clear()

    with pytest.raises(TargetForbidden):
        loop.run_until_complete(client.request("GET", resolved.url, {}, None))

    assert connects == []


def test_the_connect_recorder_sees_allowed_connects(
    transport: tuple[asyncio.AbstractEventLoop, Transport, list[Any]],
) -> None:
    # The control for the fuzz test above: an allowed loopback port is really connected to.
    loop, client, connects = transport
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    connects.clear()

    with pytest.raises(ConnectionRefusedError):
        loop.run_until_complete(client.request("GET", URL(f"http://127.0.0.1:{port}/"), {}, None))

    assert connects == [("127.0.0.1", port)]


def test_target_rules_repeat_as_flags_and_split_on_commas_from_env() -> None:
    from gateway.config import load_settings

    from_flags = load_settings(["--target-allow", "10.0.0.0/8:8081", "--target-allow", "*.svc.local,:9000"], {})
    from_env = load_settings([], {"GATEWAY_TARGET_DENY": "10.0.0.5, [fd00::/8]:80"})
    assert (from_flags.target_allow, from_env.target_deny) == (
        ("10.0.0.0/8:8081", "*.svc.local", ":9000"), ("10.0.0.5", "[fd00::/8]:80"))


def test_a_bad_target_rule_stops_startup_naming_the_flag() -> None:
    from gateway.config import load_settings
    from gateway.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^--target-deny: \['10\.0\.0\.0/8:99999'\] from --target-deny must have"):
        load_settings(["--target-deny", "10.0.0.0/8:99999"], {})


@pytest.mark.parametrize(("path", "allow"), [
    ("config/gateway.toml", ()),
    ("config/cluster.toml", ("10.0.0.0/8:8081",)),
])
def test_the_shipped_config_files_load(path: str, allow: tuple[str, ...]) -> None:
    from pathlib import Path

    from gateway.config import load_settings

    root = Path(__file__).resolve().parent.parent
    settings = load_settings(["--config", str(root / path)], {})
    assert settings.target_allow == allow
    TargetPolicy.from_settings(settings)
