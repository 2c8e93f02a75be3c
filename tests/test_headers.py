from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from gateway.headers import (
    HOP_BY_HOP,
    MCP_PROXY_URL,
    downstream_response_headers,
    is_event_stream,
    redacted,
    upstream_request_headers,
    without_hop_by_hop,
)

tokens = st.from_regex(r"[a-z][a-z0-9-]{0,15}", fullmatch=True)
cases = st.sampled_from([str.lower, str.upper, str.title])


def test_upstream_headers_keep_end_to_end_fields_and_drop_routing_and_hop_by_hop() -> None:
    downstream_headers = CIMultiDict([
        ("Host", "gateway:8081"), (MCP_PROXY_URL, "http://10.0.0.1:8081"), ("Connection", "keep-alive, X-Hop"),
        ("X-Hop", "1"), ("Keep-Alive", "timeout=5"), ("Transfer-Encoding", "chunked"), ("TE", "trailers"),
        ("Upgrade", "h2c"), ("Proxy-Authorization", "Basic x"), ("Authorization", "Bearer t"),
        ("Mcp-Session-Id", "s1"), ("Mcp-Protocol-Version", "2025-06-18"), ("Last-Event-ID", "7"),
        ("Accept", "application/json, text/event-stream"), ("Cookie", "a=1"), ("Cookie", "b=2"),
        ("AEnvCore-EnvInstance-ID", "env-1"),
    ])

    forwarded = upstream_request_headers(downstream_headers)

    assert list(forwarded.items()) == [
        ("Authorization", "Bearer t"), ("Mcp-Session-Id", "s1"), ("Mcp-Protocol-Version", "2025-06-18"),
        ("Last-Event-ID", "7"), ("Accept", "application/json, text/event-stream"), ("Cookie", "a=1"),
        ("Cookie", "b=2"), ("AEnvCore-EnvInstance-ID", "env-1"),
    ]


def test_engine_headers_replace_caller_values_in_any_letter_case() -> None:
    downstream_headers = CIMultiDict([("X-Agent-Sandbox-ID", "forged"), ("x-agent-sandbox-id", "forged2")])

    forwarded = upstream_request_headers(downstream_headers, (("x-agent-sandbox-id", "sbx-1"),))

    assert list(forwarded.items()) == [("x-agent-sandbox-id", "sbx-1")]


def test_response_headers_pass_back_except_hop_by_hop() -> None:
    upstream_headers = CIMultiDict([
        ("Content-Type", "text/event-stream"), ("Transfer-Encoding", "chunked"), ("Connection", "close"),
        ("Mcp-Session-Id", "s1"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("Content-Encoding", "gzip"),
    ])

    assert list(downstream_response_headers(upstream_headers).items()) == [
        ("Content-Type", "text/event-stream"), ("Mcp-Session-Id", "s1"), ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"), ("Content-Encoding", "gzip"),
    ]


@given(names=st.lists(tokens, max_size=8), nominated=tokens, case=cases)
def test_connection_nominated_headers_are_never_forwarded(names: list[str], nominated: str, case: object) -> None:
    assert callable(case)
    incoming = CIMultiDict([(n, "v") for n in names] + [("Connection", case(nominated)), (nominated, "v")])

    for forwarded in (without_hop_by_hop(incoming), upstream_request_headers(incoming)):
        assert HOP_BY_HOP.isdisjoint(name.lower() for name in forwarded)
        assert nominated not in forwarded
        assert all(name in forwarded for name in names if name != nominated and name not in HOP_BY_HOP)


@given(st.lists(st.tuples(tokens, st.text(max_size=20)), max_size=10))
def test_header_policy_never_adds_and_keeps_order(pairs: list[tuple[str, str]]) -> None:
    incoming = CIMultiDict(pairs)
    forwarded = list(upstream_request_headers(incoming).items())
    nominated = {p.strip().lower() for n, v in pairs if n == "connection" for p in v.split(",")}
    dropped = HOP_BY_HOP | nominated | {"host", "aenvcore-mcpproxy-url"}
    assert forwarded == [(n, v) for n, v in pairs if n not in dropped]


def test_event_stream_detection_ignores_parameters_and_case() -> None:
    assert [is_event_stream(v) for v in ("text/event-stream", "Text/Event-Stream; charset=utf-8",
                                         "application/json", "", None)] == [True, True, False, False, False]


def test_redacted_masks_secrets_only() -> None:
    headers = CIMultiDict([("Authorization", "Bearer t"), ("X-Agent-Sandbox-Api-Key", "k"), ("Accept", "*/*")])
    assert redacted(headers) == {"Authorization": "<redacted>", "X-Agent-Sandbox-Api-Key": "<redacted>",
                                 "Accept": "*/*"}
