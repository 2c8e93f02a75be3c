"""The stale-connection race for `make bench-fleet`: bursts of calls, gaps around the upstream's idle timeout.

An upstream that closes idle keep-alive connections after 5 s (uvicorn's default) races every proxy
that reuses one just then: the request goes out on a socket whose FIN is in flight, and unless the
proxy retries the call fails. Gaps drawn from 4-6 s put some reuses on each side of the close.
This is about correctness, not speed, so an asyncio client is enough; each burst opens fresh
client connections, so a failure is the proxy's upstream side, not the client's own stale socket.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import aiohttp

BODY = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"race","arguments":{}}}'
CALL_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class RaceTarget:
    """One proxy under test and the upstream it is told to reach (its own address, for per-proxy counts)."""

    proxy_url: str
    upstream_url: str


@dataclass
class RaceResult:
    calls: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)

    @property
    def failed(self) -> int:
        return self.calls - self.outcomes["200"]


async def one_call(session: aiohttp.ClientSession, target: RaceTarget) -> str:
    """The call's outcome: its status as text, or the exception's class name when there was no status."""
    headers = {"Content-Type": "application/json", "AEnvCore-MCPProxy-URL": target.upstream_url}
    try:
        async with session.post(f"{target.proxy_url}/mcp", data=BODY, headers=headers) as reply:
            await reply.read()
            return str(reply.status)
    except (aiohttp.ClientError, TimeoutError) as exc:
        return type(exc).__name__


async def burst(target: RaceTarget, calls: int, concurrency: int) -> Counter[str]:
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        outcomes = await asyncio.gather(*(one_call(session, target) for _ in range(calls)))
    return Counter(outcomes)


async def race(
    targets: Mapping[str, RaceTarget], bursts: int, calls: int, concurrency: int, seed: int = 12,
    progress: Callable[[str], object] | None = None,
) -> dict[str, RaceResult]:
    """Every target gets the same bursts at the same moments, so one run compares them under one schedule."""
    rng = random.Random(seed)
    results = {name: RaceResult() for name in targets}
    for index in range(bursts):
        started = time.monotonic()
        counts = await asyncio.gather(*(burst(t, calls, concurrency) for t in targets.values()))
        for name, count in zip(targets, counts, strict=True):
            results[name].calls += calls
            results[name].outcomes.update(count)
        if progress is not None:
            failed = {name: result.failed for name, result in results.items()}
            progress(f"race burst {index + 1}/{bursts} in {time.monotonic() - started:.2f} s, failed so far {failed}")
        if index + 1 < bursts:
            await asyncio.sleep(rng.uniform(4.0, 6.0))
    return results
