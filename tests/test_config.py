from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import ENGINE_NAMES, Settings, load_settings
from gateway.engines import ENGINES
from gateway.errors import ConfigError


def test_defaults_match_the_design() -> None:
    settings = load_settings([], {})
    assert (settings.host, settings.port, settings.admin_port, settings.schedule_type, settings.arca_data_plane) == (
        "0.0.0.0", 8081, 8082, "k8s", "reject")


def test_every_schedule_type_has_an_engine() -> None:
    """config names the --schedule-type values without importing the engines; the table must match."""
    assert ENGINE_NAMES == tuple(sorted(ENGINES))


def test_flag_beats_environment_beats_file_beats_default(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('port = 7001\nadmin_port = 7002\nschedule_type = "faas"\nhost = "127.0.0.3"\n')
    environ = {"GATEWAY_CONFIG": str(config), "GATEWAY_PORT": "7101", "GATEWAY_ADMIN_PORT": "7102"}

    settings = load_settings(["--port", "7201"], environ)

    assert (settings.port, settings.admin_port, settings.schedule_type, settings.host, settings.config_path) == (
        7201, 7102, "faas", "127.0.0.3", str(config))


def test_config_flag_beats_config_env(tmp_path: Path) -> None:
    chosen, ignored = tmp_path / "a.toml", tmp_path / "b.toml"
    chosen.write_text("port = 1\n")
    ignored.write_text("port = 2\n")
    assert load_settings(["--config", str(chosen)], {"GATEWAY_CONFIG": str(ignored)}).port == 1


def test_shipped_config_file_loads() -> None:
    settings = load_settings(["--config", "config/gateway.toml"], {})
    assert (settings.port, settings.admin_port, settings.schedule_type) == (8081, 8082, "k8s")


@pytest.mark.parametrize(("argv", "environ", "message"), [
    (["--port", "abc"], {}, "--port: 'abc' from --port is not valid"),
    (["--port", "70000"], {}, "--port: '70000' from --port must be between 0 and 65535"),
    ([], {"GATEWAY_ADMIN_PORT": "-1"}, "--admin-port: '-1' from GATEWAY_ADMIN_PORT must be between 0 and 65535"),
    (["--schedule-type", "nomad"], {}, "--schedule-type: 'nomad' from --schedule-type must be one of arca, faas"),
    ([], {"GATEWAY_SCHEDULE_TYPE": "K8S"}, "--schedule-type: 'K8S' from GATEWAY_SCHEDULE_TYPE must be one of"),
    (["--connect-timeout", "0"], {}, "--connect-timeout: '0' from --connect-timeout must be greater than 0"),
    (["--arca-base-url", "ftp://x"], {}, "--arca-base-url: 'ftp://x' from --arca-base-url must be an http"),
    (["--nope"], {}, "unrecognized arguments: --nope"),
    (["--config", "/nonexistent.toml"], {}, "--config: cannot read /nonexistent.toml"),
])
def test_bad_settings_name_the_setting(argv: list[str], environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(argv, environ)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_config_file_errors_name_the_file_and_key(tmp_path: Path) -> None:
    config = tmp_path / "g.toml"
    config.write_text("prot = 1\n")
    with pytest.raises(ConfigError, match=r"has unknown setting\(s\) prot"):
        load_settings(["--config", str(config)], {})
    config.write_text("port = \n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_settings(["--config", str(config)], {})
    config.write_text('port = "x"\n')
    with pytest.raises(ConfigError, match=rf"--port: 'x' from port in {config} is not valid"):
        load_settings(["--config", str(config)], {})


def test_secret_values_never_appear_in_errors_or_repr() -> None:
    settings = load_settings(["--arca-api-key", "sekrit-key"], {})
    assert "sekrit-key" not in repr(settings)
    assert isinstance(settings, Settings)


@given(st.text(max_size=12))
def test_any_port_string_either_parses_or_names_the_flag(raw: str) -> None:
    try:
        port = load_settings(["--port=" + raw], {}).port
    except ConfigError as exc:
        assert str(exc).startswith(("--port", "argument --port", "expected one argument"))
    else:
        assert 0 <= port <= 65535


def test_every_setting_is_documented_in_the_readme_and_the_shipped_config() -> None:
    readme = Path("README.md").read_text()
    shipped = Path("config/gateway.toml").read_text()
    from gateway.config import OPTIONS

    undocumented = [option.flag for option in OPTIONS if f"`{option.flag}`" not in readme]
    missing_from_config = [option.name for option in OPTIONS if option.name not in shipped]
    assert (undocumented, missing_from_config) == ([], [])


def test_allowed_origins_and_hosts_come_from_flags_environment_or_file(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('allow_origin = ["https://App.example.com:443"]\nallow_host = ["gw.example.com:8081"]\n')

    from_flags = load_settings(["--allow-origin", "http://a.example", "--allow-origin", "*",
                                "--allow-host", "GW.example.com"], {})
    from_env = load_settings([], {"GATEWAY_ALLOW_ORIGIN": "http://a.example:8080, http://b.example",
                                  "GATEWAY_ALLOW_HOST": "[::1]:8081"})
    from_file = load_settings(["--config", str(config)], {})

    assert (from_flags.allow_origin, from_flags.allow_host) == (("http://a.example", "*"), ("gw.example.com",))
    assert (from_env.allow_origin, from_env.allow_host) == (("http://a.example:8080", "http://b.example"),
                                                            ("[::1]:8081",))
    assert (from_file.allow_origin, from_file.allow_host) == (("https://app.example.com",), ("gw.example.com:8081",))


@pytest.mark.parametrize(("argv", "message"), [
    (["--allow-origin", "http://a.example/path"], "--allow-origin: ['http://a.example/path'] from --allow-origin "
                                                  "must be * or an origin"),
    (["--allow-origin", "a.example"], "--allow-origin: ['a.example'] from --allow-origin must be * or an origin"),
    (["--allow-host", "a b"], "--allow-host: ['a b'] from --allow-host must be * or a host name"),
])
def test_bad_allowed_origins_and_hosts_stop_startup(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(argv, {})
    assert str(caught.value).startswith(message)
