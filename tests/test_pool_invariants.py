"""The pool's bookkeeping under any sequence of operations: the budget holds, and what it holds idle is
exactly what its per-host lists hold, oldest first (hypothesis drives the sequences)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import GatewayOverloaded
from gateway.pool import Pool, PoolKey


@dataclass(eq=False, slots=True)
class FakeConnection:
    key: PoolKey
    idle_since: float = 0.0
    idle_until: float = float("inf")
    lost: bool = False
    idle: bool = False
    closed: bool = False

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


KEYS = [("http", "127.0.0.1", port) for port in range(5)]
operations = st.lists(st.tuples(st.sampled_from(["take", "open", "give_back", "drop", "lose", "shed"]),
                                st.integers(0, 4)), max_size=60)


def check(pool: Pool[FakeConnection], busy: list[FakeConnection]) -> None:
    assert pool.open <= pool.max_connections
    assert len(pool._lru) <= pool.max_idle
    held = [c for queue in pool._by_key.values() for c in queue]
    assert sorted(map(id, held)) == sorted(map(id, pool._lru))
    for key, queue in pool._by_key.items():  # (an emptied list may stay until the timer prunes it)
        assert all(c.key == key and c.idle and not c.closed for c in queue)
        order = [c for c in pool._lru if c.key == key]
        assert list(queue) == order  # oldest first, in both
    assert pool.stats().busy == len(busy)


@settings(max_examples=200, deadline=None)
@given(ops=operations, max_connections=st.integers(1, 6), max_idle=st.integers(0, 6))
def test_the_budget_and_the_idle_lists_stay_consistent(ops: list[tuple[str, int]], max_connections: int,
                                                       max_idle: int) -> None:
    async def run() -> None:
        pool: Pool[FakeConnection] = Pool(max_connections, max_idle, idle_timeout_s=60.0)
        busy: list[FakeConnection] = []
        for operation, index in ops:
            key = KEYS[index]
            if operation == "take":
                taken = pool.take(key)
                if taken is not None:
                    assert taken.key == key and not taken.closed
                    busy.append(taken)
            elif operation == "open":
                try:
                    pool.reserve()
                except GatewayOverloaded:
                    assert pool.open >= max_connections and not pool._lru
                else:
                    connection = FakeConnection(key)
                    pool.opened_one(connection)
                    busy.append(connection)
            elif operation in ("give_back", "drop") and busy:
                connection = busy.pop(index % len(busy))
                pool.give_back(connection, reusable=operation == "give_back")
            elif operation == "lose" and pool._lru:
                victim = list(pool._lru)[index % len(pool._lru)]
                victim.lost = True
                pool.lost_while_idle(victim)
            elif operation == "shed":
                pool.shed(index)
            check(pool, busy)
        pool.close()
        assert pool.open == 0

    asyncio.run(run())
