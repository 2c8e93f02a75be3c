"""What tracing costs per proxied request: gateway CPU µs with tracing off, on, and without the extra.

Modes, each a fresh gateway process in front of bench/upstream.py:
  no-extra   opentelemetry cannot be imported (as after a plain `pip install .`)
  off        the extra installed, tracing not asked for (the default)
  on         OTEL_TRACES_EXPORTER=otlp, sampler always_on, every span exported to a local receiver
  ratio      on, parentbased_traceidratio 0.01: 1 request in 100 recorded (the callers send no traceparent)

Two measurements:
  default     rounds that alternate the modes (the machine is shared and noisy); per mode, the median
              of the rounds of gateway CPU (utime + stime from /proc, the export thread included) per
              request, under a fixed number of POST /mcp sent by an asyncio client at concurrency 8.
  --callgrind instructions, deterministic: the gateway runs under valgrind's callgrind, once for 1,000
              and once for 6,000 sequential POSTs; per request = (I(6000) - I(1000)) / 5000, so
              startup and shutdown cancel out. Slow (minutes per mode).

--checkout DIR runs the gateway from another checkout (its gateway/ package, this interpreter), e.g. main
for the off path before and after: `--checkout ../main --modes off`.

Run: .venv/bin/python bench/tracing_cost.py [--rounds 5] [--requests 20000] [--callgrind] [--checkout DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import HERE, PY, ROOT, cpu_seconds, wait_port

GATEWAY_CWD = [ROOT]  # where `python -m gateway` runs: its gateway/ package is the one imported
MODES = ("no-extra", "off", "on", "ratio")
BODY = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hi"}}}'
# Imports the gateway with opentelemetry made unimportable, then runs it as `python -m gateway` would.
NO_EXTRA = "import sys; sys.modules['opentelemetry'] = None; from gateway.cli import main; sys.exit(main())"

RECEIVER = """
import asyncio, sys
from aiohttp import web
async def export(request):
    await request.read()
    return web.Response(body=b"", content_type="application/x-protobuf")
app = web.Application()
app.router.add_post("/v1/traces", export)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def started(argv: list[str], port: int, env: dict[str, str] | None = None,
            limit_s: float = 60) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(argv, cwd=GATEWAY_CWD[0], env={**os.environ, **(env or {})},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, process, limit_s)
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=limit_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def gateway_command(mode: str, port: int) -> list[str]:
    args = ["--host", "127.0.0.1", "--port", str(port), "--admin-port", str(free_port()), "--log-level", "warning"]
    if mode == "no-extra":
        return [PY, "-c", NO_EXTRA, *args]
    return [PY, "-m", "gateway", *args]


def gateway_env(mode: str, receiver_port: int) -> dict[str, str]:
    env = {name: "" for name in os.environ if name.startswith("OTEL_")}
    if mode in ("on", "ratio"):
        env |= {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver_port}",
                "OTEL_TRACES_SAMPLER": "always_on" if mode == "on" else "parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": "0.01", "OTEL_BSP_SCHEDULE_DELAY": "500"}
    return env


async def post_many(port: int, upstream_port: int, count: int, concurrency: int) -> None:
    """count POST /mcp over `concurrency` keep-alive connections, each waiting for its reply."""
    request = (f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
               f"AEnvCore-MCPProxy-URL: http://127.0.0.1:{upstream_port}\r\n"
               f"Content-Length: {len(BODY)}\r\n\r\n").encode() + BODY
    left = [count]

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while left[0] > 0:
                left[0] -= 1
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    raise SystemExit(f"tracing_cost: the gateway answered {head[:40]!r}")
                match = re.search(rb"(?i)content-length: *(\d+)", head)
                assert match is not None
                await reader.readexactly(int(match.group(1)))
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def cpu_round(mode: str, upstream_port: int, receiver_port: int, requests: int) -> float:
    port = free_port()
    with started(gateway_command(mode, port), port, gateway_env(mode, receiver_port)) as gateway:
        asyncio.run(post_many(port, upstream_port, 2000, 8))  # warm up: connections, caches, label sets
        before = cpu_seconds(gateway.pid)
        asyncio.run(post_many(port, upstream_port, requests, 8))
        time.sleep(0.7)  # the export thread sends the last batch (OTEL_BSP_SCHEDULE_DELAY 500 ms)
        return (cpu_seconds(gateway.pid) - before) / requests * 1e6


def instructions(mode: str, upstream_port: int, receiver_port: int, requests: int, out_dir: Path) -> int:
    port = free_port()
    out = out_dir / f"callgrind.{mode}.{requests}"
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--trace-children=no",
            *gateway_command(mode, port)]
    with started(argv, port, gateway_env(mode, receiver_port), limit_s=600):
        asyncio.run(post_many(port, upstream_port, requests, 1))
        time.sleep(1.0)
    text = out.read_text(errors="replace")
    match = re.search(r"^summary:\s+(\d+)", text, re.MULTILINE) or re.search(r"^totals:\s+(\d+)", text, re.MULTILINE)
    if match is None:
        raise SystemExit(f"tracing_cost: no totals in {out}")
    return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--callgrind", action="store_true")
    parser.add_argument("--checkout", type=Path, help="run the gateway from this checkout's gateway/")
    args = parser.parse_args()
    upstream_port, receiver_port = free_port(), free_port()
    with started([PY, str(HERE / "upstream.py"), "--port", str(upstream_port)], upstream_port), \
            started([PY, "-c", RECEIVER, str(receiver_port)], receiver_port):
        if args.checkout is not None:
            GATEWAY_CWD[0] = args.checkout.resolve()
        if args.callgrind:
            with tempfile.TemporaryDirectory(prefix="tracing-cost-") as tmp:
                print("mode       instructions per request (callgrind, (I(6000) - I(1000)) / 5000)")
                for mode in args.modes:
                    low = instructions(mode, upstream_port, receiver_port, 1000, Path(tmp))
                    high = instructions(mode, upstream_port, receiver_port, 6000, Path(tmp))
                    print(f"{mode:<10} {(high - low) / 5000:>12,.0f}", flush=True)
            return
        samples: dict[str, list[float]] = {mode: [] for mode in args.modes}
        for number in range(args.rounds):
            for mode in args.modes:
                samples[mode].append(cpu_round(mode, upstream_port, receiver_port, args.requests))
            print(f"round {number + 1}: " + ", ".join(f"{mode} {values[-1]:.1f}" for mode, values in samples.items()),
                  flush=True)
    print(f"\ngateway CPU µs per POST /mcp, median of {args.rounds} alternated rounds of {args.requests}:")
    base = statistics.median(samples["off"]) if "off" in samples else None
    for mode, values in samples.items():
        median = statistics.median(values)
        delta = f"  ({median - base:+.1f} vs off)" if base is not None and mode != "off" else ""
        print(f"  {mode:<9} {median:6.1f}  (min {min(values):.1f}, max {max(values):.1f}){delta}")


if __name__ == "__main__":
    main()
