"""The failures the gateway answers itself, and the one place upstream client errors are mapped.

    ConfigError                 bad settings: startup stops (exit code 2), never a response
    GatewayError                answered as JSON before any response byte was sent
    ├── BadRequest              400  the request is not valid HTTP/1.1 (the server's parser refused it)
    ├── MissingHeader           400  the engine's routing header is absent
    ├── MalformedHeader         400  a routing header is present but unusable
    ├── MalformedPath           400  a path that would climb out of its target, or an unparsable absolute-form URL
    ├── DataPlaneUnsupported    501  arca reject mode; body is the aenv envelope the SDK parses
    ├── UnsupportedRequest      501  CONNECT or an asterisk-form target (OPTIONS *): nothing to forward
    ├── VersionNotSupported     505  an HTTP version other than 1.0 and 1.1 in the request line
    ├── UpstreamUnreachable     502  refused, reset or unresolvable before a response
    ├── UpstreamBroken          502  the upstream answered with something that is not HTTP
    ├── UpstreamTimeout         504  no connection or no response headers in time
    ├── Unauthorized            401  --auth-token-file is set and the bearer token is missing or wrong
    ├── TargetForbidden         403  the target policy refuses the upstream address (names the rule)
    ├── OriginForbidden         403  an Origin that is not allowed: DNS-rebinding protection (origin.py)
    ├── HostForbidden           403  with --allow-host, a Host that is not one of the gateway's names
    ├── BodyTooLarge            413  the request body exceeds --max-body-size
    ├── TargetBusy              429  --max-inflight-per-target reached (Retry-After)
    ├── HeadersTooLarge         431  the request headers exceed --max-header-size
    ├── TooManyStreams          503  --max-streams reached (Retry-After)
    ├── GatewayOverloaded       503  the gateway's own resources ran out: fds, the upstream connection budget
    └── LoopDetected            508  the request already passed through this gateway

A refused request whose body is a JSON-RPC request is answered in JSON-RPC instead (dataplane.py),
because MCP clients show the message of a JSON-RPC error and drop any other body of a non-2xx
response. Each class's `rpc_code` is the JSON-RPC error code: -32600 (Invalid Request) for input the
caller must fix, -32603 for our own failure, and for the rest the implementation-defined band
-32003..-32019, clear of the codes MCP SDKs use themselves (-32000 connection closed, -32001 request
timeout, -32002 and -32042 retired by MCP, -32020 and up reserved for the MCP spec):

    -32600  bad request or routing input    400, 413, 431; 501 CONNECT or OPTIONS *, 505
    -32010  unauthorized                    401
    -32011  forbidden                       403 (target, Origin, Host)
    -32012  busy, retry later               429, 503 (Retry-After: streams, the gateway overloaded)
    -32013  data plane not served           501 (arca reject mode)
    -32014  upstream unreachable or broken  502
    -32015  upstream timeout                504
    -32016  loop detected                   508
    -32603  internal error                  500
"""

from __future__ import annotations

import os
import socket
from typing import Any, ClassVar, Final

from yarl import URL


class ConfigError(Exception):
    """A setting is missing or wrong; the message names it."""


class BadUpstreamResponse(Exception):
    """Raised by a transport: the upstream sent something that is not a valid HTTP response."""


# Both transports' reason for a 101: the gateway never forwards Upgrade, so no request asked to switch.
UNASKED_UPGRADE: Final = "the upstream switched protocols (101) on a request that did not ask to upgrade"


class GatewayError(Exception):
    """A failure we answer ourselves, as JSON, before any response byte was sent."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    rpc_code: ClassVar[int] = -32603
    # The connection is closed after the answer: what the client sends next cannot be trusted to parse.
    closes_connection: ClassVar[bool] = False

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code

    def details(self) -> dict[str, Any]:
        """Members a class adds to both bodies (TargetForbidden's rule)."""
        return {}

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "code": self.code, **self.details()}

    def rpc_error(self, request_id: int | str) -> dict[str, Any]:
        """The JSON-RPC error response to the request `request_id`, same message, status and code in `data`."""
        data = {"status": self.status, "code": self.code, **self.details()}
        return {"jsonrpc": "2.0", "id": request_id, "error": {"code": self.rpc_code, "message": self.message,
                                                              "data": data}}

    def response_headers(self) -> dict[str, str]:
        return {}


class BadRequest(GatewayError):
    status = 400
    code = "bad_request"
    rpc_code = -32600
    closes_connection = True


class MissingHeader(GatewayError):
    status = 400
    code = "missing_header"
    rpc_code = -32600

    def __init__(self, name: str) -> None:
        super().__init__(f"{name} header is required")


class MalformedHeader(GatewayError):
    status = 400
    code = "malformed_header"
    rpc_code = -32600

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name} header {problem}")


class MalformedPath(GatewayError):
    status = 400
    code = "malformed_path"
    rpc_code = -32600


class DataPlaneUnsupported(GatewayError):
    """Answered in the aenv envelope, not {"error", "code"}: the SDK parses success/code/message."""

    status = 501
    code = "data_plane_unsupported"
    rpc_code = -32013

    def body(self) -> dict[str, Any]:
        return {"success": False, "code": self.status, "message": self.message, "data": None}

    def rpc_error(self, request_id: int | str) -> dict[str, Any]:
        # Both readers in one object: MCP clients read jsonrpc/id/error, the SDK's envelope parser
        # success/code/message/data; neither looks at the other's members.
        return {**super().rpc_error(request_id), **self.body()}


class UnsupportedRequest(GatewayError):
    """CONNECT (a tunnel) or OPTIONS * (a question about the gateway itself): never forwarded."""

    status = 501
    code = "unsupported_request"
    rpc_code = -32600
    closes_connection = True  # a tunnel's bytes may follow the head


class VersionNotSupported(GatewayError):
    status = 505
    code = "version_not_supported"
    rpc_code = -32600
    closes_connection = True


class UpstreamFailed(GatewayError):
    """The upstream failed before any response byte; `kind` labels the metric (metrics.UPSTREAM_ERROR_KINDS).

    Carried here rather than read off __cause__, which compiled code (mypyc) does not set. Raised as one of
    the three below; its own code only keeps the family's codes unique.
    """

    status = 502
    code = "upstream_failed"
    rpc_code = -32014

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class UpstreamUnreachable(UpstreamFailed):
    status = 502
    code = "upstream_unreachable"
    rpc_code = -32014


class UpstreamBroken(UpstreamFailed):
    status = 502
    code = "upstream_bad_response"
    rpc_code = -32014


class UpstreamTimeout(UpstreamFailed):
    status = 504
    code = "upstream_timeout"
    rpc_code = -32015


class Unauthorized(GatewayError):
    status = 401
    code = "unauthorized"
    rpc_code = -32010

    def response_headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="mcp-gateway"'}


class TargetForbidden(GatewayError):
    status = 403
    code = "target_forbidden"
    rpc_code = -32011

    def __init__(self, message: str, rule: str) -> None:
        super().__init__(message)
        self.rule = rule

    def details(self) -> dict[str, Any]:
        return {"rule": self.rule}


class OriginForbidden(GatewayError):
    status = 403
    code = "origin_forbidden"
    rpc_code = -32011


class HostForbidden(GatewayError):
    status = 403
    code = "host_forbidden"
    rpc_code = -32011


class BodyTooLarge(GatewayError):
    status = 413
    code = "body_too_large"
    rpc_code = -32600


class HeadersTooLarge(GatewayError):
    status = 431
    code = "headers_too_large"
    rpc_code = -32600
    closes_connection = True


class _RetryLater(GatewayError):
    retry_after_s: ClassVar[int] = 1
    rpc_code = -32012

    def response_headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class TargetBusy(_RetryLater):
    status = 429
    code = "target_busy"


class TooManyStreams(_RetryLater):
    status = 503
    code = "too_many_streams"


class GatewayOverloaded(_RetryLater):
    """The gateway's condition, not the upstream's: never counted against a sandbox."""

    status = 503
    code = "gateway_overloaded"


class LoopDetected(GatewayError):
    status = 508
    code = "loop_detected"
    rpc_code = -32016


def authority(url: URL) -> str:
    """host:port of a target, the only part of it an error message or log line shows."""
    host = f"[{url.host}]" if url.host and ":" in url.host else url.host
    return f"{host}:{url.port}"


class UpstreamErrors:
    """Turn a transport's failures before the response into gateway errors; the only place that does.

    `with UpstreamErrors(url):` around the upstream call. A class, not a @contextmanager: it is
    entered on every request, and a generator costs a microsecond more.
    """

    __slots__ = ("_url",)

    def __init__(self, url: URL) -> None:
        self._url = url

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, _: object) -> None:
        if exc is None or not isinstance(exc, OSError | BadUpstreamResponse):
            return  # success, or not the transport's failure (a GatewayError, a cancellation)
        where = authority(self._url)
        if isinstance(exc, TimeoutError):
            raise UpstreamTimeout(f"upstream {where} did not answer in time", "timeout") from exc
        if isinstance(exc, BadUpstreamResponse):
            raise UpstreamBroken(f"upstream {where} sent an invalid HTTP response", "bad_response") from exc
        if isinstance(exc, ConnectionRefusedError):
            raise UpstreamUnreachable(f"cannot connect to upstream {where}: connection refused",
                                      "connect_refused") from exc
        if isinstance(exc, socket.gaierror):
            raise UpstreamUnreachable(f"cannot resolve upstream host {self._url.host}", "dns") from exc
        reason = os.strerror(exc.errno) if exc.errno else str(exc) or exc.__class__.__name__
        raise UpstreamUnreachable(f"upstream {where} failed: {reason}", "unreachable") from exc

