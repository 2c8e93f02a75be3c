"""Target rules: one --target-allow / --target-deny entry, parsed; and IP literals in any spelling.

Pure: values in, values out (socket.inet_aton only parses), no settings. Apart from the policy
(policy.py) so that config can refuse a bad rule at startup without importing the policy, which is
built from the settings.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Final

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Characters of the legacy IPv4 spellings inet_aton accepts: 2852039166, 0xa9.254.169.254, 0251.0376…
_LEGACY_IPV4: Final = re.compile(r"[0-9a-fA-FxX.]+")
_PORT_SUFFIX: Final = re.compile(r"^(?P<where>.*?):(?P<port>\d+)$")
_HOSTNAME: Final = re.compile(r"(\*\.)?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*")


def literal_address(host: str) -> str | None:
    """The canonical address if host is an IP literal in any spelling, else None (a name to resolve).

    Accepts IPv6 with or without brackets (IPv4-mapped becomes IPv4), dotted quads, and the
    decimal, hex and octal IPv4 forms that inet_aton and so getaddrinfo accept; a trailing dot is ignored.
    """
    host = host.strip("[]").rstrip(".")
    if ":" in host:
        try:
            return str(canonical(ipaddress.IPv6Address(host.split("%", 1)[0])))
        except ValueError:
            return None
    if not host or not _LEGACY_IPV4.fullmatch(host) or not host[0].isdigit():
        return None
    try:
        return socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        return None


def canonical(address: IPAddress) -> IPAddress:
    """An IPv4-mapped address (::ffff:a.b.c.d) reaches the IPv4 host, so it is checked and used as one."""
    if isinstance(address, ipaddress.IPv6Address):
        return address.ipv4_mapped or address
    return address


@dataclass(frozen=True, slots=True)
class Rule:
    """One allow or deny entry: a network, a host name (`*.` for suffixes) or neither, and maybe a port."""

    text: str
    network: IPNetwork | None = None
    host: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> Rule:
        """`10.0.0.0/8`, `10.1.2.3:8081`, `[fd00::/8]:8081`, `:8081`, `sandbox.internal`, `*.svc.local:8081`."""
        entry = text.strip().lower()
        port: int | None = None
        match = _PORT_SUFFIX.match(entry)
        if match and (entry.startswith("[") or entry.count(":") == 1):
            entry, port = match["where"], int(match["port"])
            if not 1 <= port <= 65535:
                raise ValueError(f"must have a port between 1 and 65535 (got {text!r})")
        entry = entry.strip("[]")
        if entry in ("", "*"):
            if port is None:
                raise ValueError(f"must name a network, host or port (got {text!r})")
            return cls(text, port=port)
        try:
            network = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            if not _HOSTNAME.fullmatch(entry.rstrip(".")):
                raise ValueError(f"must be a CIDR, address, host name or :port (got {text!r})") from None
            return cls(text, host=entry.rstrip("."), port=port)
        return cls(text, network=network, port=port)

    def matches(self, host: str | None, address: IPAddress, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            return address.version == self.network.version and address in self.network
        if self.host is not None:
            if host is None:
                return False
            if self.host.startswith("*."):
                return host.endswith(self.host[1:])
            return host == self.host
        return True

    def unlocks(self, builtin: Rule) -> bool:
        """An allow rule lifts a built-in denial only if it is at least as specific (no 0.0.0.0/0)."""
        if self.network is None or builtin.network is None:
            return False
        if self.network.version != builtin.network.version or not self.network.subnet_of(builtin.network):  # type: ignore[arg-type]
            return False
        return builtin.port is None or self.port == builtin.port
