"""The header policy's precomputed fast path (no Connection header) gives the same answer as the slow one."""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.headers import downstream_response_headers, upstream_request_headers


def test_fast_and_slow_paths_drop_the_same_fields() -> None:
    fields = [("Host", "gw"), ("Keep-Alive", "5"), ("X-A", "1"), ("x-a", "2"), ("TE", "trailers"),
              ("AEnvCore-MCPProxy-URL", "http://u:1"), ("Content-Length", "2")]
    plain = CIMultiDictProxy(CIMultiDict(fields))
    nominating = CIMultiDictProxy(CIMultiDict([*fields, ("Connection", "x-b"), ("X-B", "3")]))

    expected = [("X-A", "1"), ("x-a", "2"), ("Content-Length", "2"), ("X-Key", "k")]
    assert list(upstream_request_headers(plain, [("X-Key", "k")]).items()) == expected
    assert list(upstream_request_headers(nominating, [("X-Key", "k")]).items()) == expected
    assert list(upstream_request_headers({"Connection": "x-a", "x-a": "1", "Accept": "*/*"}).items()) == [
        ("Accept", "*/*")
    ]
    assert list(downstream_response_headers(nominating).items()) == [
        ("Host", "gw"), ("X-A", "1"), ("x-a", "2"), ("AEnvCore-MCPProxy-URL", "http://u:1"), ("Content-Length", "2")
    ]
