"""structlog configuration, done once at startup by the CLI."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(level: str = "info", json_format: bool | None = None) -> None:
    """JSON lines when stdout is not a terminal (containers), a readable console otherwise."""
    if json_format is None:
        json_format = not sys.stdout.isatty()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json_format else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
