"""Per-request CPU cost of the observability bookkeeping, piece by piece (microseconds per request).

Run: .venv/bin/python bench/observability_cost.py [--multiproc]   (about 10 seconds, one core)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable

import structlog
from prometheus_client import CollectorRegistry

from gateway.exchange import Exchange, new_request_id
from gateway.jsonrpc import rpc_method
from gateway.log import AccessLine, configure_logging
from gateway.metrics import Metrics, use_multiprocess_dir

BODY = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                   "params": {"name": "search", "arguments": {"query": "x" * 200}}}).encode()


def per_call_us(function: Callable[[], object], rounds: int = 50_000) -> float:
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(rounds):
            function()
        best = min(best, (time.perf_counter() - started) / rounds * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--multiproc", action="store_true", help="metrics in prometheus multiprocess mode")
    args = parser.parse_args()
    multiproc_dir = ""
    if args.multiproc:
        multiproc_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
        use_multiprocess_dir(multiproc_dir, os.environ)
    metrics = Metrics.build(CollectorRegistry(), multiproc_dir)
    exchange = Exchange(new_request_id())
    exchange.target, exchange.upstream_ms, exchange.bytes_out = "10.1.2.3:8081", 3.2, 512
    with open(os.devnull, "w") as devnull:
        configure_logging("json", "info", stream=devnull)
        access = structlog.get_logger("gateway.access")
        access_line = AccessLine()
        fields = {"request_id": exchange.request_id, "method": "POST", "path": "/mcp", "status": 200,
                  "latency_ms": 4.25, "bytes_in": len(BODY), "bytes_out": 512, "instance_id": "env-42",
                  "target": "10.1.2.3:8081", "rpc_method": "tools/call", "engine": "k8s", "outcome": "ok"}

        def observe_and_flush(batch: int) -> None:
            for _ in range(8):
                metrics.observe("POST", "/mcp", 200, "tools/call", 4.25, exchange, len(BODY))
            if batch:
                metrics.flush()

        def bind_and_reset() -> None:
            tokens = structlog.contextvars.bind_contextvars(request_id="abc")
            structlog.contextvars.reset_contextvars(**tokens)

        costs = {
            "request id + Exchange": per_call_us(lambda: Exchange(new_request_id())),
            "rpc_method (fast path)": per_call_us(lambda: rpc_method(BODY)),
            "  for comparison: bind/reset a contextvar": per_call_us(bind_and_reset),
            "metrics.observe (tallied)": per_call_us(lambda: metrics.observe(
                "POST", "/mcp", 200, "tools/call", 4.25, exchange, len(BODY))),
            # A loop pass under load finishes several requests; with workers each pass flushes.
            "metrics.flush, per request of 8": per_call_us(lambda: observe_and_flush(8)) / 8
            - per_call_us(lambda: observe_and_flush(0)) / 8,
            "access line (JSON, written)": per_call_us(lambda: access_line.write("info", fields), 20_000),
            "  for comparison: through structlog": per_call_us(lambda: access.info("request", **fields), 20_000),
        }
    for name, cost in costs.items():
        print(f"{name:42s} {cost:6.2f} us")
    total = sum(cost for name, cost in costs.items() if not name.startswith(" "))
    print(f"{'total':42s} {total:6.2f} us  ({'multiprocess' if multiproc_dir else 'one process'},"
          f" Python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
