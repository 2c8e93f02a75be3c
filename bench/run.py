"""`make bench`: the gateway beside direct (no proxy) in one run, bounded to about two minutes.

Rows: direct (load straight to the upstream) and the gateway, in its pure-Python form and, when `make compile`
built it, its compiled form (setup.py), one after the other in the same run. Figures: req/s, p50/p99 for POST /mcp at
each concurrency, proxy CPU µs per request from /proc, upstream connections opened, SSE per-event
latency and CPU per event, peak RSS. Compare ratios within one run only: the machine is shared.
Load comes from wrk when installed (apt-get install wrk), else from bench/loadgen.py (slower).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pinned(cpu: int, argv: list[str]) -> list[str]:
    """Pin to one CPU when there are two or more and taskset exists: the proxy gets its own core."""
    if (os.cpu_count() or 1) >= 2 and shutil.which("taskset"):
        return ["taskset", "-c", str(cpu), *argv]
    return argv


def wait_port(port: int, process: subprocess.Popen[bytes], limit_s: float = 20) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"bench: {process.args} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.1)
    raise SystemExit(f"bench: nothing listens on {port} after {limit_s}s")


@contextlib.contextmanager
def started(argv: list[str], port: int, log: Path, cwd: Path = ROOT) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        process = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_port(port, process)
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def upstream_connections(upstream_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{upstream_port}/stats", timeout=5) as reply:
        return int(json.load(reply)["connections"]) - 1  # this call's own connection


def load(port: int, upstream_url: str, connections: int, duration_s: float) -> dict[str, float]:
    env = {**os.environ, "UPSTREAM_URL": upstream_url}
    if shutil.which("wrk"):
        argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration_s))}s", "--timeout", "5s", "--latency",
                "-s", str(HERE / "wrk_post.lua"), f"http://127.0.0.1:{port}/mcp"]
    else:
        argv = [PY, str(HERE / "loadgen.py"), "--port", str(port), "--upstream", upstream_url,
                "--connections", str(connections), "--duration", str(duration_s)]
    output = subprocess.run(pinned(0, argv), env=env, capture_output=True, text=True, timeout=duration_s + 30).stdout
    for line in output.splitlines():
        if line.startswith("WRKJSON "):
            return json.loads(line.removeprefix("WRKJSON "))  # type: ignore[no-any-return]
    raise SystemExit(f"bench: no result from the load generator:\n{output[-2000:]}")


async def sse_events(port: int, upstream_url: str, query: str, expected: int) -> list[int]:
    """Read one SSE stream; each event's latency in µs (arrival minus the upstream's send time)."""
    import aiohttp

    latencies: list[int] = []
    buffer = b""
    headers = {"Accept": "text/event-stream", "AEnvCore-MCPProxy-URL": upstream_url}
    async with aiohttp.ClientSession() as session, session.get(
        f"http://127.0.0.1:{port}/sse?{query}", headers=headers, timeout=aiohttp.ClientTimeout(total=60)
    ) as reply:
        try:
            while len(latencies) < expected:
                chunk = await asyncio.wait_for(reply.content.readany(), 10)
                if not chunk:
                    break
                now = time.time_ns()
                buffer += chunk
                *events, buffer = buffer.split(b"\n\n")
                latencies += [(now - int(event[6:event.index(b" ", 6)])) // 1000 for event in events]
        except TimeoutError:
            pass  # an event went missing: the table shows how many arrived
    return latencies


def percentile(values: list[int] | list[float], q: float) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))]) if ordered else 0.0


def measure_row(
    name: str, port: int, pid: int | None, upstream_port: int, args: argparse.Namespace
) -> dict[str, object]:
    upstream_url = f"http://127.0.0.1:{upstream_port}"
    row: dict[str, object] = {"name": name}
    load(port, upstream_url, max(args.concurrency), 1)  # warm-up
    for connections in args.concurrency:
        opened_before = upstream_connections(upstream_port)
        cpu_before = cpu_seconds(pid) if pid else 0.0
        result = load(port, upstream_url, connections, args.duration)
        cpu = cpu_seconds(pid) - cpu_before if pid else 0.0
        row[f"c{connections}"] = {
            **result,
            "cpu_us_per_req": cpu * 1e6 / result["requests"] if pid and result["requests"] else None,
            "upstream_conns_opened": upstream_connections(upstream_port) - opened_before,
        }
    latencies = asyncio.run(sse_events(port, upstream_url, f"n={args.sse_events}&size=200&interval_ms=10",
                                       args.sse_events))
    row["sse"] = {"events": len(latencies), "expected": args.sse_events,
                  "p50_us": percentile(latencies, 0.5), "p99_us": percentile(latencies, 0.99)}
    cpu_before = cpu_seconds(pid) if pid else 0.0
    burst = asyncio.run(sse_events(port, upstream_url, "n=20000&size=100&interval_ms=0", 20000))
    row["sse"]["burst_events"] = len(burst)  # type: ignore[index]
    row["sse"]["cpu_us_per_event"] = (cpu_seconds(pid) - cpu_before) * 1e6 / max(1, len(burst)) if pid else None  # type: ignore[index]
    row["peak_rss_mb"] = peak_rss_mb(pid) if pid else None
    return row


def table(rows: list[dict[str, object]], args: argparse.Namespace, tool: str) -> str:
    direct = rows[0]

    def ratio(value: float, base: float) -> str:
        return f" ({value / base:.2f}×)" if base else ""  # noqa: RUF001

    lines = [f"## make bench ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load: {tool}, "
             f"{args.duration:g} s per cell, {os.cpu_count()} CPUs; ratios are to direct)", ""]
    header = ["row"]
    for c in args.concurrency:
        header += [f"c{c} req/s", f"c{c} p50 ms", f"c{c} p99 ms", f"c{c} CPU µs/req", f"c{c} upstream conns"]
    header += ["SSE p50 µs", "SSE p99 µs", "SSE events", "SSE CPU µs/event", "peak RSS MB"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row["name"])]
        for c in args.concurrency:
            cell, base = row[f"c{c}"], direct[f"c{c}"]
            assert isinstance(cell, dict) and isinstance(base, dict)
            cpu = cell["cpu_us_per_req"]
            cells += [f"{cell['rps']:,.0f}{ratio(cell['rps'], base['rps']) if row is not direct else ''}",
                      f"{cell['p50_us'] / 1000:.2f}", f"{cell['p99_us'] / 1000:.2f}",
                      "—" if cpu is None else f"{cpu:.1f}", str(cell["upstream_conns_opened"])]
        sse = row["sse"]
        assert isinstance(sse, dict)
        cpu_event = sse["cpu_us_per_event"]
        cells += [f"{sse['p50_us']:,.0f}", f"{sse['p99_us']:,.0f}", f"{sse['events']}/{sse['expected']}",
                  "—" if cpu_event is None else f"{cpu_event:.2f}",
                  "—" if row["peak_rss_mb"] is None else f"{row['peak_rss_mb']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compiled_here() -> bool:
    return any((ROOT / "gateway").glob("*.so"))


@contextlib.contextmanager
def pure_copy() -> Iterator[Path]:
    """The package's sources without the compiled modules: `python -m gateway` run there is the pure form."""
    with tempfile.TemporaryDirectory(prefix="gateway-pure-") as folder:
        shutil.copytree(ROOT / "gateway", Path(folder) / "gateway",
                        ignore=shutil.ignore_patterns("*.so", "__pycache__"))
        yield Path(folder)


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # run the finally blocks that stop the children
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=float(os.environ.get("DURATION", 10)))
    parser.add_argument("--concurrency", type=int, nargs="+",
                        default=[int(c) for c in os.environ.get("CONCURRENCY", "16 64").split()])
    parser.add_argument("--sse-events", type=int, default=200)
    parser.add_argument("--port-base", type=int, default=int(os.environ.get("PORT_BASE", 19800)))
    parser.add_argument("--gateway-args", default=os.environ.get("GATEWAY_ARGS", ""),
                        help="extra gateway flags, e.g. '--upstream-client aiohttp'")
    parser.add_argument("--forms", default=os.environ.get("FORMS", ""),
                        help="'pure', 'compiled' or both (default: both when make compile has built the compiled form)")
    args = parser.parse_args()
    upstream_port, gateway_port, admin_port = args.port_base, args.port_base + 1, args.port_base + 2
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    tool = "wrk" if shutil.which("wrk") else "bench/loadgen.py (install wrk for higher loads)"
    gateway_argv = [PY, "-m", "gateway", "--host", "127.0.0.1", "--port", str(gateway_port),
                    "--admin-port", str(admin_port), *args.gateway_args.split()]
    # Both forms when the compiled one is built here (make compile): the pure one from a copy of the sources.
    forms = args.forms.split() if args.forms else (["pure", "compiled"] if compiled_here() else ["pure"])
    with (started(pinned(0, [PY, str(HERE / "upstream.py"), "--port", str(upstream_port)]), upstream_port,
                  results / "upstream.log"), pure_copy() as pure_root):
        rows = [measure_row("direct", upstream_port, None, upstream_port, args)]
        for form in forms:
            with started(pinned(1, gateway_argv), gateway_port, results / f"gateway-{form}.log",
                         cwd=pure_root if form == "pure" else ROOT) as gateway:
                rows.append(measure_row(f"gateway ({form})", gateway_port, gateway.pid, upstream_port, args))
    report = table(rows, args, tool)
    (results / "latest.md").write_text(report)
    (results / "latest.json").write_text(json.dumps(rows, indent=1))
    print(report)
    print(f"(also in {results / 'latest.md'}; the anchor bench with nginx and go-mimic: make bench-anchor)")


if __name__ == "__main__":
    main()
