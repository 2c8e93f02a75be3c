"""`make bench-fleet` (issue 12): the gateway in front of a fleet of N upstream addresses, go-mimic beside it.

A fleet is thousands of sandboxes, each its own (host, port): the gateway keeps a pool per target, so
what grows with N is connections, fds and memory, not just requests. One Go upstream process
(bench/fleet_upstream.go) listens on N loopback addresses (127.77.x.y: all of 127/8 routes to lo),
wrk picks a target per request (bench/wrk_fleet.lua), and each cell runs a warm-up half then a
measured half, so CPU µs per request, req/s and latency are those of a pool that is already built.

Scenarios (FLEET_SCENARIOS, any of):
  cells   N in FLEET_N, {uniform, 80/20}, {gateway, go-mimic}: req/s, p50/p99, CPU µs/req, RSS,
          fds, upstream connections opened and open. Each cell starts its proxy afresh.
  idle    after a load on the largest N stops: the proxy's established connections to the
          upstream and its fds, every second, until 0 or FLEET_IDLE_S.
  ulimit  the largest-N load with the proxy under RLIMIT_NOFILE FLEET_NOFILE (1024): statuses,
          503s with Retry-After, socket errors, and whether a new target is served within 1 s after.
  race    an upstream closing keep-alive connections idle for 5 s, bursts of calls with 4-6 s gaps
          (FLEET_RACE_GAP): failed calls (bench/fleet_race.py).

go-mimic is built from ../shared/bench/gomimic.go when that folder is there (FLEET_SHARED names
another); without it only the gateway runs. wrk and golang-go are installed with apt-get when
missing (as root). Every child runs in its own session and is killed on exit, error or Ctrl-C.
Figures are comparable inside one run only: the machine is shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.client
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fleet_race import RaceTarget, race
from run import HERE, PY, ROOT, cpu_seconds, pinned

RESULTS = HERE / "results"
BIN = RESULTS / "fleet-bin"
SHARED_DEFAULTS = (ROOT.parent / "shared" / "bench",)  # ../shared/bench beside the checkout; or FLEET_SHARED
# tool -> Debian package; taskset is in util-linux, present on any Debian but checked all the same.
APT_PACKAGES = {"wrk": "wrk", "go": "golang-go", "taskset": "util-linux"}
FLEET_NET = 77  # fleet targets are 127.77.x.y; the race upstream is 127.78.0.x
POOL_SERIES = re.compile(r"aenv_gateway_\w*(upstream_errors|pool|conn|idle|evict)")
IDLE_TABLE_SECONDS = (0, 1, 2, 5, 10, 20, 30, 45, 60, 75, 90, 100)
Json = dict[str, Any]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- configuration


def _env_list(name: str, default: str) -> list[str]:
    return os.environ.get(name, default).split()


def _gap(text: str) -> tuple[float, float]:
    """FLEET_RACE_GAP as "low-high" seconds, e.g. "4-6" (the default) or "4.95-5.05"."""
    low, _, high = text.partition("-")
    return float(low), float(high or low)


@dataclass(frozen=True)
class Config:
    """Every knob is an environment variable, so `make bench-fleet` needs no argument parsing of its own."""

    targets: list[int]
    mixes: list[str]
    duration_s: int
    connections: int
    scenarios: list[str]
    proxies: list[str]
    idle_limit_s: int
    idle_load_s: int
    nofile: int
    race_bursts: int
    race_calls: int
    race_concurrency: int
    race_gap_s: tuple[float, float]
    port_base: int
    gateway_args: list[str]
    shared: Path | None
    quick: bool

    @classmethod
    def from_env(cls) -> Config:
        quick = os.environ.get("FLEET_QUICK") == "1"
        shared = next((p for p in ([Path(os.environ["FLEET_SHARED"])] if os.environ.get("FLEET_SHARED")
                                   else SHARED_DEFAULTS) if (p / "gomimic.go").is_file()), None)
        proxies = _env_list("FLEET_PROXIES", "gateway go-mimic")
        if shared is None and "go-mimic" in proxies:
            log("no shared bench (gomimic.go) found: the gateway runs alone")
            proxies.remove("go-mimic")
        return cls(
            targets=[int(n) for n in _env_list("FLEET_N", "1 100" if quick else "1 100 1000 4000")],
            mixes=_env_list("FLEET_MIX", "uniform 80/20"),
            duration_s=max(2, int(os.environ.get("FLEET_DURATION", 3 if quick else 20))),
            connections=int(os.environ.get("FLEET_CONNECTIONS", 64)),
            scenarios=_env_list("FLEET_SCENARIOS", "cells idle ulimit race"),
            proxies=proxies,
            idle_limit_s=int(os.environ.get("FLEET_IDLE_S", 15 if quick else 100)),
            idle_load_s=int(os.environ.get("FLEET_IDLE_LOAD_S", 3 if quick else 10)),
            nofile=int(os.environ.get("FLEET_NOFILE", 1024)),
            race_bursts=int(os.environ.get("FLEET_RACE_BURSTS", 3 if quick else 20)),
            race_calls=int(os.environ.get("FLEET_RACE_CALLS", 100 if quick else 500)),
            race_concurrency=int(os.environ.get("FLEET_RACE_CONCURRENCY", 32)),
            race_gap_s=_gap(os.environ.get("FLEET_RACE_GAP", "4-6")),
            port_base=int(os.environ.get("FLEET_PORT_BASE", 21700)),
            gateway_args=os.environ.get("GATEWAY_ARGS", "").split(),
            shared=shared,
            quick=quick,
        )

    @property
    def big_n(self) -> int:
        """The idle and ulimit scenarios' target count: the issue's 4,000 unless FLEET_BIG_N says otherwise."""
        return int(os.environ.get("FLEET_BIG_N", 4000))

    def port(self, role: str) -> int:
        """Ports below the kernel's ephemeral range (32768+), so no outgoing connection can hold one."""
        offsets = {"gateway": 0, "admin": 1, "go-mimic": 2, "control": 3, "race-control": 4, "fleet": 10, "race": 11}
        return self.port_base + offsets[role]


def fleet_hosts(count: int, net: int = FLEET_NET) -> list[str]:
    """127.<net>.<k // 250>.<k % 250 + 1>: no .0 or .255 host octet, 62,500 targets per net."""
    return [f"127.{net}.{k // 250}.{k % 250 + 1}" for k in range(count)]


# ---------------------------------------------------------------- tools and builds


def ensure_tools() -> None:
    """Install wrk and golang-go with apt-get only if missing, as ../shared/bench/setup.sh does."""
    missing = sorted({package for tool, package in APT_PACKAGES.items() if not shutil.which(tool)})
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SystemExit(f"bench-fleet needs {' '.join(missing)}: apt-get install -y {' '.join(missing)}")
    log(f"installing {' '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update"], check=True, timeout=600, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", *missing], check=True, timeout=900, env=env, stdout=subprocess.DEVNULL)
    still = [tool for tool in APT_PACKAGES if not shutil.which(tool)]
    if still:
        raise SystemExit(f"bench-fleet: {' '.join(still)} still not on PATH after apt-get install")


def go_build(source: Path, output: Path) -> Path:
    """Build from a temporary copy (the shared folder is read-only); skipped when the binary is newer."""
    if output.exists() and output.stat().st_mtime >= source.stat().st_mtime:
        return output
    output.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GO111MODULE": "off"}
    env.setdefault("GOCACHE", str(RESULTS / "go-cache"))
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / source.name
        shutil.copyfile(source, copy)
        subprocess.run(["go", "build", "-o", str(output), str(copy)], check=True, timeout=300, env=env, cwd=tmp)
    return output


def raise_own_nofile() -> None:
    """The upstream holds one listener per target plus every proxy connection: lift the soft limit to the hard one."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ---------------------------------------------------------------- processes


def port_free(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return False
    return True


def wait_port(host: str, port: int, process: subprocess.Popen[bytes], log_path: Path, limit_s: float = 30) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"bench-fleet: {process.args!r} exited with {process.returncode}; see {log_path}")
        if not port_free(host, port):
            return
        time.sleep(0.1)
    raise SystemExit(f"bench-fleet: nothing listens on {host}:{port} after {limit_s}s; see {log_path}")


def _limit_nofile(nofile: int | None) -> Callable[[], None] | None:
    """Soft and hard both: Go raises its soft limit to the hard one at start, so a soft limit alone is not one."""
    if nofile is None:
        return None
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))


def stop(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def started(
    name: str, argv: list[str], listen: tuple[str, int], env: dict[str, str] | None = None, nofile: int | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A child in its own session (so a kill reaches all it forks), stopped however the block ends."""
    log_path = RESULTS / f"fleet-{name}.log"
    with log_path.open("ab") as out:  # appended across cells; run() empties them at the start
        process = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, **(env or {})}, preexec_fn=_limit_nofile(nofile))
    try:
        wait_port(*listen, process, log_path)
        yield process
    finally:
        stop(process)


@dataclass(frozen=True)
class Proxy:
    """How to start one proxy row; `go-mimic` gets GOMAXPROCS=1 as ../shared/bench/run.sh gives it."""

    name: str
    port: int
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    metrics_port: int | None = None

    @contextlib.contextmanager
    def running(self, route_check: str, nofile: int | None = None) -> Iterator[int]:
        with started(self.name, pinned(1, self.argv), ("127.0.0.1", self.port), self.env, nofile) as process:
            status = call(self.port, route_check, timeout_s=5)[0]
            if status != 200:
                raise SystemExit(f"bench-fleet: {self.name} answered {status} to {route_check}; see its log")
            yield process.pid


def make_proxies(cfg: Config) -> list[Proxy]:
    proxies = []
    if "gateway" in cfg.proxies:
        proxies.append(Proxy("gateway", cfg.port("gateway"), [
            PY, "-m", "gateway", "--host", "127.0.0.1", "--port", str(cfg.port("gateway")),
            "--admin-port", str(cfg.port("admin")), *cfg.gateway_args], metrics_port=cfg.port("admin")))
    if "go-mimic" in cfg.proxies and cfg.shared is not None:
        binary = go_build(cfg.shared / "gomimic.go", BIN / "gomimic")
        proxies.append(Proxy("go-mimic", cfg.port("go-mimic"),
                             [str(binary), "-addr", f"127.0.0.1:{cfg.port('go-mimic')}"], {"GOMAXPROCS": "1"}))
    return proxies


@contextlib.contextmanager
def upstream(hosts: list[str], port: int, control: int, idle_timeout_s: float = 0) -> Iterator[None]:
    """The Go upstream on every host in `hosts`, pinned with the load on CPU 0."""
    binary = go_build(HERE / "fleet_upstream.go", BIN / "fleet_upstream")
    addrs = RESULTS / f"fleet-addrs-{port}.txt"
    addrs.write_text("\n".join(hosts) + "\n")
    argv = [str(binary), "-addrs", str(addrs), "-port", str(port), "-control", f"127.0.0.1:{control}",
            "-idle-timeout", f"{idle_timeout_s}s"]
    # It binds every address before it serves /stats, so the control port answering means all are up.
    with started(f"upstream-{port}", pinned(0, argv), ("127.0.0.1", control), {"GOMAXPROCS": "1"}):
        yield


# ---------------------------------------------------------------- readings


def call(port: int, upstream_url: str, timeout_s: float) -> tuple[int | str, float]:
    """One POST /mcp through a proxy: its status (or the error's name) and how long it took in ms."""
    started_at = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        connection.request("POST", "/mcp", body=b'{"jsonrpc":"2.0","id":1,"method":"ping"}',
                           headers={"Content-Type": "application/json", "AEnvCore-MCPProxy-URL": upstream_url})
        reply = connection.getresponse()
        reply.read()
        return reply.status, (time.monotonic() - started_at) * 1e3
    except OSError as exc:
        return type(exc).__name__, (time.monotonic() - started_at) * 1e3
    finally:
        connection.close()


def upstream_stats(control: int, by_addr: bool = False) -> Json:
    url = f"http://127.0.0.1:{control}/stats" + ("?by_addr=1" if by_addr else "")
    with urllib.request.urlopen(url, timeout=5) as reply:
        return json.load(reply)  # type: ignore[no-any-return]


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB: the resident size now and its peak since the process started."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def established_to(pid: int, remote_port: int) -> int:
    """The process's ESTABLISHED TCP connections to remote_port: its fds' socket inodes matched in /proc/net/tcp.

    /proc/PID/net/tcp lists the whole network namespace (the upstream's side and wrk's too), so the
    inode is what ties a row to this process.
    """
    inodes = socket_inodes(pid)
    suffix = f":{remote_port:04X}"
    matched = set()  # by inode: a table that changes while it is read can list a socket twice
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "01" and fields[2].endswith(suffix) and fields[9] in inodes:
            matched.add(fields[9])
    return len(matched)


def pool_metrics(proxy: Proxy) -> dict[str, float]:
    """The gateway's own upstream figures from /metrics (errors by kind, and any pool or connection series).

    Kept in the JSON only: the pool's metrics are being added, so whatever series exist are recorded.
    """
    if proxy.metrics_port is None:
        return {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{proxy.metrics_port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
    except OSError:
        return {}
    series = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if POOL_SERIES.match(line) and not name.split("{", 1)[0].endswith(("_created", "_bucket")):
            series[name] = float(value)
    return series


def process_readings(proxy: Proxy, pid: int, upstream_port: int) -> Json:
    rss, hwm = memory_mb(pid)
    return {"rss_mb": rss, "hwm_mb": hwm, "fds": fd_count(pid), "established": established_to(pid, upstream_port),
            "metrics": pool_metrics(proxy)}


# ---------------------------------------------------------------- load


def wrk_argv(cfg: Config, port: int, seconds: int) -> list[str]:
    return pinned(0, ["wrk", "-t1", f"-c{cfg.connections}", f"-d{seconds}s", "--timeout", "5s",
                      "-s", str(HERE / "wrk_fleet.lua"), f"http://127.0.0.1:{port}/mcp"])


def wrk_env(targets_file: Path, targets: int, mix: str, count_status: bool) -> dict[str, str]:
    return {**os.environ, "FLEET_TARGETS_FILE": str(targets_file), "FLEET_TARGETS": str(targets),
            "FLEET_SKEW": mix, "FLEET_STATUS": "1" if count_status else "0"}


def parse_wrk(output: str) -> Json:
    for line in output.splitlines():
        if line.startswith("FLEETJSON "):
            return json.loads(line.removeprefix("FLEETJSON "))  # type: ignore[no-any-return]
    log(f"wrk gave no result: {output[-500:]!r}")
    return {"requests": 0, "rps": 0.0, "p50_us": 0.0, "p99_us": 0.0, "err_connect": 0, "err_read": 0,
            "err_write": 0, "err_status": 0, "err_timeout": 0, "statuses": {}, "retry_after_503": 0, "failed": True}


def wrk(cfg: Config, port: int, targets_file: Path, targets: int, mix: str, seconds: int,
        count_status: bool = False) -> Json:
    result = subprocess.run(wrk_argv(cfg, port, seconds), env=wrk_env(targets_file, targets, mix, count_status),
                            capture_output=True, text=True, timeout=seconds + 30, check=False)
    return parse_wrk(result.stdout + result.stderr)


def socket_errors(result: Json) -> int:
    return sum(int(result[k]) for k in ("err_connect", "err_read", "err_write", "err_timeout"))


# ---------------------------------------------------------------- scenarios


def run_cell(cfg: Config, proxy: Proxy, urls: Path, first_url: str, targets: int, mix: str) -> Json:
    """Warm-up half then measured half on a fresh proxy: the figures are for a pool already built."""
    warm_s = cfg.duration_s // 2
    control, fleet_port = cfg.port("control"), cfg.port("fleet")
    with proxy.running(first_url) as pid:
        before = upstream_stats(control)
        wrk(cfg, proxy.port, urls, targets, mix, warm_s)
        middle, cpu_before = upstream_stats(control), cpu_seconds(pid)
        result = wrk(cfg, proxy.port, urls, targets, mix, cfg.duration_s - warm_s)
        cpu = cpu_seconds(pid) - cpu_before
        after = upstream_stats(control)
        readings = process_readings(proxy, pid, fleet_port)
    return {
        "proxy": proxy.name, "targets": targets, "mix": mix, **result, **readings,
        "cpu_us_per_req": cpu * 1e6 / result["requests"] if result["requests"] else None,
        "opened_cell": after["opened"] - before["opened"], "opened_measured": after["opened"] - middle["opened"],
        "upstream_open": after["open"],
    }


def cells(cfg: Config, proxies: list[Proxy], urls: Path, first_url: str) -> list[Json]:
    rows = []
    for targets in cfg.targets:
        for mix in cfg.mixes if targets > 1 else cfg.mixes[:1]:  # one target: every mix is the same load
            for proxy in proxies:
                row = run_cell(cfg, proxy, urls, first_url, targets, mix)
                log(f"cell N={targets} {mix} {proxy.name}: {row['rps']:,.0f} req/s, "
                    f"{row['cpu_us_per_req'] or 0:.1f} µs/req, {row['opened_cell']} opened, {row['fds']} fds")
                rows.append(row)
    return rows


@dataclass
class IdleSeries:
    """One proxy's readings after its load stopped: (seconds since the stop, established, fds)."""

    name: str
    pid: int
    stopped_at: float | None = None
    samples: list[tuple[int, int, int]] = field(default_factory=list)
    done: bool = False


def sample_idle(series: list[IdleSeries], upstream_port: int, limit_s: int) -> None:
    """Take each stopped proxy's reading that is due (one per whole second since its own stop)."""
    now = time.monotonic()
    for s in series:
        if s.stopped_at is None or s.done or now - s.stopped_at < len(s.samples):
            continue
        try:
            established = established_to(s.pid, upstream_port)
            s.samples.append((len(s.samples), established, fd_count(s.pid)))
        except FileNotFoundError:  # the proxy died: its series ends, the others go on
            log(f"idle: {s.name} (pid {s.pid}) is gone")
            s.done = True
            continue
        s.done = established == 0 or len(s.samples) > limit_s


def idle(cfg: Config, proxies: list[Proxy], urls: Path, first_url: str) -> list[Json]:
    """Load each proxy in turn, then watch all of them: a proxy's clock starts when its own load stops."""
    targets = cfg.big_n
    with contextlib.ExitStack() as stack:
        series = [IdleSeries(p.name, stack.enter_context(p.running(first_url))) for p in proxies]
        for proxy, s in zip(proxies, series, strict=True):
            load = subprocess.Popen(wrk_argv(cfg, proxy.port, cfg.idle_load_s),
                                    env=wrk_env(urls, targets, "uniform", False), stdout=subprocess.DEVNULL)
            stack.callback(stop_quietly, load)
            deadline = time.monotonic() + cfg.idle_load_s + 30
            while load.poll() is None and time.monotonic() < deadline:
                sample_idle(series, cfg.port("fleet"), cfg.idle_limit_s)
                time.sleep(0.05)
            s.stopped_at = time.monotonic()
        while not all(s.done for s in series):
            sample_idle(series, cfg.port("fleet"), cfg.idle_limit_s)
            time.sleep(0.05)
    for s in series:
        log(f"idle {s.name}: established {[e for _, e, _ in s.samples][:12]}… after {len(s.samples) - 1} s")
    return [{"proxy": s.name, "targets": targets, "load_s": cfg.idle_load_s, "samples": s.samples} for s in series]


def stop_quietly(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


def fresh_target(port: int, url: str, limit_s: float = 10.0) -> Json:
    """Right after the load: does a target no one used yet get served, and how soon (1 s per attempt)."""
    started_at = time.monotonic()
    first: tuple[int | str, float] | None = None
    while True:
        status, ms = call(port, url, timeout_s=1.0)
        first = first or (status, ms)
        elapsed = time.monotonic() - started_at
        if status == 200 or elapsed > limit_s:
            break
        time.sleep(0.2)
    return {"first_status": first[0], "first_ms": first[1], "served": status == 200,
            "served_after_s": elapsed if status == 200 else None, "within_1s": status == 200 and elapsed <= 1.0}


def ulimit(cfg: Config, proxies: list[Proxy], urls: Path, first_url: str, fresh_url: str) -> list[Json]:
    """The big-N load with the proxy's fd limit (soft and hard) at cfg.nofile: how it fails, and if it recovers."""
    rows = []
    for proxy in proxies:
        with proxy.running(first_url, nofile=cfg.nofile) as pid:
            result = wrk(cfg, proxy.port, urls, cfg.big_n, "uniform", cfg.duration_s, count_status=True)
            fresh = fresh_target(proxy.port, fresh_url)
            readings = process_readings(proxy, pid, cfg.port("fleet"))
        rows.append({"proxy": proxy.name, "targets": cfg.big_n, "nofile": cfg.nofile, **result, **readings,
                     "fresh": fresh})
        log(f"ulimit {proxy.name}: statuses {result['statuses']}, socket errors {socket_errors(result)}, "
            f"fresh target {fresh}")
    return rows


def stale_race(cfg: Config, proxies: list[Proxy]) -> list[Json]:
    """Each proxy reaches its own address of an upstream that closes connections idle for 5 s."""
    port, control = cfg.port("race"), cfg.port("race-control")
    hosts = fleet_hosts(len(proxies), net=FLEET_NET + 1)
    targets = {p.name: RaceTarget(f"http://127.0.0.1:{p.port}", f"http://{h}:{port}")
               for p, h in zip(proxies, hosts, strict=True)}
    with upstream(hosts, port, control, idle_timeout_s=5), contextlib.ExitStack() as stack:
        for proxy in proxies:
            stack.enter_context(proxy.running(targets[proxy.name].upstream_url))
        results = asyncio.run(race(targets, cfg.race_bursts, cfg.race_calls, cfg.race_concurrency,
                                   gap_s=cfg.race_gap_s, progress=log))
        opened = upstream_stats(control, by_addr=True)["by_addr"]
        metrics = {p.name: pool_metrics(p) for p in proxies}
    return [{"proxy": name, "calls": r.calls, "failed": r.failed, "outcomes": dict(r.outcomes),
             "opened": opened.get(host, 0), "metrics": metrics[name]}
            for (name, r), host in zip(results.items(), hosts, strict=True)]


# ---------------------------------------------------------------- report


def ms(us: float) -> str:
    return f"{us / 1000:.2f}"


def cpu_cell(row: Json, reference: Json | None) -> str:
    """CPU µs per request, with its ratio to go-mimic's in the same cell: the figure to compare across runs."""
    cpu, base = row["cpu_us_per_req"], (reference or {}).get("cpu_us_per_req")
    if cpu is None:
        return "—"
    return f"{cpu:.1f}" + (f" ({cpu / base:.2f}x)" if base and reference is not row else "")


def cells_table(rows: list[Json]) -> list[str]:
    reference = {(r["targets"], r["mix"]): r for r in rows if r["proxy"] == "go-mimic"}
    header = ["N", "mix", "proxy", "req/s", "p50 ms", "p99 ms", "CPU µs/req", "non-2xx", "socket errors", "RSS MB",
              "fds", "upstream conns opened: cell (measured half)", "upstream conns open", "proxy→upstream estab."]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join([
            f"{r['targets']:,}", r["mix"], r["proxy"], f"{r['rps']:,.0f}", ms(r["p50_us"]), ms(r["p99_us"]),
            cpu_cell(r, reference.get((r["targets"], r["mix"]))), f"{r['err_status']:,}", f"{socket_errors(r):,}",
            f"{r['rss_mb']:.1f}", f"{r['fds']:,}", f"{r['opened_cell']:,} ({r['opened_measured']:,})",
            f"{r['upstream_open']:,}", f"{r['established']:,}"]) + " |")
    return lines


def idle_table(rows: list[Json]) -> list[str]:
    rows = [r for r in rows if r["samples"]]
    if not rows:
        return ["No readings: every proxy died before its load stopped (see bench/results/fleet-*.log)."]
    header = ["s after load"] + [f"{r['proxy']} estab. / fds" for r in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    last = max(len(r["samples"]) for r in rows) - 1
    for second in sorted({s for s in IDLE_TABLE_SECONDS if s <= last} | {last}):
        cells = [f"{e:,} / {f:,}" if second < len(r["samples"]) else "(0 earlier)"
                 for r in rows for _, e, f in [r["samples"][min(second, len(r["samples"]) - 1)]]]
        lines.append(f"| {second} | " + " | ".join(cells) + " |")
    for r in rows:
        t, established, _ = r["samples"][-1]
        verdict = f"fell to 0 after {t} s" if established == 0 else f"still {established:,} after {t} s"
        lines.append(f"\n{r['proxy']}: established connections to the upstream {verdict} "
                     f"(load: {r['targets']:,} targets, uniform, {r['load_s']} s).")
    return lines


def ulimit_table(rows: list[Json]) -> list[str]:
    header = ["proxy", "requests", "req/s", "2xx", "non-2xx by status", "503 with Retry-After",
              "socket errors (connect/read/write/timeout)", "fds at end", "new target after load", "served ≤ 1 s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        statuses = {int(k): v for k, v in r["statuses"].items()}
        ok = sum(v for k, v in statuses.items() if 200 <= k < 300)
        bad = ", ".join(f"{k}: {v:,}" for k, v in sorted(statuses.items()) if not 200 <= k < 300) or "none"
        total = max(1, sum(statuses.values()) + socket_errors(r))
        f = r["fresh"]
        after = f"{f['first_status']} in {f['first_ms']:.0f} ms" + (
            "" if f["first_status"] == 200 else
            f"; 200 after {f['served_after_s']:.1f} s" if f["served"] else "; never within 10 s")
        lines.append("| " + " | ".join([
            r["proxy"], f"{r['requests']:,}", f"{r['rps']:,.0f}", f"{ok:,} ({ok / total:.1%})", bad,
            f"{r['retry_after_503']:,}",
            f"{r['err_connect']}/{r['err_read']}/{r['err_write']}/{r['err_timeout']}",
            f"{r['fds']:,}", after, "yes" if f["within_1s"] else "no"]) + " |")
    return lines


def race_table(rows: list[Json]) -> list[str]:
    header = ["proxy", "calls", "failed", "outcomes", "upstream conns opened"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        outcomes = ", ".join(f"{k}: {v:,}" for k, v in sorted(r["outcomes"].items()))
        lines.append(f"| {r['proxy']} | {r['calls']:,} | {r['failed']:,} | {outcomes} | {r['opened']:,} |")
    return lines


def git_commit() -> str:
    """The commit benchmarked, '+' when gateway/ has uncommitted changes; read at the start of a long run."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
    return (git("rev-parse", "--short", "HEAD") or "?") + ("+" if git("status", "--porcelain", "--", "gateway") else "")


def report(cfg: Config, results: Json, elapsed_s: float) -> str:
    lines = [f"# make bench-fleet ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {results['commit']}, "
             f"{'quick, ' if cfg.quick else ''}{elapsed_s / 60:.1f} min)", "",
             f"wrk -t1 -c{cfg.connections}, {cfg.duration_s} s per cell ({cfg.duration_s // 2} s warm-up, "
             f"{cfg.duration_s - cfg.duration_s // 2} s measured), proxies pinned to CPU 1, wrk and the Go upstream "
             f"to CPU 0, {os.cpu_count()} CPUs. Compare within this run only: the machine is shared."]
    sections = [
        ("cells", "## Load: N targets, uniform and 80/20", cells_table,
         "CPU µs/req, req/s and latency over the measured half; a ratio such as (0.75x) is the gateway's CPU "
         "per request over go-mimic's in the same cell, when go-mimic ran. RSS, fds and connections at the end "
         "of the cell."),
        ("idle", "## Idle upstream connections after the load stops", idle_table,
         "Each proxy's ESTABLISHED connections to the upstream port (its fds' sockets in /proc/PID/net/tcp) "
         "and its open fds, each second after its own load stopped."),
        ("ulimit", f"## {cfg.big_n:,} targets under RLIMIT_NOFILE {cfg.nofile}", ulimit_table,
         "Statuses counted by wrk's response(); then a POST to a target not used before, 1 s per attempt."),
        ("race", "## Stale-connection race: upstream closes idle keep-alive after 5 s", race_table,
         f"{cfg.race_bursts} bursts of {cfg.race_calls} calls ({cfg.race_concurrency} at a time), "
         f"{cfg.race_gap_s[0]:g}-{cfg.race_gap_s[1]:g} s gaps."),
    ]
    for key, title, render, note in sections:
        if results.get(key):
            lines += ["", title, "", note, "", *render(results[key])]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def check_ports(cfg: Config) -> None:
    for role in ("gateway", "admin", "go-mimic", "control", "race-control"):
        if not port_free("127.0.0.1", cfg.port(role)):
            raise SystemExit(f"bench-fleet: port {cfg.port(role)} is in use (set FLEET_PORT_BASE)")


def run(cfg: Config) -> Json:
    for old_log in RESULTS.glob("fleet-*.log"):
        old_log.unlink()
    proxies = make_proxies(cfg)
    count = max(cfg.targets + ([cfg.big_n] if {"idle", "ulimit"} & set(cfg.scenarios) else [])) + 1
    hosts = fleet_hosts(count)  # the last one is the "new target" of the ulimit scenario: no load reaches it
    urls = RESULTS / "fleet-targets.txt"
    urls.write_text("".join(f"http://{h}:{cfg.port('fleet')}\n" for h in hosts))
    first_url, fresh_url = f"http://{hosts[0]}:{cfg.port('fleet')}", f"http://{hosts[-1]}:{cfg.port('fleet')}"
    results: Json = {"commit": git_commit(), "config": {k: str(v) for k, v in dataclasses.asdict(cfg).items()}}
    scenarios: dict[str, Callable[[], list[Json]]] = {"cells": lambda: cells(cfg, proxies, urls, first_url),
                 "idle": lambda: idle(cfg, proxies, urls, first_url),
                 "ulimit": lambda: ulimit(cfg, proxies, urls, first_url, fresh_url)}
    if set(scenarios) & set(cfg.scenarios):
        log(f"upstream on {count:,} addresses; proxies: {', '.join(p.name for p in proxies)}")
        with upstream(hosts, cfg.port("fleet"), cfg.port("control")):
            for name, scenario in scenarios.items():
                if name in cfg.scenarios:
                    log(f"scenario {name}")
                    results[name] = scenario()
    if "race" in cfg.scenarios:
        log("scenario race")
        results["race"] = stale_race(cfg, proxies)
    return results


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # run the finally blocks that stop the children
    started_at = time.monotonic()
    RESULTS.mkdir(exist_ok=True)
    cfg = Config.from_env()
    ensure_tools()
    raise_own_nofile()
    check_ports(cfg)
    results = run(cfg)
    text = report(cfg, results, time.monotonic() - started_at)
    (RESULTS / "fleet-latest.md").write_text(text)
    (RESULTS / "fleet-latest.json").write_text(json.dumps(results, indent=1))
    print(text)
    print(f"(also in {RESULTS / 'fleet-latest.md'}; raw figures in fleet-latest.json)")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the context managers have stopped every child by the time it gets here
        log("interrupted; every process the bench started is stopped")
        sys.exit(130)
