"""The GatewayError family: stable codes, statuses and JSON-RPC codes, and both body forms (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.errors import DataPlaneUnsupported, GatewayError, MissingHeader, TargetBusy, TargetForbidden


def every_error_class() -> list[type[GatewayError]]:
    found: list[type[GatewayError]] = []
    pending = [GatewayError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return [cls for cls in found if not cls.__name__.startswith("_")]


# -32000/-32001 are the MCP SDKs' own (connection closed, request timeout), -32002 and -32042 retired by
# MCP, -32020 and up reserved for the MCP spec: a gateway code must not be mistaken for one of those.
GATEWAY_BAND = range(-32019, -32002)


@pytest.mark.parametrize("cls", every_error_class(), ids=lambda cls: cls.__name__)
def test_every_error_has_a_status_and_a_json_rpc_code_that_mcp_does_not_use(cls: type[GatewayError]) -> None:
    assert 400 <= cls.status <= 599
    assert cls.rpc_code in (-32600, -32603) or cls.rpc_code in GATEWAY_BAND


def test_error_codes_are_unique() -> None:
    codes = [cls.code for cls in every_error_class()]
    assert len(codes) == len(set(codes))


def test_a_json_rpc_error_carries_the_message_and_the_status_and_code_in_data() -> None:
    assert MissingHeader("AEnvCore-MCPProxy-URL").rpc_error("req-7") == {
        "jsonrpc": "2.0", "id": "req-7",
        "error": {"code": -32600, "message": "AEnvCore-MCPProxy-URL header is required",
                  "data": {"status": 400, "code": "missing_header"}},
    }


def test_the_forbidding_rule_is_in_both_forms() -> None:
    rule = "target_deny 10.0.0.0/8"
    error = TargetForbidden(f"target 10.0.0.1:80 is refused by rule: {rule}", rule=rule)
    expected_data: dict[str, Any] = {"status": 403, "code": "target_forbidden", "rule": rule}

    assert (error.body(), error.rpc_error(3)["error"]["data"]) == (
        {"error": error.message, "code": "target_forbidden", "rule": rule}, expected_data)


def test_retry_later_errors_keep_retry_after_in_either_form() -> None:
    error = TargetBusy("target 10.0.0.1:80 already has 4 requests in flight (--max-inflight-per-target)")
    assert (error.rpc_error(1)["error"]["code"], error.response_headers()) == (-32012, {"Retry-After": "1"})


def test_the_arca_refusal_of_a_json_rpc_request_satisfies_both_readers() -> None:
    # MCP clients read jsonrpc/id/error; the platform SDK's envelope parser reads success/code/message/data.
    error = DataPlaneUnsupported("use presign_url()")
    assert error.rpc_error(1) == {
        "jsonrpc": "2.0", "id": 1,
        "error": {"code": -32013, "message": "use presign_url()",
                  "data": {"status": 501, "code": "data_plane_unsupported"}},
        "success": False, "code": 501, "message": "use presign_url()", "data": None,
    }
