"""Engines turn a downstream request's headers and path into a Target; the table of engines.

An engine is chosen once at startup by --schedule-type; per request it only resolves the target.
The names --schedule-type accepts are config.ENGINE_NAMES (config imports no engine); this table has
one entry for each (tests/test_config.py checks). Target and Engine live in engines/base.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final

from gateway.engines.arca import ArcaEngine
from gateway.engines.base import Engine, Target
from gateway.engines.proxy_url import ProxyUrlEngine

if TYPE_CHECKING:
    from gateway.config import Settings

__all__ = ["ENGINES", "Engine", "Target", "build_engine"]

ENGINES: Final[Mapping[str, Callable[[Settings], Engine]]] = {
    "k8s": ProxyUrlEngine.from_settings,
    "standard": ProxyUrlEngine.from_settings,
    "faas": ProxyUrlEngine.from_settings,
    "arca": ArcaEngine.from_settings,
}


def build_engine(settings: Settings) -> Engine:
    """The engine --schedule-type names, validated against the settings (ConfigError if not)."""
    return ENGINES[settings.schedule_type](settings)
