"""Loop guard: each forwarded request carries this gateway's Via entry; one that comes back is refused.

A per-process pseudonym (RFC 9110 §7.6.3 allows one in place of a host name) so that an
AEnvCore-MCPProxy-URL pointing at the gateway itself, or a chain back to it, ends at the first
return with 508 instead of recursing until sockets run out.
"""

from __future__ import annotations

import secrets
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import istr

from gateway.errors import LoopDetected

VIA: Final = istr("Via")
VIA_MARK: Final = web.AppKey("via_mark", str)


def new_mark() -> str:
    """This process's Via entry: protocol version and a random pseudonym."""
    return f"1.1 mcp-gateway-{secrets.token_hex(6)}"


def has_passed(via_values: list[str], mark: str) -> bool:
    """Whether any Via field value lists this gateway's entry (Via is a comma-separated list)."""
    return any(entry.strip() == mark for value in via_values for entry in value.split(","))


@web.middleware
async def loop_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """508 for a request that already passed through this gateway; nothing is forwarded."""
    if VIA in request.headers and has_passed(request.headers.getall(VIA), request.app[VIA_MARK]):
        raise LoopDetected("request already passed through this gateway (Via); its target points back here")
    return await handler(request)
