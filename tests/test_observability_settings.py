"""The logging and metrics settings: parsing, defaults and what the startup line shows."""

from __future__ import annotations

import pytest

from gateway.config import Settings, load_settings
from gateway.errors import ConfigError
from gateway.log import redact_body, shown_settings


def test_logging_and_metrics_settings_come_from_flags_and_environment() -> None:
    settings = load_settings(
        ["--log-format", "json", "--log-bodies", "512", "--metrics-multiproc-dir", "/run/gateway-metrics"],
        {"GATEWAY_LOG_LEVEL": "warning"},
    )

    assert (settings.log_format, settings.log_level, settings.log_bodies, settings.metrics_multiproc_dir) == (
        "json", "warning", 512, "/run/gateway-metrics")
    assert (Settings().log_format, Settings().log_level, Settings().log_bodies, Settings().metrics_multiproc_dir) == (
        "auto", "info", 0, "")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--log-format", "xml"], "--log-format: 'xml' from --log-format must be one of auto, json, console"),
        (["--log-level", "loud"], "--log-level: 'loud' from --log-level must be one of debug, info, warning, error"),
        (["--log-bodies", "-1"], "--log-bodies: '-1' from --log-bodies must be 0 or more"),
    ],
)
def test_bad_logging_settings_stop_startup_naming_the_flag(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(argv, {})
    assert str(raised.value) == message


def test_the_startup_line_shows_every_setting_but_secrets() -> None:
    shown = shown_settings(Settings(arca_api_key="k-5ecret", log_bodies=3))

    assert shown["arca_api_key"] == "<redacted>"
    assert (shown["log_bodies"], shown["schedule_type"], shown["config_path"]) == (3, "k8s", None)
    assert "k-5ecret" not in repr(shown)


def test_body_redaction_masks_secret_members_bearer_tokens_and_configured_secrets() -> None:
    body = b'{"api_key": "a1", "Authorization": "x", "note": "Bearer abc.def and K-1", "n": 1}'

    assert redact_body(body, ["K-1"]) == (
        '{"api_key": "<redacted>", "Authorization": "<redacted>", "note": "Bearer <redacted> and <redacted>", "n": 1}')
