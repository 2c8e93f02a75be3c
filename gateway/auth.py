"""Optional inbound authentication: bearer tokens from --auth-token-file, compared in constant time.

Header-less GET /health (load-balancer probes) stays open; the admin port never asks.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence

from aiohttp import hdrs
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.errors import Unauthorized
from gateway.messages import Request


def _digest(token: str) -> bytes:
    # Comparing fixed-length digests keeps compare_digest's time independent of the token's length.
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


Authenticate = Callable[[Request], Request]


def bearer_auth(tokens: Sequence[str], routing_headers: Sequence[str], forward: bool) -> Authenticate:
    """A check raising 401 unless Authorization is `Bearer <one of tokens>`.

    It returns the request to forward: without Authorization unless forward is set.
    """
    digests = tuple(_digest(token) for token in tokens)

    def accepted(authorization: str) -> bool:
        scheme, _, token = authorization.partition(" ")
        presented = _digest(token.strip())
        matched = False
        for digest in digests:  # no early exit: every token is compared every time
            matched |= hmac.compare_digest(presented, digest)
        return scheme.lower() == "bearer" and matched

    def authenticate(request: Request) -> Request:
        if (request.method == "GET" and request.path == "/health"
                and not any(name in request.headers for name in routing_headers)):
            return request
        if not accepted(request.headers.get(hdrs.AUTHORIZATION, "")):
            raise Unauthorized("a valid Authorization: Bearer token is required")
        if not forward:
            upstream_view = CIMultiDict(request.headers)
            del upstream_view[hdrs.AUTHORIZATION]
            request.headers = CIMultiDictProxy(upstream_view)
        return request

    return authenticate
