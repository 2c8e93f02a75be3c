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


async def bursts_to(
    name: str, target: RaceTarget, bursts: int, calls: int, concurrency: int, gap_s: tuple[float, float],
    seed: int, progress: Callable[[str], object] | None,
) -> RaceResult:
    """One target's bursts, each gap timed from the end of that target's own burst.

    The gap is then the time its pooled connections sat idle (give or take a millisecond), which
    would not hold if every target waited for the slowest one's burst to end.
    """
    rng = random.Random(seed)
    result = RaceResult()
    for index in range(bursts):
        started = time.monotonic()
        result.outcomes.update(await burst(target, calls, concurrency))
        result.calls += calls
        if progress is not None:
            progress(f"race {name}: burst {index + 1}/{bursts} in {time.monotonic() - started:.2f} s, "
                     f"{result.failed} failed so far")
        if index + 1 < bursts:
            await asyncio.sleep(rng.uniform(*gap_s))
    return result


async def race(
    targets: Mapping[str, RaceTarget], bursts: int, calls: int, concurrency: int,
    gap_s: tuple[float, float] = (4.0, 6.0), seed: int = 12, progress: Callable[[str], object] | None = None,
) -> dict[str, RaceResult]:
    """Every target gets the same seeded gaps, so one run compares the proxies under one schedule.

    The gaps are the same from run to run; a narrower gap_s around the idle timeout (4.95-5.05)
    lands more reuses inside the few milliseconds where the race is lost.
    """
    results = await asyncio.gather(*(bursts_to(name, target, bursts, calls, concurrency, gap_s, seed, progress)
                                     for name, target in targets.items()))
    return dict(zip(targets, results, strict=True))
