"""`make conformance`: the official MCP conformance suite's server scenarios, run against a real MCP server
directly and through the gateway, compared check by check.

    python -m tests.conformance [--keep DIR]

The server is tests/conformance_server.py; the gateway is the real program with its default settings.
The suite's client sends no routing header, so js/route.mjs, preloaded with NODE_OPTIONS=--import,
adds AEnvCore-MCPProxy-URL to every request Node sends. Exit 0 when every check has the same result
both ways and dns-rebinding-protection passes through the gateway; 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

from tests import js_tools
from tests.mcp_upstream import running_mcp_server
from tests.process import gateway_process

SUITE: Final = js_tools.JS_DIR / "node_modules" / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"
ROUTE_PRELOAD: Final = js_tools.JS_DIR / "route.mjs"
SUITE_TIMEOUT_S: Final = 300.0
REBINDING: Final = "dns-rebinding-protection"

Results = dict[tuple[str, str], str]  # (scenario, check id) -> SUCCESS, FAILURE, WARNING...


def run_suite(node: Path, url: str, output: Path, route_to: str | None = None) -> Results:
    """One run of every active server scenario against url; the status of each check."""
    env = {key: value for key, value in os.environ.items() if key != "NODE_OPTIONS"}
    if route_to is not None:
        env |= {"NODE_OPTIONS": f"--import={ROUTE_PRELOAD.as_uri()}", "ROUTE_TO": route_to}
    with (output.parent / f"{output.name}.log").open("w") as log:
        subprocess.run([str(node), str(SUITE), "server", "--url", url, "-o", str(output)], env=env,
                       stdout=log, stderr=subprocess.STDOUT, timeout=SUITE_TIMEOUT_S, check=False)
    results: Results = {}
    for checks in sorted(output.glob("server-*/checks.json")):
        scenario = checks.parent.name.removeprefix("server-").rsplit("-", 6)[0]  # name-YYYY-MM-DDTHH-MM-SS-mmmZ
        for check in json.loads(checks.read_text()):
            results[scenario, check["id"]] = check["status"]
    return results


def compare(direct: Results, through: Results) -> tuple[list[str], bool]:
    """The report's lines, and whether the runs agree and rebinding protection passed through the gateway."""
    lines = [f"{'scenario':<30} {'check':<38} {'direct':<8} {'gateway':<8}"]
    agree = True
    for key in sorted(direct.keys() | through.keys()):
        mine, theirs = direct.get(key, "missing"), through.get(key, "missing")
        agree &= mine == theirs
        lines.append(f"{key[0]:<30} {key[1]:<38} {mine:<8} {theirs:<8}{'' if mine == theirs else '  <- differs'}")
    rebinding = [status for (scenario, _), status in through.items() if scenario == REBINDING]
    protected = bool(rebinding) and all(status == "SUCCESS" for status in rebinding)
    passed = sum(status == "SUCCESS" for status in direct.values())
    lines.append(f"{len(direct)} checks, {passed} passed directly; through the gateway: "
                 f"{'the same result for every check' if agree else 'DIFFERENT results'}; "
                 f"{REBINDING} through the gateway: {'passed' if protected else 'FAILED'}")
    return lines, agree and protected


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="write the suite's results here instead of a temporary directory")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        node = js_tools.node()
    except js_tools.Unavailable as unavailable:
        print(f"conformance: {unavailable}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as scratch:
        results_dir = args.keep or Path(scratch)
        results_dir.mkdir(parents=True, exist_ok=True)
        server_args = ["-m", "tests.conformance_server", "--port", "0"]
        with running_mcp_server(server_args) as server, gateway_process() as gateway:
            upstream_url = str(server.url / server.path.lstrip("/"))
            direct = run_suite(node, upstream_url, results_dir / "direct")
            through = run_suite(node, str(gateway.url / server.path.lstrip("/")), results_dir / "gateway",
                                route_to=str(server.url))
        lines, ok = compare(direct, through)
    print("\n".join(lines))
    print(f"took {time.monotonic() - started:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
