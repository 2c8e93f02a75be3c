"""TLS on the proxy port: the server SSLContext built from --tls-cert, --tls-key and --tls-client-ca.

Each file is checked on its own first, so that a bad one stops startup (or a reload) with one line
naming its setting; OpenSSL's own errors do not say which file they are about. The handshakes
themselves are handshake.py's.
"""

from __future__ import annotations

import hashlib
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Final

from gateway.errors import ConfigError

if TYPE_CHECKING:
    from gateway.config import Settings

# What a browser-era client may still offer below this is refused (RFC 8996 deprecates TLS 1.0 and 1.1).
MINIMUM_VERSION: Final = ssl.TLSVersion.TLSv1_2
# The proxy port speaks HTTP/1.1 only: a client offering h2 alone gets no protocol rather than a surprise.
ALPN_PROTOCOLS: Final = ("http/1.1",)
_CERT_BEGIN: Final = "-----BEGIN CERTIFICATE-----"


def build_server_context(settings: Settings) -> ssl.SSLContext | None:
    """The context for the proxy port, or None when it speaks plain HTTP; ConfigError naming the setting."""
    if settings.tls_cert is None and settings.tls_key is None:
        if settings.tls_client_ca is not None:
            raise ConfigError("--tls-client-ca: client certificates need TLS: set --tls-cert and --tls-key too")
        return None
    if settings.tls_cert is None or settings.tls_key is None:
        missing = "--tls-key" if settings.tls_cert is not None else "--tls-cert"
        given = "--tls-cert" if settings.tls_cert is not None else "--tls-key"
        raise ConfigError(f"{missing}: {given} is set without it; give both")
    _read_pem("--tls-cert", settings.tls_cert, _CERT_BEGIN, "a PEM certificate")
    _read_pem("--tls-key", settings.tls_key, "PRIVATE KEY-----", "a PEM private key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    context.set_alpn_protocols(list(ALPN_PROTOCOLS))
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key, password=_no_password)
    except ssl.SSLError as exc:
        reason = exc.reason or ""
        if reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"--tls-key: {settings.tls_key} is not the key of the certificate in "
                              f"{settings.tls_cert}") from exc
        if reason in ("BAD_DECRYPT", "BAD_PASSWORD_READ") or "PROBLEMS_GETTING_PASSWORD" in reason:
            raise ConfigError(f"--tls-key: {settings.tls_key} is encrypted; give an unencrypted key") from exc
        raise ConfigError(f"--tls-cert/--tls-key: {settings.tls_cert} and {settings.tls_key} cannot be "
                          f"loaded ({reason or exc.__class__.__name__})") from exc
    except ValueError as exc:  # _no_password: the key asks for a password
        raise ConfigError(f"--tls-key: {settings.tls_key} is encrypted; give an unencrypted key") from exc
    except OSError as exc:  # a file gone since it was read (a reload racing a rotation)
        raise ConfigError(f"--tls-cert/--tls-key: cannot read {settings.tls_cert} or {settings.tls_key}: "
                          f"{exc.strerror}") from exc
    if settings.tls_client_ca is not None:
        text = _read_pem("--tls-client-ca", settings.tls_client_ca, _CERT_BEGIN, "PEM CA certificates")
        try:
            context.load_verify_locations(cadata=text)
        except ssl.SSLError as exc:
            raise ConfigError(f"--tls-client-ca: {settings.tls_client_ca} holds no valid PEM CA certificate "
                              f"({exc.reason or exc.__class__.__name__})") from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def tls_fingerprint(settings: Settings) -> bytes:
    """A digest of the TLS files' contents: a reload tells a renewed certificate from the same one."""
    digest = hashlib.sha256()
    for path in (settings.tls_cert, settings.tls_key, settings.tls_client_ca):
        digest.update(b"\0")
        if path is not None:
            try:
                digest.update(Path(path).read_bytes())
            except OSError:
                digest.update(b"unreadable")
    return digest.digest()


def _read_pem(setting: str, path: str, marker: str, what: str) -> str:
    try:
        text = Path(path).read_text(encoding="ascii")
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{setting}: {path} is not {what} (PEM is ASCII text)") from exc
    if marker not in text:
        raise ConfigError(f"{setting}: {path} holds no {what.removeprefix('a ')}")
    if marker == _CERT_BEGIN:
        try:  # parsed here, with the setting in hand: load_cert_chain would not say which file is wrong
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=text)
        except ssl.SSLError as exc:
            raise ConfigError(f"{setting}: {path} holds no valid {what.removeprefix('a ')} "
                              f"({exc.reason or exc.__class__.__name__})") from exc
    return text


def _no_password() -> str:
    # load_cert_chain would otherwise ask for an encrypted key's password on the terminal.
    raise ValueError("the key is encrypted")
