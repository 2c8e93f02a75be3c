"""The arca engine: target from the configured Arca base URL plus AEnvCore-EnvInstance-ID."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from gateway.errors import ConfigError

if TYPE_CHECKING:
    from gateway.config import Settings
    from gateway.engines import Target


class ArcaEngine:
    name = "arca"
    routing_headers: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> ArcaEngine:
        # TODO(#3): both data-plane modes.
        raise ConfigError("--schedule-type arca is not yet supported by this build")

    def resolve(self, headers: Mapping[str, str], raw_path_qs: str) -> Target:
        raise NotImplementedError
