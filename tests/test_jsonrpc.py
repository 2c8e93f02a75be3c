"""rpc_method labels from request body bytes: pure, never raising, always from a bounded set."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.jsonrpc import MCP_METHODS, PEEK_BYTES, RpcRequests, rpc_method, rpc_requests


@pytest.mark.parametrize(
    ("body", "label"),
    [
        (b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}', "initialize"),
        (b'{"method": "tools/call", "params": {"name": "add"}, "jsonrpc": "2.0", "id": "a"}', "tools/call"),
        (b' \n{ "jsonrpc" : "2.0" , "method" : "notifications/initialized" }', "notifications/initialized"),
        # the slow path: another key order, an escaped name
        (b'{"params":{"method":"ping"},"id":7,"method":"tools/list","jsonrpc":"2.0"}', "tools/list"),
        (b'{"jsonrpc":"2.0","id":1,"method":"tools\\/call"}', "tools/call"),
        (b'{"jsonrpc":"2.0","id":1,"method":"evil/' + b"x" * 100 + b'"}', "other"),
        (b'[{"jsonrpc":"2.0","id":1,"method":"ping"}]', "batch"),
        (b'{"jsonrpc":"2.0","id":1,"result":{}}', ""),  # a response to a server request
        (b'{"jsonrpc":"2.0","id":1,"method":3}', ""),
        (b"not json", ""),
        (b"\xff\xfe\x00", ""),
        (b"", ""),
        (b"[1, 2]", ""),
    ],
)
def test_rpc_method_labels(body: bytes, label: str) -> None:
    assert rpc_method(body) == label


def test_a_method_after_the_first_8_kib_is_not_looked_for() -> None:
    params = {"blob": "x" * PEEK_BYTES}
    late = json.dumps({"params": params, "jsonrpc": "2.0", "id": 1, "method": "tools/call"}).encode()
    early = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}).encode()

    assert (rpc_method(late), rpc_method(early), rpc_method(bytearray(early[:PEEK_BYTES]))) == ("", "tools/call",
                                                                                               "tools/call")


@given(st.binary(max_size=300))
def test_any_bytes_give_a_bounded_label(body: bytes) -> None:
    assert rpc_method(body) in MCP_METHODS | {"other", "batch", ""}


@given(st.sampled_from(sorted(MCP_METHODS)), st.integers() | st.text(max_size=5), st.booleans())
def test_every_mcp_method_is_its_own_label(method: str, request_id: int | str, method_first: bool) -> None:
    message = {"method": method, "jsonrpc": "2.0", "id": request_id} if method_first else {
        "jsonrpc": "2.0", "id": request_id, "method": method}
    assert rpc_method(json.dumps(message).encode()) == method


@pytest.mark.parametrize(
    ("body", "requests"),
    [
        (b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}', RpcRequests((1,), batch=False)),
        (b'{"method":"tools/call","params":{},"jsonrpc":"2.0","id":"a-1"}', RpcRequests(("a-1",), batch=False)),
        # a batch: one answer per request, none for its notifications
        (b'[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","method":"notifications/initialized"},'
         b'{"jsonrpc":"2.0","id":"b","method":"tools/list"}]', RpcRequests((1, "b"), batch=True)),
        (b'{"jsonrpc":"2.0","method":"notifications/initialized"}', None),
        (b'[{"jsonrpc":"2.0","method":"notifications/initialized"}]', None),
        (b'{"jsonrpc":"2.0","id":1,"result":{}}', None),  # a response to a server request
        (b'{"jsonrpc":"2.0","id":null,"method":"ping"}', None),
        (b'{"jsonrpc":"2.0","id":true,"method":"ping"}', None),
        (b'{"jsonrpc":"2.0","id":1.5,"method":"ping"}', None),
        (b'{"jsonrpc":"1.0","id":1,"method":"ping"}', None),
        (b'{"id":1,"method":"ping"}', None),
        (b'{"jsonrpc":"2.0","id":1,"method":7}', None),
        (b"not json", None),
        (b"\xff\xfe\x00", None),
        (b"[" * 100_000, None),  # nesting deep enough to exhaust the recursion limit
        (b"[]", None),
    ],
)
def test_rpc_requests_finds_the_ids_to_answer(body: bytes, requests: RpcRequests | None) -> None:
    assert rpc_requests(body) == requests


@given(st.binary(max_size=300) | st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(
        ["jsonrpc", "id", "method", "params"]), children, max_size=4)).map(lambda value: json.dumps(value).encode()))
def test_rpc_requests_never_raises_and_finds_only_string_or_integer_ids(body: bytes) -> None:
    found = rpc_requests(body)
    assert found is None or (found.ids and all(
        isinstance(request_id, int | str) and not isinstance(request_id, bool) for request_id in found.ids))
