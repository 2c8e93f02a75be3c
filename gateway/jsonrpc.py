"""Reading JSON-RPC request bodies: the method for metric labels (from at most the first 8 KiB), and
the ids a refusal answers (from a small body that arrived whole).

Best effort and never an error: an MCP method from the allow-list, `other`, `batch`, or "" when the
bytes are not a JSON-RPC request (garbage, a response, or a method not found in the first 8 KiB);
no ids when the body holds no request that expects an answer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Final

# The MCP methods and notifications (spec 2025-06-18 and 2025-11-25). Anything else is `other`,
# so no caller can grow the label set.
MCP_METHODS: Final = frozenset({
    "initialize", "ping",
    "tools/list", "tools/call",
    "resources/list", "resources/templates/list", "resources/read",
    "resources/subscribe", "resources/unsubscribe",
    "prompts/list", "prompts/get",
    "completion/complete", "logging/setLevel",
    "sampling/createMessage", "roots/list", "elicitation/create",
    "tasks/get", "tasks/result", "tasks/list", "tasks/cancel",
    "notifications/initialized", "notifications/cancelled", "notifications/progress",
    "notifications/message", "notifications/roots/list_changed",
    "notifications/resources/list_changed", "notifications/resources/updated",
    "notifications/tools/list_changed", "notifications/prompts/list_changed",
    "notifications/elicitation/complete", "notifications/tasks/status",
})
_BY_BYTES: Final = {name.encode(): name for name in MCP_METHODS}

PEEK_BYTES: Final = 8 * 1024

# The fast path: a top-level "method" preceded only by "jsonrpc"/"id" members with scalar values,
# the order every MCP SDK writes. Nothing nested can come before it, so the match is the top-level
# member. Anything else (escapes in the name, another key order) takes the slow path.
_LEADING_METHOD: Final = re.compile(
    rb'\s*\{\s*(?:"(?:jsonrpc|id)"\s*:\s*(?:"[^"\\]*"|-?[0-9][0-9.eE+-]*|null)\s*,\s*)*'
    rb'"method"\s*:\s*"([^"\\]*)"'
)
_BATCH: Final = re.compile(rb"\s*\[\s*\{")


def rpc_method(head: bytes | bytearray) -> str:
    """The label for a request body whose first bytes are `head` (only its first 8 KiB are read)."""
    match = _LEADING_METHOD.match(head, 0, PEEK_BYTES)
    if match is not None:
        return _BY_BYTES.get(match.group(1), "other")
    if _BATCH.match(head, 0, PEEK_BYTES) is not None:
        return "batch"
    if len(head) > PEEK_BYTES:
        return ""
    try:
        message = json.loads(head)
    except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
        return ""
    if isinstance(message, dict):
        method = message.get("method")
        if isinstance(method, str):
            return method if method in MCP_METHODS else "other"
    return ""


RequestId = int | str


@dataclass(frozen=True, slots=True)
class RpcRequests:
    """The JSON-RPC requests of a body that expect an answer: their ids, and whether it was a batch."""

    ids: tuple[RequestId, ...]
    batch: bool


def _request_id(message: object) -> RequestId | None:
    """The id of a JSON-RPC 2.0 request (MCP: a string or an integer, never null), else None."""
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0" or not isinstance(message.get("method"), str):
        return None
    request_id = message.get("id")
    return request_id if isinstance(request_id, int | str) and not isinstance(request_id, bool) else None


def rpc_requests(body: bytes | bytearray) -> RpcRequests | None:
    """The requests a whole body holds, for answering them with JSON-RPC errors; None for anything else
    (notifications only, responses, garbage). The caller passes only a small body that has arrived whole."""
    try:
        message = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if isinstance(message, list):
        ids = tuple(request_id for item in message if (request_id := _request_id(item)) is not None)
        return RpcRequests(ids, batch=True) if ids else None
    request_id = _request_id(message)
    return None if request_id is None else RpcRequests((request_id,), batch=False)
