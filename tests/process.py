"""Run the real gateway program (python -m gateway) as a subprocess, bounded and always stopped."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from yarl import URL


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_gateway_command(args: Sequence[str], env: dict[str, str] | None = None,
                        timeout_s: float = 20) -> subprocess.CompletedProcess[str]:
    """Run the program to completion (for startup failures)."""
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True,
                          timeout=timeout_s, env={**os.environ, **(env or {})})


@dataclass(frozen=True, slots=True)
class GatewayProcess:
    process: subprocess.Popen[str]
    url: URL
    admin_url: URL


def wait_until_ready(admin_url: URL, process: subprocess.Popen[str], timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited with {process.returncode}: {process.stderr and process.stderr.read()}")
        try:
            with urllib.request.urlopen(str(admin_url / "readyz"), timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"gateway not ready at {admin_url} after {timeout_s} s")


@contextmanager
def gateway_process(*args: str, env: dict[str, str] | None = None, nofile: int | None = None
                    ) -> Iterator[GatewayProcess]:
    """Start the gateway on free loopback ports, wait for /readyz, stop it (SIGKILL if it lingers).

    nofile: its RLIMIT_NOFILE, soft and hard (so that it cannot raise it).
    """
    port, admin_port = free_port(), free_port()
    command = [sys.executable, "-m", "gateway", "--host", "127.0.0.1", "--port", str(port),
               "--admin-port", str(admin_port), *args]

    def limit_fds() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **(env or {})}, preexec_fn=limit_fds)
    try:
        admin_url = URL(f"http://127.0.0.1:{admin_port}")
        wait_until_ready(admin_url, process)
        yield GatewayProcess(process, URL(f"http://127.0.0.1:{port}"), admin_url)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        for stream in (process.stdout, process.stderr):
            if stream:
                stream.close()
