"""Shared fixtures: a recording upstream and an echoing one on 127.0.0.1, a gateway, settings factories."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pytest
from aiohttp import web
from aiohttp.test_utils import BaseTestServer, TestClient
from multidict import CIMultiDict
from pytest_aiohttp import AiohttpClient, AiohttpServer
from yarl import URL

from gateway.app import DATA_PLANE, DataPlaneRunner, build_gateway_app
from gateway.config import Settings

# Every test that runs a gateway over sockets runs once per upstream transport (issue #6).
UPSTREAM_CLIENTS = ("lean", "aiohttp")
_SOCKET_FIXTURES = frozenset({"aiohttp_client", "aiohttp_server", "upstream"})
_current_upstream_client = ["lean"]


def pytest_report_header() -> str:
    """Which form of the gateway the suite runs on: `make test` the pure one, `make test-compiled` the other."""
    from gateway.cli import build_form

    return f"gateway: {build_form()}"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to test compiled modules older than their source: the .py edited since would not be what runs."""
    stale = [str(source) for source in Path("gateway").rglob("*.py")
             if any(compiled.stat().st_mtime < source.stat().st_mtime
                    for compiled in source.parent.glob(f"{source.stem}.*.so"))]
    if stale:
        pytest.exit(f"compiled modules older than {', '.join(stale)}: run make compile (or make pure)", returncode=2)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "upstream_client" in metafunc.fixturenames and _SOCKET_FIXTURES & set(metafunc.fixturenames):
        metafunc.parametrize("upstream_client", UPSTREAM_CLIENTS, indirect=True)


@pytest.fixture(autouse=True)
def upstream_client(request: pytest.FixtureRequest) -> Iterator[str]:
    """The transport gateway_settings() picks: each in turn for socket tests, lean elsewhere."""
    name: str = getattr(request, "param", "lean")
    _current_upstream_client[0] = name
    yield name
    _current_upstream_client[0] = "lean"


def gateway_settings(**overrides: Any) -> Settings:
    """Settings for a gateway under test: loopback, ephemeral ports, short timeouts."""
    base = Settings(host="127.0.0.1", port=0, admin_port=0, connect_timeout_s=2.0, idle_timeout_s=10.0,
                    upstream_client=_current_upstream_client[0])
    return dataclasses.replace(base, **overrides)


class DataPlaneTestServer(BaseTestServer):
    """aiohttp's TestServer, serving a gateway app with the CLI's runner (DataPlaneRunner) and server."""

    def __init__(self, app: web.Application) -> None:
        super().__init__()
        self.app = app

    async def _make_runner(self, **kwargs: Any) -> DataPlaneRunner:
        return DataPlaneRunner(self.app, **kwargs)


@pytest.fixture
def aiohttp_client(aiohttp_client: AiohttpClient) -> AiohttpClient:
    """pytest-aiohttp's, except that a gateway app is served as the CLI serves it (DataPlaneTestServer)."""

    async def client(target: Any, **kwargs: Any) -> TestClient[Any, Any]:
        if isinstance(target, web.Application) and DATA_PLANE in target:
            target = DataPlaneTestServer(target)
        started: TestClient[Any, Any] = await aiohttp_client(target, **kwargs)
        return started

    return client  # type: ignore[return-value]


@pytest.fixture
async def aiohttp_server(aiohttp_server: AiohttpServer) -> AsyncIterator[AiohttpServer]:
    """pytest-aiohttp's, except that a gateway app is served as the CLI serves it (DataPlaneTestServer)."""
    started: list[BaseTestServer] = []

    async def server(app: web.Application, **kwargs: Any) -> BaseTestServer:
        if DATA_PLANE in app:
            test_server = DataPlaneTestServer(app)
            await test_server.start_server(**kwargs)
            started.append(test_server)
            return test_server
        return await aiohttp_server(app, **kwargs)

    yield server  # type: ignore[misc]
    for test_server in started:
        await test_server.close()


async def serve_gateway(aiohttp_client: AiohttpClient, **overrides: Any) -> TestClient[Any, Any]:
    """The gateway app on 127.0.0.1, served as the CLI serves it, and a client that never decompresses."""
    return await aiohttp_client(build_gateway_app(gateway_settings(**overrides)), auto_decompress=False)


@dataclass(frozen=True, slots=True)
class Seen:
    """One request as the upstream received it."""

    method: str
    path_qs: str
    headers: CIMultiDict[str]
    body: bytes


@dataclass(slots=True)
class Upstream:
    url: URL
    seen: list[Seen] = field(default_factory=list)


@pytest.fixture
async def upstream(aiohttp_server: AiohttpServer) -> Upstream:
    """An upstream that records every request and answers {"ok": true}."""
    recorder = Upstream(url=URL("http://127.0.0.1"))

    async def record(request: web.Request) -> web.Response:
        body = await request.read()
        recorder.seen.append(Seen(request.method, request.raw_path, request.headers.copy(), body))
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    server = await aiohttp_server(app)
    recorder.url = server.make_url("")
    return recorder


# Every secret a test hands the gateway (arca keys, bearer tokens, auth-token files) contains this
# marker; no test's captured output (logs, stdout, stderr) may contain it, across the whole suite.
SECRET_MARKER: Final = "5ecret"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    leaked = [title for title, text in report.sections if SECRET_MARKER in text]
    if leaked and report.passed:
        report.outcome = "failed"
        report.longrepr = f"a secret (marked {SECRET_MARKER!r}) reached: {', '.join(leaked)}"


Gateway = TestClient[web.BaseRequest, web.Application]


@pytest.fixture
async def gateway(aiohttp_client: AiohttpClient) -> Gateway:
    return await serve_gateway(aiohttp_client)


@dataclass(slots=True)
class EchoUpstream:
    """Answers each request with its method and path; records (method, path, body) in order."""

    url: str
    seen: list[tuple[str, str, bytes]]


@pytest.fixture
async def echo(aiohttp_server: AiohttpServer) -> EchoUpstream:
    seen: list[tuple[str, str, bytes]] = []

    async def answer(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append((request.method, request.raw_path, body))
        return web.Response(body=f"{request.method} {request.raw_path}".encode())

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    server = await aiohttp_server(app)
    return EchoUpstream(str(server.make_url("")).rstrip("/"), seen)
