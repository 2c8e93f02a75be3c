"""What every engine speaks: the Target a request resolves to, and the Engine protocol.

In a module of its own so that the engines (arca, proxy_url) and their users (limits, proxy) import
these types without importing the table of engines in engines/__init__.py, which imports them all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from yarl import URL


@dataclass(frozen=True, slots=True)
class Target:
    """Where one downstream request goes, and the headers its engine adds."""

    url: URL
    added_headers: tuple[tuple[str, str], ...] = ()
    authority: str = ""  # host:port of url when the engine worked it out (errors.authority), for the log line


class Engine(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def routing_headers(self) -> tuple[str, ...]:
        """The headers that make a request the engine's to route; a GET /health without any is ours."""

    def resolve(self, headers: Mapping[str, str], raw_path_qs: str) -> Target: ...
