"""TLS on the proxy port as the event loop serves it, made reloadable and observable.

The port listens with a ServingContext: the loop's own TLS (uvloop's or asyncio's) does every
handshake, and the HTTP server gets the decrypted connection as from a plain one. Two seams of the
ssl module, both public, are used:

- each connection's TLS object comes from `ServingContext.wrap_bio`, which takes it from `current`,
  the context built from the files (tls.py). A reload replaces `current`: new connections get the
  new certificate, key and client CA, and established ones keep the session they have;
- that object's class (SSLContext.sslobject_class) watches do_handshake: asyncio and uvloop both
  swallow a failed server-side handshake (an SSLError is an OSError, which they log only in debug
  mode, and the connection's protocol never hears of it), so the failure is classified, counted
  and logged here, at most once per reason per LOG_EVERY_S so that a scanner cannot flood the log.

A client that connects and leaves (or stalls until the loop's 60 s handshake timeout) without a
TLS error is not counted: no TLS error happened, and the loop reports it nowhere.
"""

from __future__ import annotations

import ssl
import time
from typing import TYPE_CHECKING, Final, cast

import structlog

if TYPE_CHECKING:
    from prometheus_client import Counter

log = structlog.get_logger(__name__)

# At most one tls_handshake_failed line per reason in this many seconds; the next says how many it skipped.
LOG_EVERY_S: Final = 10.0

# The reason label of aenv_gateway_tls_handshake_failures_total, from OpenSSL's reason code.
NO_CLIENT_CERTIFICATE: Final = "no_client_certificate"
UNTRUSTED_CLIENT_CERTIFICATE: Final = "untrusted_client_certificate"
CLIENT_REJECTED_CERTIFICATE: Final = "client_rejected_certificate"
NOT_TLS: Final = "not_tls"
PROTOCOL_VERSION: Final = "protocol_version"
NO_SHARED_CIPHER: Final = "no_shared_cipher"
CLOSED: Final = "closed"
OTHER: Final = "other"
FAILURE_REASONS: Final = (NO_CLIENT_CERTIFICATE, UNTRUSTED_CLIENT_CERTIFICATE, CLIENT_REJECTED_CERTIFICATE, NOT_TLS,
                          PROTOCOL_VERSION, NO_SHARED_CIPHER, CLOSED, OTHER)
_BY_OPENSSL_REASON: Final = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": NO_CLIENT_CERTIFICATE,
    "CERTIFICATE_VERIFY_FAILED": UNTRUSTED_CLIENT_CERTIFICATE,
    "TLSV1_ALERT_UNKNOWN_CA": CLIENT_REJECTED_CERTIFICATE,
    "SSLV3_ALERT_BAD_CERTIFICATE": CLIENT_REJECTED_CERTIFICATE,
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": CLIENT_REJECTED_CERTIFICATE,
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": CLIENT_REJECTED_CERTIFICATE,
    "TLSV1_ALERT_DECRYPT_ERROR": CLIENT_REJECTED_CERTIFICATE,
    "HTTP_REQUEST": NOT_TLS,
    "HTTPS_PROXY_REQUEST": NOT_TLS,
    "WRONG_VERSION_NUMBER": NOT_TLS,
    "UNKNOWN_PROTOCOL": NOT_TLS,
    "PACKET_LENGTH_TOO_LONG": NOT_TLS,
    "RECORD_LENGTH_MISMATCH": NOT_TLS,
    "UNSUPPORTED_PROTOCOL": PROTOCOL_VERSION,
    "TLSV1_ALERT_PROTOCOL_VERSION": PROTOCOL_VERSION,
    "NO_SHARED_CIPHER": NO_SHARED_CIPHER,
    "NO_SUITABLE_SIGNATURE_ALGORITHM": NO_SHARED_CIPHER,
    "UNEXPECTED_EOF_WHILE_READING": CLOSED,
}


def failure_reason(exc: ssl.SSLError) -> str:
    """The bounded label for a failed handshake."""
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError | ssl.SSLSyscallError):
        return CLOSED
    return _BY_OPENSSL_REASON.get(exc.reason or "", OTHER)


class HandshakeFailures:
    """Counts every failed handshake; logs the first of each reason, then one per LOG_EVERY_S."""

    def __init__(self, counter: Counter) -> None:
        self._children = {reason: counter.labels(reason) for reason in FAILURE_REASONS}
        self._next_line_at: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def record(self, exc: ssl.SSLError, now: float) -> str:
        reason = failure_reason(exc)
        self._children[reason].inc()
        if now < self._next_line_at.get(reason, 0.0):
            self._skipped[reason] = self._skipped.get(reason, 0) + 1
            return reason
        self._next_line_at[reason] = now + LOG_EVERY_S
        verify_message = getattr(exc, "verify_message", None)
        log.warning("tls_handshake_failed", reason=reason, openssl_reason=str(exc.reason or exc.__class__.__name__),
                    verify_message=str(verify_message)[:120] if verify_message else None,
                    not_logged_since_last=self._skipped.pop(reason, 0))
        return reason


class ObservedSSLObject(ssl.SSLObject):
    """A connection's TLS state, as the loop drives it; a handshake that fails is recorded, then raised."""

    failures: HandshakeFailures | None = None

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):  # more bytes needed: the loop calls again
            raise
        except ssl.SSLError as exc:
            if self.failures is not None:
                self.failures.record(exc, time.monotonic())
            raise


class ServingContext(ssl.SSLContext):
    """The context the proxy port listens with; each connection's TLS object comes from `current`."""

    def __new__(cls, current: ssl.SSLContext, failures: HandshakeFailures) -> ServingContext:
        return super().__new__(cls, ssl.PROTOCOL_TLS_SERVER)

    def __init__(self, current: ssl.SSLContext, failures: HandshakeFailures) -> None:
        self.failures = failures
        self.current = current
        self.use(current)

    def use(self, current: ssl.SSLContext) -> None:
        """Serve new connections with this context (built by tls.build_server_context)."""
        current.sslobject_class = ObservedSSLObject
        self.current = current

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, server_side: bool = False,
                 server_hostname: str | bytes | None = None, session: ssl.SSLSession | None = None,
                 ) -> ssl.SSLObject:
        tls_object = cast(ObservedSSLObject, self.current.wrap_bio(
            incoming, outgoing, server_side=server_side, server_hostname=server_hostname, session=session))
        tls_object.failures = self.failures
        return tls_object
