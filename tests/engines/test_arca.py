"""The arca engine as pure functions: settings, instance ids, path joining, injected headers."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict
from yarl import URL

from gateway.config import Settings, build_parser, load_settings
from gateway.engines import build_engine
from gateway.engines.arca import (
    INSTANCE_ID,
    REJECT_MESSAGE,
    ApiKey,
    ArcaEngine,
    ArcaRejectEngine,
    parse_instance_id,
    sandbox_url,
)
from gateway.errors import ConfigError, DataPlaneUnsupported, MalformedHeader, MalformedPath, MissingHeader
from gateway.headers import ENV_INSTANCE_ID, MCP_PROXY_URL, SANDBOX_API_KEY, SANDBOX_ID, upstream_request_headers

KEY = "sk-arca-5ecret-7f3a9c"
ARCA = ["--schedule-type", "arca", "--arca-base-url", "http://arca.internal:8080"]


def proxy_engine(base_url: str = "http://arca.internal:8080") -> ArcaEngine:
    engine = build_engine(Settings(schedule_type="arca", arca_base_url=base_url, arca_api_key=KEY,
                                   arca_data_plane="proxy"))
    assert isinstance(engine, ArcaEngine)
    return engine


# Settings


def test_reject_is_the_default_data_plane() -> None:
    engine = build_engine(load_settings([*ARCA, "--arca-api-key", KEY], {}))
    assert isinstance(engine, ArcaRejectEngine)


def test_proxy_data_plane_from_the_environment() -> None:
    settings = load_settings(ARCA, {"ARCA_API_KEY": KEY, "ARCA_DATA_PLANE": "proxy"})
    engine = build_engine(settings)
    assert engine == ArcaEngine(base_url=URL("http://arca.internal:8080"), api_key=ApiKey(KEY))


def test_key_file_is_read_and_trimmed(tmp_path: Path) -> None:
    key_file = tmp_path / "arca.key"
    key_file.write_text(f"  {KEY}\n")
    settings = load_settings([*ARCA, "--arca-api-key-file", str(key_file)], {})
    assert (settings.arca_api_key, settings.arca_api_key_file) == (KEY, str(key_file))


def test_key_file_from_the_config_file(tmp_path: Path) -> None:
    key_file = tmp_path / "arca.key"
    key_file.write_text(KEY)
    config = tmp_path / "gateway.toml"
    config.write_text(f'schedule_type = "arca"\narca_base_url = "http://a:1"\narca_api_key_file = "{key_file}"\n')
    settings = load_settings(["--config", str(config)], {})
    assert (settings.schedule_type, settings.arca_api_key) == ("arca", KEY)


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--schedule-type", "arca", "--arca-api-key", KEY], {}, "--schedule-type arca needs --arca-base-url"),
        (ARCA, {}, "--schedule-type arca needs an API key"),
        (["--schedule-type", "arca", "--arca-base-url", "ftp://a:1"], {"ARCA_API_KEY": KEY},
         r"--arca-base-url: 'ftp://a:1' from --arca-base-url must be an http:// or https:// URL with a host"),
        (["--schedule-type", "arca", "--arca-base-url", "http://a:99999"], {"ARCA_API_KEY": KEY},
         "--arca-base-url: 'http://a:99999' from --arca-base-url is not valid"),
        (["--schedule-type", "arca", "--arca-base-url", "http://a:1/?x=1"], {"ARCA_API_KEY": KEY},
         "--arca-base-url: 'http://a:1/\\?x=1' must not have a query or fragment"),
        (["--schedule-type", "arca", "--arca-base-url", "http://u:p@a:1"], {"ARCA_API_KEY": KEY},
         "--arca-base-url must not carry credentials"),
        ([*ARCA, "--arca-api-key", "two words"], {},
         "--arca-api-key: <redacted> from --arca-api-key must be printable ASCII without spaces"),
        ([*ARCA, "--arca-data-plane", "forward"], {"ARCA_API_KEY": KEY},
         "--arca-data-plane: 'forward' from --arca-data-plane must be one of reject, proxy"),
        ([*ARCA, "--arca-api-key-file", "/nonexistent/arca.key"], {},
         "--arca-api-key-file: cannot read /nonexistent/arca.key: No such file or directory"),
        ([*ARCA, "--arca-api-key-file", "/dev/null"], {}, "--arca-api-key-file: /dev/null is empty"),
        ([*ARCA, "--arca-api-key-file", "/dev/null"], {"ARCA_API_KEY": KEY},
         "--arca-api-key-file: a key is also given by --arca-api-key, ARCA_API_KEY or arca_api_key; keep one"),
    ],
)
def test_bad_arca_settings_stop_startup_naming_the_setting(
    argv: list[str], environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=f"^{message}") as raised:
        build_engine(load_settings(argv, environ))
    assert KEY not in str(raised.value)
    assert "two words" not in str(raised.value)


def test_key_stays_out_of_reprs_and_help() -> None:
    settings = load_settings([*ARCA, "--arca-api-key", KEY, "--arca-data-plane", "proxy"], {})
    engine = build_engine(settings)
    target = engine.resolve(CIMultiDict({ENV_INSTANCE_ID: "sbx-1"}), "/mcp")
    shown = [repr(settings), repr(engine), repr(target), str(target), repr(target.added_headers)]
    assert [KEY in text for text in shown] == [False] * len(shown)
    assert dict(target.added_headers)[SANDBOX_API_KEY] == KEY  # the value itself is intact
    assert "default: unset" in build_parser().format_help()


# Reject mode


@pytest.mark.parametrize("path", ["/health", "/mcp", "/sse", "/some/random?x=1"])
def test_reject_engine_refuses_everything_it_is_asked_to_route(path: str) -> None:
    headers = CIMultiDict({ENV_INSTANCE_ID: "sbx-1", MCP_PROXY_URL: "http://10.0.0.1:8081"})
    with pytest.raises(DataPlaneUnsupported) as raised:
        ArcaRejectEngine().resolve(headers, path)
    assert (raised.value.status, raised.value.body()) == (
        501, {"success": False, "code": 501, "message": REJECT_MESSAGE, "data": None},
    )
    assert "presign_url()" in REJECT_MESSAGE and "data plane (MCP, /health, SSE)" in REJECT_MESSAGE


def test_both_modes_route_on_either_sdk_header() -> None:
    assert ArcaRejectEngine().routing_headers == proxy_engine().routing_headers == (ENV_INSTANCE_ID, MCP_PROXY_URL)


# Instance ids

valid_ids = st.from_regex(INSTANCE_ID, fullmatch=True).filter(lambda value: value not in (".", ".."))


@given(instance_id=valid_ids)
def test_valid_ids_name_the_sandbox_in_path_and_header(instance_id: str) -> None:
    target = proxy_engine().resolve(CIMultiDict({ENV_INSTANCE_ID: instance_id}), "/mcp")
    assert str(target.url) == f"http://arca.internal:8080/arca/api/v1/sandbox/{instance_id}/mcp"
    assert target.added_headers == ((SANDBOX_API_KEY, KEY), (SANDBOX_ID, instance_id))


@given(instance_id=st.text(min_size=1, max_size=140))
def test_ids_outside_the_pattern_are_refused(instance_id: str) -> None:
    stripped = instance_id.strip()
    if INSTANCE_ID.fullmatch(stripped) and stripped not in (".", ".."):
        assert parse_instance_id(CIMultiDict({ENV_INSTANCE_ID: instance_id})) == stripped
    else:
        with pytest.raises((MalformedHeader, MissingHeader)):
            parse_instance_id(CIMultiDict({ENV_INSTANCE_ID: instance_id}))


@pytest.mark.parametrize("instance_id", [".", "..", "a/b", "a%2Fb", "%41", "sbx 1", "x" * 129, "sbx-ü", "a?b"])
def test_each_bad_id_is_a_400(instance_id: str) -> None:
    with pytest.raises(MalformedHeader, match=r"^AEnvCore-EnvInstance-ID header must be 1 to 128 characters"):
        proxy_engine().resolve(CIMultiDict({ENV_INSTANCE_ID: instance_id}), "/mcp")


def test_an_id_of_128_characters_is_accepted() -> None:
    assert parse_instance_id(CIMultiDict({ENV_INSTANCE_ID: "x" * 128})) == "x" * 128


@pytest.mark.parametrize("headers", [{}, {ENV_INSTANCE_ID: ""}, {ENV_INSTANCE_ID: "  "}, {MCP_PROXY_URL: "http://a:1"}])
def test_missing_id_is_a_400(headers: dict[str, str]) -> None:
    with pytest.raises(MissingHeader, match=r"^AEnvCore-EnvInstance-ID header is required$"):
        proxy_engine().resolve(CIMultiDict(headers), "/mcp")


def test_two_ids_are_refused() -> None:
    headers = CIMultiDict([(ENV_INSTANCE_ID, "sbx-1"), ("aenvcore-envinstance-id", "sbx-2")])
    with pytest.raises(MalformedHeader, match="must be sent once"):
        proxy_engine().resolve(headers, "/mcp")


# Path joining


@pytest.mark.parametrize(
    ("base_url", "path_qs", "expected"),
    [
        ("http://a:1", "/mcp", "http://a:1/arca/api/v1/sandbox/sbx/mcp"),
        ("http://a:1/", "/sse", "http://a:1/arca/api/v1/sandbox/sbx/sse"),
        ("http://a:1", "/a/b?x=1", "http://a:1/arca/api/v1/sandbox/sbx/a/b?x=1"),
        ("http://a:1", "/", "http://a:1/arca/api/v1/sandbox/sbx/"),
        ("https://gw.example/prefix", "/messages/?session_id=ab%2Fc", "https://gw.example/prefix/arca/api/v1/sandbox/sbx/messages/?session_id=ab%2Fc"),
        ("http://a:1/p/q/", "/mcp?a=1&b=%20", "http://a:1/p/q/arca/api/v1/sandbox/sbx/mcp?a=1&b=%20"),
        ("http://a:1", "http://elsewhere:9/mcp?x", "http://a:1/arca/api/v1/sandbox/sbx/mcp?x"),  # absolute-form
    ],
)
def test_sandbox_url(base_url: str, path_qs: str, expected: str) -> None:
    assert str(sandbox_url(URL(base_url), "sbx", path_qs)) == expected


@pytest.mark.parametrize(
    "path_qs",
    ["/..", "/../openapi/v1/sandbox", "/a/../../b", "/%2e%2E/b", "/.%2e", "/a/..%2F..%2Fb", "/a\\..\\..\\b", "/./mcp"],
)
def test_dot_segments_are_refused(path_qs: str) -> None:
    with pytest.raises(MalformedPath):
        proxy_engine().resolve(CIMultiDict({ENV_INSTANCE_ID: "sbx"}), path_qs)


segments = st.text(alphabet="abcxyz019-_~%2F:@!$'()*+,;=", max_size=8)
queries = st.text(alphabet="abc=&%20+/?", max_size=12)


@given(
    prefix=st.lists(st.from_regex(r"[a-z0-9-]{1,8}", fullmatch=True), max_size=3),
    trailing_slash=st.booleans(),
    path=st.lists(segments, max_size=4),
    query=st.one_of(st.none(), queries),
    instance_id=valid_ids,
)
def test_path_and_query_are_appended_byte_for_byte(
    prefix: list[str], trailing_slash: bool, path: list[str], query: str | None, instance_id: str
) -> None:
    base = "http://arca.internal:8080" + "".join(f"/{part}" for part in prefix) + ("/" if trailing_slash else "")
    path_qs = "/" + "/".join(path) + ("" if query is None else f"?{query}")
    target = proxy_engine(base).resolve(CIMultiDict({ENV_INSTANCE_ID: instance_id}), path_qs)
    sandbox = "".join(f"/{part}" for part in prefix) + f"/arca/api/v1/sandbox/{instance_id}"
    # yarl drops the "?" of an empty query, as the other engines' join_path does
    assert target.url.raw_path_qs == sandbox + "/" + "/".join(path) + (f"?{query}" if query else "")
    assert target.url.origin() == URL("http://arca.internal:8080")


# Injected headers


def case_variants(name: str) -> st.SearchStrategy[str]:
    return st.tuples(*(st.sampled_from(sorted({c.lower(), c.upper()})) for c in name)).map("".join)


@given(
    key_name=case_variants(SANDBOX_API_KEY),
    id_name=case_variants(SANDBOX_ID),
    proxy_name=case_variants(MCP_PROXY_URL),
)
def test_sandbox_headers_replace_the_callers_in_any_case(key_name: str, id_name: str, proxy_name: str) -> None:
    downstream = CIMultiDict([
        (ENV_INSTANCE_ID, "sbx-1"), (key_name, "forged-key"), (id_name, "sbx-other"), (id_name, "sbx-third"),
        (proxy_name, "http://10.0.0.1:8081"), ("Authorization", "Bearer caller"),
    ])
    target = proxy_engine().resolve(downstream, "/mcp")
    upstream = upstream_request_headers(downstream, target.added_headers)
    assert sorted((name.lower(), value) for name, value in upstream.items()) == [
        ("aenvcore-envinstance-id", "sbx-1"),
        ("authorization", "Bearer caller"),
        ("x-agent-sandbox-api-key", KEY),
        ("x-agent-sandbox-id", "sbx-1"),
    ]
