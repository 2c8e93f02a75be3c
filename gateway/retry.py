"""Connect retries: a refused connection is retried with jittered backoff within a time budget.

Only ConnectionRefusedError is retried: it proves no request byte reached the upstream (a sandbox
whose port is not bound yet). Anything after a connection exists is never retried.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

T = TypeVar("T")

FIRST_DELAY_S: Final = 0.05
MAX_DELAY_S: Final = 0.5


async def retry_refused(attempt: Callable[[], Awaitable[T]], budget_s: float) -> T:
    """Await attempt(); while it is refused and budget_s has not passed, wait a jittered delay and retry."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget_s
    delay = FIRST_DELAY_S
    while True:
        try:
            return await attempt()
        except ConnectionRefusedError:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise
        # The wait is outside the except, as every await in the compiled modules is: compiled code (mypyc)
        # suspended in an except or finally block leaves its exception as the one being handled for the
        # other tasks, whose own exceptions then chain to it (tests/test_import_layers.py checks for it).
        # Full jitter (AWS architecture blog): replicas retrying one sandbox do not move in step.
        await asyncio.sleep(min(remaining, random.uniform(0, delay)))
        delay = min(delay * 2, MAX_DELAY_S)
