"""`mcp-gateway --check-config`: startup's checks, files included, without binding a port; exit 0 or 2."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from gateway.cli import main
from tests.process import run_gateway_command


def check(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """The program's main() in this process: the check binds nothing and changes no signal handler."""
    returncode = main(["--check-config", *argv])
    captured = capsys.readouterr()
    return returncode, captured.out, captured.err


def test_a_good_configuration_prints_one_ok_line_and_binds_nothing(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# one per line\nsecret-token\n")
    config = tmp_path / "gateway.toml"
    config.write_text(f'port = PORT\nauth_token_file = "{tokens}"\ntarget_allow = ["10.0.0.0/8:8081"]\n')
    with socket.socket() as taken:  # the proxy port is in use: a check that bound it would fail
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config.write_text(config.read_text().replace("PORT", str(port)))
        result = run_gateway_command(["--check-config", "--config", str(config), "--host", "127.0.0.1"])

    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == (
        f"mcp-gateway: configuration OK: {config}: engine k8s, proxy 127.0.0.1:{port} (plain HTTP), admin port 8082, "
        "1 bearer token(s), 1 target_allow and 0 target_deny rule(s)\n")
    assert "secret-token" not in result.stdout


def test_the_shipped_configurations_check_ok(capsys: pytest.CaptureFixture[str]) -> None:
    for path in ("config/gateway.toml", "config/cluster.toml"):
        returncode, out, err = check(["--config", path], capsys)
        assert (returncode, err) == (0, "")
        assert out.startswith(f"mcp-gateway: configuration OK: {path}: engine k8s, ")


def test_a_bad_file_named_by_the_configuration_fails_the_check_with_the_startup_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "tokens"
    empty.write_text("# no token yet\n")
    config = tmp_path / "gateway.toml"
    config.write_text(f'auth_token_file = "{empty}"\n')

    broken = tmp_path / "broken.toml"
    broken.write_text("port = = 1\n")

    bad_tokens = check(["--config", str(config)], capsys)
    bad_toml = check(["--config", str(broken)], capsys)
    arca_without_key = check(["--schedule-type", "arca", "--arca-base-url", "http://arca.example"], capsys)
    bad_key = check(["--tls-cert", "config/gateway.toml", "--tls-key", str(empty)], capsys)

    assert bad_tokens == (2, "", f"mcp-gateway: error: --auth-token-file: '{empty}' from auth_token_file in {config} "
                                 "must contain at least one token\n")
    assert bad_toml[:2] == (2, "")
    assert bad_toml[2].startswith(f"mcp-gateway: error: --config: {broken} is not valid TOML")
    assert (arca_without_key[:2], arca_without_key[2].count("\n")) == ((2, ""), 1)
    assert arca_without_key[2].startswith("mcp-gateway: error: --schedule-type arca needs")
    assert bad_key == (2, "", "mcp-gateway: error: --tls-cert: config/gateway.toml holds no PEM certificate\n")
