"""Loop guard: each forwarded request carries this gateway's Via entry; one that comes back is refused.

A per-process pseudonym (RFC 9110 §7.6.3 allows one in place of a host name) so that an
AEnvCore-MCPProxy-URL pointing at the gateway itself, or a chain back to it, ends at the first
return with 508 instead of recursing until sockets run out.
"""

from __future__ import annotations

import secrets
from typing import Final

from multidict import CIMultiDictProxy, istr

from gateway.errors import LoopDetected

VIA: Final = istr("Via")


def new_mark() -> str:
    """This process's Via entry: protocol version and a random pseudonym."""
    return f"1.1 mcp-gateway-{secrets.token_hex(6)}"


def has_passed(via_values: list[str], mark: str) -> bool:
    """Whether any Via field value lists this gateway's entry (Via is a comma-separated list)."""
    return any(entry.strip() == mark for value in via_values for entry in value.split(","))


def refuse_loops(headers: CIMultiDictProxy[str], mark: str) -> None:
    """508 for a request that already passed through this gateway; nothing is forwarded."""
    if VIA in headers and has_passed(headers.getall(VIA), mark):
        raise LoopDetected("request already passed through this gateway (Via); its target points back here")
