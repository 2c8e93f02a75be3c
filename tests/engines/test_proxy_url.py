from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict
from yarl import URL

from gateway.engines.proxy_url import ProxyUrlEngine, join_path
from gateway.errors import MalformedHeader, MissingHeader
from gateway.headers import MCP_PROXY_URL

ENGINE = ProxyUrlEngine(name="k8s")


def resolve(value: str, path_qs: str = "/mcp") -> str:
    return str(ENGINE.resolve(CIMultiDict({MCP_PROXY_URL: value}), path_qs).url)


def test_target_is_header_origin_plus_path_and_query_byte_for_byte() -> None:
    assert resolve("http://10.1.2.3:8081", "/a%2Fb/c?x=%41&y=a+b&z") == "http://10.1.2.3:8081/a%2Fb/c?x=%41&y=a+b&z"


@pytest.mark.parametrize(("header", "path_qs", "expected"), [
    ("http://h:1/prefix", "/mcp", "http://h:1/prefix/mcp"),
    ("http://h:1/prefix/", "/mcp?a=1", "http://h:1/prefix/mcp?a=1"),
    ("http://h:1/", "/", "http://h:1/"),
    ("https://h", "/x", "https://h/x"),
    ("http://[::1]:9000", "/x", "http://[::1]:9000/x"),
    ("http://h:1?token=a", "/mcp?b=2", "http://h:1/mcp?token=a&b=2"),
    ("http://h:1?token=a", "/mcp", "http://h:1/mcp?token=a"),
    ("HTTP://H:1", "/x", "http://h:1/x"),
    ("http://h:1", "http://other:2/abs?q=1", "http://h:1/abs?q=1"),
])
def test_join_path_keeps_header_prefix_and_query(header: str, path_qs: str, expected: str) -> None:
    assert resolve(header, path_qs) == expected


def test_missing_header_is_named() -> None:
    with pytest.raises(MissingHeader, match="AEnvCore-MCPProxy-URL header is required"):
        ENGINE.resolve(CIMultiDict(), "/mcp")


@pytest.mark.parametrize(("value", "problem"), [
    ("ftp://h:21", "must be an http:// or https:// URL"),
    ("10.1.2.3:8081", "must be an http:// or https:// URL"),
    ("http://", "must name a host"),
    ("http://h:99999", "is not a valid URL"),
    ("http://h:0", "must have a port between 1 and 65535"),
    ("http://user:pw@h:1", "must not carry credentials"),
    ("http://h:port", "is not a valid URL"),
])
def test_malformed_header_says_what_is_wrong(value: str, problem: str) -> None:
    with pytest.raises(MalformedHeader, match=f"AEnvCore-MCPProxy-URL header {problem}"):
        resolve(value)


segments = st.text(alphabet="abcXYZ019-._~%2F!$&'()*+,;=:@", min_size=1, max_size=12)


@given(prefix=st.lists(segments, max_size=3), path=st.lists(segments, max_size=4),
       # An empty query ("/x?") reaches the upstream as "/x": yarl drops a bare "?".
       query=st.one_of(st.none(), st.text(alphabet="abc=&%2F+19", min_size=1, max_size=20)))
def test_join_path_never_rewrites_the_downstream_path(prefix: list[str], path: list[str], query: str | None) -> None:
    base = URL("http://h:1/" + "/".join(prefix), encoded=True)
    path_qs = "/" + "/".join(path) + ("" if query is None else "?" + query)

    joined = str(join_path(base, path_qs))

    assert joined == "http://h:1" + base.raw_path.rstrip("/") + path_qs
