"""TLS and mTLS on the proxy port: real clients over https://, refused handshakes, certificate renewal.

Certificates are made per test module with `cryptography` (tests/certs.py). The gateway runs as the
program does (a subprocess, on uvloop), and in process on plain asyncio (pytest's loop), since the
two loops' TLS differ.
"""

from __future__ import annotations

import asyncio
import io
import re
import shutil
import signal
import socket
import ssl
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx2
import pytest
from aiohttp import web
from fastmcp import Client
from fastmcp.client.transports import StreamableHttpTransport
from mcp import ClientSession, types
from mcp.client.streamable_http import streamable_http_client
from yarl import URL

from gateway.app import PARTS, DataPlaneRunner, build_gateway_app
from gateway.config import Settings
from gateway.configuration import load_configuration
from gateway.errors import ConfigError
from gateway.handshake import FAILURE_REASONS, failure_reason
from gateway.headers import MCP_PROXY_URL
from gateway.metrics import TLS_FAILURE_REASONS
from gateway.tls import build_server_context
from tests.certs import Authority, Issued, client_context, peer_serial
from tests.conftest import gateway_settings
from tests.mcp_upstream import McpUpstream, running_example_server
from tests.process import GatewayProcess, gateway_process, run_gateway_command
from tests.raw_servers import running_app
from tests.test_sse import event

TIMEOUT_S = 20.0


@dataclass(frozen=True, slots=True)
class Pki:
    ca: Authority
    server: Issued
    client: Issued
    other_ca: Authority
    stranger: Issued  # a client certificate from a CA the gateway does not trust


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, other_ca = Authority.create(directory, "ca"), Authority.create(directory, "other-ca")
    return Pki(ca, ca.issue("server", server=True), ca.issue("client", server=False), other_ca,
               other_ca.issue("stranger", server=False))


def tls_args(pki: Pki, cert: Path | None = None, key: Path | None = None, mtls: bool = True) -> list[str]:
    args = ["--tls-cert", str(cert or pki.server.cert), "--tls-key", str(key or pki.server.key)]
    return [*args, "--tls-client-ca", str(pki.ca.cert)] if mtls else args


def https(gateway: GatewayProcess) -> URL:
    return gateway.url.with_scheme("https")


def metric_values(admin_url: URL, name: str) -> dict[str, float]:
    with urllib.request.urlopen(str(admin_url / "metrics"), timeout=5) as response:
        text = response.read().decode()
    return {labels: float(value) for labels, value in re.findall(rf"^{name}{{(.*?)}} (\S+)$", text, re.MULTILINE)}


def stop(gateway: GatewayProcess) -> str:
    """SIGTERM, then everything it logged."""
    gateway.process.send_signal(signal.SIGTERM)
    stdout, _ = gateway.process.communicate(timeout=15)
    return stdout


def handshake(port: int, context: ssl.SSLContext) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return context.wrap_socket(sock, server_hostname="127.0.0.1")


def refused(port: int, context: ssl.SSLContext | None) -> bytes | str:
    """What a client gets from a handshake the gateway refuses: a TLS alert (as an error) or the close."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        if context is None:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            return sock.recv(100)
        try:
            with context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # TLS 1.3: the alert comes after
                return tls.recv(100)
        except (ssl.SSLError, ConnectionResetError) as exc:
            return exc.__class__.__name__


def get_health(tls: ssl.SSLSocket) -> bytes:
    tls.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    return tls.recv(4096)


# -- configuration ----------------------------------------------------------------------------------


def test_bad_tls_files_stop_startup_with_one_line_naming_the_setting(pki: Pki, tmp_path: Path) -> None:
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    missing = str(tmp_path / "missing.pem")
    cert, key, ca = str(pki.server.cert), str(pki.server.key), str(pki.ca.cert)
    cases = [
        (["--tls-cert", missing, "--tls-key", key], f"--tls-cert: cannot read {missing}: No such file or directory"),
        (["--tls-cert", str(not_pem), "--tls-key", key], f"--tls-cert: {not_pem} holds no PEM certificate"),
        (["--tls-cert", str(broken), "--tls-key", key], f"--tls-cert: {broken} holds no valid PEM certificate"),
        (["--tls-cert", cert, "--tls-key", str(not_pem)], f"--tls-key: {not_pem} holds no PEM private key"),
        (["--tls-cert", cert, "--tls-key", str(pki.client.key)],
         f"--tls-key: {pki.client.key} is not the key of the certificate in {cert}"),
        (["--tls-cert", cert, "--tls-key", key, "--tls-client-ca", str(not_pem)],
         f"--tls-client-ca: {not_pem} holds no PEM CA certificates"),
        (["--tls-cert", cert], "--tls-key: --tls-cert is set without it; give both"),
        (["--tls-key", key], "--tls-cert: --tls-key is set without it; give both"),
        (["--tls-client-ca", ca], "--tls-client-ca: client certificates need TLS: set --tls-cert and --tls-key too"),
    ]
    for argv, message in cases:
        with pytest.raises(ConfigError) as caught:
            load_configuration(argv, {})
        assert str(caught.value).startswith(message), (argv, str(caught.value))


def test_an_encrypted_key_is_refused_without_asking_for_a_password(pki: Pki, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pki.server.key.read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"secret")))
    settings = Settings(tls_cert=str(pki.server.cert), tls_key=str(encrypted))

    with pytest.raises(ConfigError, match=f"^--tls-key: {encrypted} is encrypted; give an unencrypted key$"):
        build_server_context(settings)


def test_the_program_exits_2_with_one_line_on_a_bad_certificate(tmp_path: Path, pki: Pki) -> None:
    result = run_gateway_command(["--tls-cert", str(tmp_path / "none.crt"), "--tls-key", str(pki.server.key)])

    assert (result.returncode, result.stdout, result.stderr) == (
        2, "", f"mcp-gateway: error: --tls-cert: cannot read {tmp_path / 'none.crt'}: No such file or directory\n")


def test_the_server_context_speaks_tls_1_2_and_up_and_http_1_1_with_client_certificates(pki: Pki) -> None:
    context = build_server_context(Settings(tls_cert=str(pki.server.cert), tls_key=str(pki.server.key),
                                            tls_client_ca=str(pki.ca.cert)))

    assert context is not None
    assert (context.minimum_version, context.verify_mode) == (ssl.TLSVersion.TLSv1_2, ssl.CERT_REQUIRED)


def test_every_failure_reason_is_a_metric_label_and_openssl_reasons_map_to_them() -> None:
    assert FAILURE_REASONS == TLS_FAILURE_REASONS
    assert failure_reason(ssl.SSLEOFError()) == "closed"
    no_cert = ssl.SSLError(1, "peer did not return a certificate")
    no_cert.reason = "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    surprise = ssl.SSLError(1, "?")
    surprise.reason = "SOMETHING_NEW"
    assert (failure_reason(no_cert), failure_reason(surprise)) == ("no_client_certificate", "other")


# -- the program, on uvloop ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def streamable_upstream() -> Iterator[McpUpstream]:
    with running_example_server("streamable-http") as upstream:
        yield upstream


async def test_official_mcp_client_and_fastmcp_call_tools_over_mtls(pki: Pki, streamable_upstream: McpUpstream,
                                                                    ) -> None:
    verify = client_context(pki.ca.cert, pki.client)
    route = {MCP_PROXY_URL: str(streamable_upstream.url)}
    with gateway_process(*tls_args(pki)) as gateway:
        url = str(https(gateway) / "mcp")
        async with asyncio.timeout(TIMEOUT_S):
            http_client = httpx2.AsyncClient(headers=route, verify=verify, timeout=httpx2.Timeout(10.0))
            async with (http_client, streamable_http_client(url, http_client=http_client) as (read, write),
                        ClientSession(read, write) as session):
                await session.initialize()
                official = await session.call_tool("add", {"a": 2, "b": 3})
            fastmcp_client = Client(transport=StreamableHttpTransport(url, headers=route, verify=verify), timeout=10)
            async with fastmcp_client:
                progress: list[float] = []

                async def on_progress(done: float, total: float | None, message: str | None) -> None:
                    progress.append(done)

                counted = await fastmcp_client.call_tool("count", {"n": 3, "delay_s": 0.05},
                                                         progress_handler=on_progress)
        with handshake(gateway.url.port or 0, verify) as tls:
            alpn = tls.selected_alpn_protocol()
            version = tls.version()

    [block] = official.content
    assert isinstance(block, types.TextContent) and block.text == "5"
    assert (counted.data, progress) == ("counted to 3", [1.0, 2.0, 3.0])
    assert alpn == "http/1.1" and version in ("TLSv1.2", "TLSv1.3")


async def test_sse_over_tls_is_relayed_event_by_event(pki: Pki) -> None:
    sent_at: list[float] = []

    async def paced(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for n in range(4):
            await asyncio.sleep(0.25)
            sent_at.append(time.monotonic())
            await response.write(event(n))
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/sse", paced)
    arrived: list[tuple[float, bytes]] = []
    async with running_app(app) as upstream:
        with gateway_process(*tls_args(pki, mtls=False)) as gateway:
            connector = aiohttp.TCPConnector(ssl=client_context(pki.ca.cert))
            async with asyncio.timeout(TIMEOUT_S), aiohttp.ClientSession(connector=connector) as session, \
                    session.get(https(gateway) / "sse", headers={MCP_PROXY_URL: str(upstream)}) as resp:
                buffer = b""
                async for chunk in resp.content.iter_any():
                    buffer += chunk
                    while b"\n\n" in buffer:
                        one, _, buffer = buffer.partition(b"\n\n")
                        arrived.append((time.monotonic(), one + b"\n\n"))

    assert [body for _, body in arrived] == [event(n) for n in range(4)]
    # Each event arrives before the next one is sent: nothing waits in a TLS buffer.
    assert all(at < sent_at[n + 1] for n, (at, _) in enumerate(arrived[:-1]))


def test_refused_handshakes_are_counted_by_reason_and_logged_once_per_reason(pki: Pki) -> None:
    untrusting = ssl.create_default_context(cafile=str(pki.other_ca.cert))
    with gateway_process(*tls_args(pki), "--log-format", "json") as gateway:
        port = gateway.url.port or 0
        no_certificate = refused(port, client_context(pki.ca.cert))
        wrong_ca = refused(port, client_context(pki.ca.cert, pki.stranger))
        plain = [refused(port, None) for _ in range(3)]
        client_refuses = refused(port, untrusting)
        with handshake(port, client_context(pki.ca.cert, pki.client)) as tls:
            answered = get_health(tls)
        counted = metric_values(gateway.admin_url, "aenv_gateway_tls_handshake_failures_total")
        logged = stop(gateway)

    assert no_certificate in ("SSLError", "ConnectionResetError", b"")
    assert wrong_ca in ("SSLError", "ConnectionResetError", b"")
    assert plain == [b"", b"", b""]  # no HTTP answer on a TLS port, only the close
    assert client_refuses == "SSLCertVerificationError"
    assert answered.startswith(b"HTTP/1.1 200 OK\r\n")
    assert {labels: value for labels, value in counted.items() if value} == {
        'reason="no_client_certificate"': 1.0, 'reason="untrusted_client_certificate"': 1.0,
        'reason="not_tls"': 3.0, 'reason="client_rejected_certificate"': 1.0}
    lines = [line for line in logged.splitlines() if '"tls_handshake_failed"' in line]
    assert sorted(re.search(r'"reason": "(\w+)"', line).group(1) for line in lines) == [  # type: ignore[union-attr]
        "client_rejected_certificate", "no_client_certificate", "not_tls", "untrusted_client_certificate"]
    assert '"verify_message": "unable to get local issuer certificate"' in logged


def test_a_renewed_certificate_reaches_new_connections_after_sighup_and_open_ones_keep_theirs(
    pki: Pki, tmp_path: Path
) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(pki.server.cert, cert)
    shutil.copy(pki.server.key, key)
    renewed = pki.ca.issue("server-renewed", server=True)
    trusting = client_context(pki.ca.cert, pki.client)
    with gateway_process(*tls_args(pki, cert, key), "--watch-interval", "0") as gateway:
        port = gateway.url.port or 0
        with handshake(port, trusting) as before:
            shutil.copy(renewed.cert, cert)
            shutil.copy(renewed.key, key)
            gateway.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while metric_values(gateway.admin_url, "aenv_gateway_config_reloads_total")['result="ok"'] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            with handshake(port, trusting) as after:
                new_serial = peer_serial(after)
                new_answer = get_health(after)
            old_answer = get_health(before)  # the connection made before the reload still serves
            old_serial = peer_serial(before)
        logged = stop(gateway)

    assert (old_serial, new_serial) == (pki.server.serial, renewed.serial)
    assert old_answer.startswith(b"HTTP/1.1 200 OK\r\n") and new_answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert '"changed": ["tls_files"]' in logged


# -- in process, on asyncio's own TLS ------------------------------------------------------------------


@asynccontextmanager
async def in_process_gateway(settings: Settings) -> AsyncIterator[tuple[web.Application, int]]:
    app = build_gateway_app(settings)
    runner = DataPlaneRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=app[PARTS].tls)
    await site.start()
    try:
        yield app, runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def test_on_asyncio_a_handshake_refused_is_counted_and_a_good_one_served(pki: Pki) -> None:
    settings = gateway_settings(tls_cert=str(pki.server.cert), tls_key=str(pki.server.key),
                                tls_client_ca=str(pki.ca.cert))
    async with in_process_gateway(settings) as (app, port):
        no_certificate = await asyncio.to_thread(refused, port, client_context(pki.ca.cert))
        plain = await asyncio.to_thread(refused, port, None)

        def good() -> bytes:
            with handshake(port, client_context(pki.ca.cert, pki.client)) as tls:
                return get_health(tls)

        answered = await asyncio.to_thread(good)
        exposition = app[PARTS].metrics.exposition().decode()

    assert no_certificate in ("SSLError", "ConnectionResetError", b"") and plain == b""
    assert answered.startswith(b"HTTP/1.1 200 OK\r\n")
    assert 'aenv_gateway_tls_handshake_failures_total{reason="no_client_certificate"} 1.0' in exposition
    assert 'aenv_gateway_tls_handshake_failures_total{reason="not_tls"} 1.0' in exposition


async def test_large_bodies_both_ways_and_a_refusal_over_tls(pki: Pki) -> None:
    big = bytes(range(256)) * (8 * 1024 * 4)  # 8 MiB

    async def echo(request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            return web.Response(body=await request.read())
        response = web.StreamResponse()
        response.content_length = len(big)
        await response.prepare(request)
        for offset in range(0, len(big), 256 * 1024):
            await response.write(big[offset:offset + 256 * 1024])
        return response

    app = web.Application(client_max_size=len(big))
    app.router.add_route("*", "/{tail:.*}", echo)
    upload = big[: 3 * 1024 * 1024]
    async with running_app(app) as upstream:
        with gateway_process(*tls_args(pki, mtls=False), "--max-body-size", str(4 * 1024 * 1024)) as gateway:
            route = {MCP_PROXY_URL: str(upstream)}
            connector = aiohttp.TCPConnector(ssl=client_context(pki.ca.cert), limit=1)
            async with asyncio.timeout(TIMEOUT_S), aiohttp.ClientSession(connector=connector) as session:
                async with session.post(https(gateway) / "mcp", data=io.BytesIO(upload), headers=route) as posted:
                    echoed = (posted.status, await posted.read())
                async with session.get(https(gateway) / "big", headers=route) as fetched:
                    received = bytearray()
                    while chunk := await fetched.content.read(64 * 1024):
                        received += chunk
                        await asyncio.sleep(0.001)  # a slow reader: the gateway's writes wait for it
                async with session.post(https(gateway) / "mcp", data=io.BytesIO(big[: 5 * 1024 * 1024]),
                                        headers=route) as refused_:
                    too_large = (refused_.status, await refused_.json())

    assert echoed == (200, upload)
    assert (fetched.status, bytes(received) == big) == (200, True)
    assert (too_large[0], too_large[1]["code"]) == (413, "body_too_large")
