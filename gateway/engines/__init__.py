"""Engines turn a downstream request's headers and path into a Target; the table of engines.

An engine is chosen once at startup by --schedule-type; per request it only resolves the target.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

from yarl import URL

if TYPE_CHECKING:
    from gateway.config import Settings


@dataclass(frozen=True, slots=True)
class Target:
    """Where one downstream request goes, and the headers its engine adds."""

    url: URL
    added_headers: tuple[tuple[str, str], ...] = ()


class Engine(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def routing_headers(self) -> tuple[str, ...]:
        """The headers that make a request the engine's to route; a GET /health without any is ours."""


    def resolve(self, headers: Mapping[str, str], raw_path_qs: str) -> Target: ...


from gateway.engines.arca import ArcaEngine  # noqa: E402  (the engines import Target above)
from gateway.engines.proxy_url import ProxyUrlEngine  # noqa: E402

ENGINES: Final[Mapping[str, Callable[[Settings], Engine]]] = {
    "k8s": ProxyUrlEngine.from_settings,
    "standard": ProxyUrlEngine.from_settings,
    "faas": ProxyUrlEngine.from_settings,
    "arca": ArcaEngine.from_settings,
}
ENGINE_NAMES: Final = tuple(sorted(ENGINES))


def build_engine(settings: Settings) -> Engine:
    """The engine --schedule-type names, validated against the settings (ConfigError if not)."""
    return ENGINES[settings.schedule_type](settings)
