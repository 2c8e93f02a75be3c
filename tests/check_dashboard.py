"""`make check-dashboard`: every query of config/grafana/mcp-gateway.json returns data from a real Prometheus.

Runs `promtool check rules` on config/prometheus/alerts.yml, starts the gateway (the real program)
in front of a small upstream and gives it real traffic (JSON-RPC calls, SSE streams, refusals, an
upstream that is not there, an upstream 503), starts Prometheus on 127.0.0.1 scraping the admin port
every second, then runs each panel's PromQL, Grafana's variables replaced by concrete values, through
Prometheus' HTTP API: a query that errors or returns no series fails the check, naming its panel.
The alerting rules are loaded too, and each must be evaluated without error. Every process it
starts is stopped. Needs Debian's `prometheus` package (prometheus and promtool); as root it
installs it with apt-get when missing, else it says what to install and exits 1.

Run: .venv/bin/python -m tests.check_dashboard   (about 20 seconds)
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, web

from tests.process import free_port, gateway_process

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "config" / "grafana" / "mcp-gateway.json"
ALERTS = ROOT / "config" / "prometheus" / "alerts.yml"
# Grafana's built-in variables, as concrete values for a Prometheus that scrapes every second.
VARIABLES = {"$__rate_interval": "10s", "$__interval": "1s", "$__range": "1m", "${datasource}": "prometheus"}
TRAFFIC_S = 8.0
TOOL_CALL = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{}}}'
INITIALIZE = b'{"jsonrpc":"2.0","id":0,"method":"initialize","params":{}}'


def fail(message: str) -> None:
    print(f"check-dashboard: {message}", file=sys.stderr)
    raise SystemExit(1)


def find_tools() -> tuple[str, str]:
    """prometheus and promtool, installed with apt-get when missing and we are root."""
    if not (shutil.which("prometheus") and shutil.which("promtool")) and os.geteuid() == 0 and shutil.which("apt-get"):
        print("check-dashboard: installing Debian's prometheus package (apt-get install -y prometheus)")
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.STDOUT,
                 "env": {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}}
        subprocess.run(["apt-get", "update", "-qq"], check=False, timeout=300, **quiet)  # type: ignore[call-overload]
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"], check=False,
                       timeout=600, **quiet)  # type: ignore[call-overload]
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if not (prometheus and promtool):
        fail("needs prometheus and promtool: install Debian's package, `apt-get install prometheus` (as root)")
    assert prometheus is not None and promtool is not None
    return prometheus, promtool


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL with the variables replaced) for every target of every panel, rows included."""
    queries: list[tuple[str, str]] = []
    panels = list(dashboard["panels"])
    while panels:
        panel = panels.pop(0)
        panels.extend(panel.get("panels", []))
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            if "$" in expr:
                fail(f"panel {panel['title']!r}: an unknown variable in {target['expr']!r}")
            queries.append((panel["title"], expr))
    return queries


def check_dashboard_shape(dashboard: dict[str, Any]) -> None:
    """What an import needs: a datasource variable, and every panel and target using it."""
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    datasource = variables.get("datasource")
    if datasource is None or (datasource["type"], datasource["query"]) != ("datasource", "prometheus"):
        fail("the dashboard needs a `datasource` variable of type datasource, query prometheus")
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        uses = [panel["datasource"], *(target["datasource"] for target in panel["targets"])]
        if any(use != {"type": "prometheus", "uid": "${datasource}"} for use in uses):
            fail(f"panel {panel['title']!r} does not use the ${{datasource}} variable")


async def upstream_app() -> web.Application:
    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        if request.path.endswith("/fail"):
            return web.json_response({"error": "sandbox is down"}, status=503)
        if request.method == "POST":
            return web.json_response({"jsonrpc": "2.0", "id": 1, "result": {"content": []}})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for number in range(3):
            await response.write(f"data: {number}\n\n".encode())
            await asyncio.sleep(0.05)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


async def traffic(gateway_url: str, upstream_url: str, seconds: float) -> int:
    """Real requests of every kind the panels count, for `seconds`; how many were sent."""
    route = {"AEnvCore-MCPProxy-URL": upstream_url, "Content-Type": "application/json"}
    nowhere = {**route, "AEnvCore-MCPProxy-URL": f"http://127.0.0.1:{free_port()}",
               "AEnvCore-EnvInstance-ID": "env-gone"}
    sent = 0
    deadline = time.monotonic() + seconds
    async with ClientSession() as client:
        while time.monotonic() < deadline:
            calls = [
                client.post(f"{gateway_url}/mcp", data=TOOL_CALL, headers=route),
                client.post(f"{gateway_url}/mcp", data=INITIALIZE, headers=route),
                client.get(f"{gateway_url}/sse", headers=route),
                client.post(f"{gateway_url}/mcp", data=TOOL_CALL),  # 400 missing_header
                client.post(f"{gateway_url}/mcp", data=TOOL_CALL, headers=nowhere),  # 502 connect_refused
                client.post(f"{gateway_url}/fail", data=TOOL_CALL, headers=route),  # the upstream's 503
            ]
            for call in calls:
                async with call as response:
                    await response.read()
                sent += 1
            await asyncio.sleep(0.1)
    return sent


def query(prometheus_url: str, expr: str) -> dict[str, Any]:
    url = f"{prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            answer: dict[str, Any] = json.load(response)
    except urllib.error.HTTPError as error:  # 400 for a query that does not parse
        answer = json.load(error)
    return answer


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as response:
        answer: dict[str, Any] = json.load(response)
    return answer


@contextmanager
def running_prometheus(prometheus: str, admin_port: int, workdir: Path) -> Iterator[str]:
    port = free_port()
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {json.dumps(str(ALERTS))}\n"
        "scrape_configs:\n  - job_name: mcp-gateway\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{admin_port}']\n"
    )
    process = subprocess.Popen([prometheus, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
                                f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                               stdout=subprocess.DEVNULL, stderr=(workdir / "prometheus.log").open("w"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                fail(f"prometheus exited with {process.returncode}: {(workdir / 'prometheus.log').read_text()[-500:]}")
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                fail("prometheus not ready after 30 s")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def main() -> int:
    prometheus, promtool = find_tools()
    rules = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    if rules.returncode != 0:
        fail(f"promtool check rules {ALERTS.relative_to(ROOT)}:\n{rules.stdout}{rules.stderr}")
    print(f"promtool check rules: {rules.stdout.strip().splitlines()[-1].strip()}")
    dashboard = json.loads(DASHBOARD.read_text())
    check_dashboard_shape(dashboard)
    return asyncio.run(check_queries(prometheus, panel_queries(dashboard)))


async def check_queries(prometheus: str, queries: list[tuple[str, str]]) -> int:
    runner = web.AppRunner(await upstream_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    upstream_url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    try:
        with tempfile.TemporaryDirectory(prefix="check-dashboard-") as tmp, \
                gateway_process("--connect-retry-budget", "0", "--log-level", "error") as gateway, \
                running_prometheus(prometheus, gateway.admin_url.port or 0, Path(tmp)) as prometheus_url:
            sent = await traffic(str(gateway.url), upstream_url, TRAFFIC_S)
            await asyncio.sleep(2.5)  # two more scrapes after the last request
            print(f"traffic: {sent} requests in {TRAFFIC_S:.0f} s; prometheus at {prometheus_url}")
            failures: list[str] = []
            for title, expr in queries:
                answer = await asyncio.to_thread(query, prometheus_url, expr)
                if answer.get("status") != "success":
                    failures.append(f"panel {title!r}: {answer.get('error')} in {expr}")
                elif not answer["data"]["result"]:
                    failures.append(f"panel {title!r}: no series for {expr}")
                else:
                    print(f"  ok  {title}: {len(answer['data']['result'])} series")
            groups = (await asyncio.to_thread(get_json, f"{prometheus_url}/api/v1/rules"))["data"]["groups"]
            for rule in (rule for group in groups for rule in group["rules"]):
                if rule.get("health") != "ok":
                    failures.append(f"alert {rule['name']}: {rule.get('health')} {rule.get('lastError', '')}")
                else:
                    print(f"  ok  alert {rule['name']} ({rule['state']})")
            if not groups:
                failures.append("prometheus loaded no alerting rules")
    finally:
        await runner.cleanup()
    if failures:
        fail("\n  ".join(["some queries have no data:", *failures]))
    print(f"check-dashboard: {len(queries)} panel queries and the alerting rules return data")
    return 0


if __name__ == "__main__":
    sys.exit(main())
