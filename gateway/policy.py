"""Target policy (SSRF): which upstream (address, port) pairs the gateway may connect to.

Rules come from --target-allow / --target-deny plus built-in denials (metadata, link-local,
unspecified, the gateway's own ports on local addresses). `resolve_allowed` is the one seam every
transport calls at connect time: it resolves a host and checks every address it gets. A rule's
parsing and matching are rules.py's.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Final

from gateway.errors import ConfigError, TargetForbidden
from gateway.rules import IPAddress, IPNetwork, Rule, canonical, literal_address

if TYPE_CHECKING:
    from gateway.config import Settings

_CACHE_LIMIT: Final = 16384

_BUILTIN_DENY: Final = (
    Rule("built-in: link-local and cloud metadata 169.254.0.0/16", ipaddress.ip_network("169.254.0.0/16")),
    Rule("built-in: cloud metadata 100.100.100.200", ipaddress.ip_network("100.100.100.200/32")),
    Rule("built-in: cloud metadata fd00:ec2::254", ipaddress.ip_network("fd00:ec2::254/128")),
    Rule("built-in: link-local fe80::/10", ipaddress.ip_network("fe80::/10")),
    Rule("built-in: unspecified 0.0.0.0/8", ipaddress.ip_network("0.0.0.0/8")),
    Rule("built-in: unspecified ::", ipaddress.ip_network("::/128")),
)
_LOCAL_NETWORKS: Final = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def _own_port_rules(listen_host: str, ports: Iterable[int]) -> tuple[Rule, ...]:
    networks: list[IPNetwork] = list(_LOCAL_NETWORKS)
    listen = literal_address(listen_host)
    if listen is not None and not ipaddress.ip_address(listen).is_unspecified:
        networks.append(ipaddress.ip_network(listen))
    return tuple(
        Rule(f"built-in: the gateway's own port {port} on {network}", network, port=port)
        for port in ports if port
        for network in networks
    )


class TargetPolicy:
    """Decides (host, address, port); deny rules first, then built-ins, then the allow list if any.

    A name is refused if ANY address it resolves to is refused: a name that mixes an allowed and a
    forbidden address is what DNS rebinding looks like, so we do not pick the allowed half.
    """

    def __init__(self, allow: Sequence[str] = (), deny: Sequence[str] = (), builtin: Sequence[Rule] = ()) -> None:
        self.allow = tuple(Rule.parse(text) for text in allow)
        self.deny = tuple(Rule.parse(text) for text in deny)
        self.builtin = (*_BUILTIN_DENY, *builtin)
        self._decisions: dict[tuple[str | None, str, int], str | None] = {}
        self._literals: dict[tuple[str, int], str | None] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> TargetPolicy:
        try:
            return cls(settings.target_allow, settings.target_deny,
                       _own_port_rules(settings.host, (settings.port, settings.admin_port)))
        except ValueError as exc:
            raise ConfigError(f"--target-allow/--target-deny: a rule {exc}") from exc

    def refusal(self, host: str | None, address: str, port: int) -> str | None:
        """The rule that refuses this (host name, canonical address, port), or None if allowed."""
        key = (host, address, port)
        try:
            return self._decisions[key]
        except KeyError:
            pass
        refused = self._decide(host, ipaddress.ip_address(address), port)
        if len(self._decisions) >= _CACHE_LIMIT:
            self._decisions.clear()
        self._decisions[key] = refused
        return refused

    def _decide(self, host: str | None, address: IPAddress, port: int) -> str | None:
        for rule in self.deny:
            if rule.matches(host, address, port):
                return f"target_deny {rule.text}"
        for builtin in self.builtin:
            if builtin.matches(None, address, port) and not any(
                rule.unlocks(builtin) and rule.matches(host, address, port) for rule in self.allow
            ):
                return builtin.text
        if self.allow and not any(rule.matches(host, address, port) for rule in self.allow):
            return "not in target_allow"
        return None

    def check(self, host: str | None, address: str, port: int) -> None:
        refused = self.refusal(host, address, port)
        if refused is not None:
            shown = f"[{address}]" if ":" in address else address
            raise TargetForbidden(f"target {shown}:{port} is refused by rule: {refused}", rule=refused)

    def allowed_literal(self, host: str, port: int) -> str | None:
        """The canonical address if host is an IP literal (checked: raises TargetForbidden), None for a name.

        Cached per (host, port): literal IPs are the common case in a cluster and cost a dict lookup.
        """
        key = (host, port)
        try:
            literal = self._literals[key]
        except KeyError:
            literal = literal_address(host)
            if len(self._literals) >= _CACHE_LIMIT:
                self._literals.clear()
            self._literals[key] = literal
        if literal is not None:
            self.check(None, literal, port)
        return literal

    async def resolve_allowed(self, host: str, port: int) -> list[str]:
        """The addresses to connect to for host:port, every one checked; raises TargetForbidden.

        Literal IPs (any spelling) are checked without DNS; names are resolved with the loop's
        getaddrinfo at connect time, so a rebinding name cannot swap in a forbidden address later.
        """
        literal = self.allowed_literal(host, port)
        if literal is not None:
            return [literal]
        name = host.rstrip(".").lower()
        infos = await asyncio.get_running_loop().getaddrinfo(name, port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys(
            str(canonical(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]))) for info in infos
        ))
        for address in addresses:
            self.check(name, address, port)
        return addresses
