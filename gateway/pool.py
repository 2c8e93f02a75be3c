"""The lean transport's upstream connections: one budget for every host, LRU eviction, expiry on one timer.

Thousands of sandboxes sit behind one gateway, each its own host:port, so the pool is bounded as a whole
rather than per host. It holds the idle connections and counts the busy ones (lent to an exchange, or
being opened); Http1Client asks it for a connection or for room to open one, and gives each back.

- A connection is opened only while fewer than `max_connections` are open; past that the least
  recently used idle one is closed to make room, and only when none is idle is the caller told the
  gateway is overloaded (errors.GatewayOverloaded, a 503 of ours, never the sandbox's fault).
- At most `max_idle` stay idle; giving one back past that closes the least recently used.
- An idle connection is never reused past `idle_timeout_s` (checked when taken) and is closed by one
  timer for the whole pool soon after, whether or not traffic arrives. The most recently used
  connection of a host is taken first: it is the least likely to have been closed by the upstream.

Pure bookkeeping on the event loop's thread: no I/O beyond closing connections, no locks.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Final, Generic, Protocol, TypeVar

from gateway.errors import GatewayOverloaded

PoolKey = tuple[str, str, int]  # scheme, host, port

# Why a connection was closed: the `reason` label of aenv_gateway_upstream_connections_closed_total.
IDLE_TIMEOUT: Final = "idle_timeout"  # idle past --upstream-idle-timeout
EVICTED: Final = "evicted"  # closed to stay within the budget or the idle cap, or to free fds
UPSTREAM_CLOSED: Final = "upstream_closed"  # the upstream closed it, or said Connection: close
ERROR: Final = "error"  # its exchange failed or was not read to the end; bytes past a response's end
SHUTDOWN: Final = "shutdown"
CLOSE_REASONS: Final = (IDLE_TIMEOUT, EVICTED, UPSTREAM_CLOSED, ERROR, SHUTDOWN)
# The timer drops hosts with no idle connection every this many ticks: an O(hosts) pass, seldom.
PRUNE_EVERY: Final = 16


class Pooled(Protocol):
    key: PoolKey
    idle_since: float
    idle_until: float  # the upstream's own Keep-Alive timeout can make it sooner than ours
    idle: bool

    def close(self) -> None: ...

    def abort(self) -> None: ...


C = TypeVar("C", bound=Pooled)


@dataclass(frozen=True, slots=True)
class PoolStats:
    """What /metrics shows of the pool: connections now, and counts since the start."""

    idle: int
    busy: int
    max_connections: int
    opened: int
    closed: dict[str, int]


class Pool(Generic[C]):
    def __init__(self, max_connections: int, max_idle: int, idle_timeout_s: float) -> None:
        self.max_connections = max_connections
        self.max_idle = max_idle
        self.idle_timeout_s = idle_timeout_s
        # Each host's idle connections, oldest first. A host's list stays when it empties (a busy host
        # empties and refills it on every call); the timer drops the empty ones now and then.
        self._by_key: dict[PoolKey, list[C]] = {}
        # Every idle connection, oldest first: a dict keeps insertion order, and sets and deletes faster than
        # an OrderedDict; only eviction and expiry read its front.
        self._lru: dict[C, None] = {}
        self._busy: set[C] = set()
        self._retiring: set[C] = set()  # busy when retire() was called: closed when given back
        self._reserved = 0  # connections being opened
        self._timer: asyncio.TimerHandle | None = None
        self._ticks = 0
        self.opened = 0
        self.closed: dict[str, int] = dict.fromkeys(CLOSE_REASONS, 0)

    @property
    def open(self) -> int:
        return len(self._lru) + len(self._busy) + self._reserved

    def stats(self) -> PoolStats:
        return PoolStats(idle=len(self._lru), busy=len(self._busy) + self._reserved,
                         max_connections=self.max_connections, opened=self.opened, closed=dict(self.closed))

    # lending

    def take(self, key: PoolKey) -> C | None:
        """The most recently used idle connection to key that may still be used, now busy; or None."""
        idle = self._by_key.get(key)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            del self._lru[connection]
            if now < connection.idle_until:
                connection.idle = False
                self._busy.add(connection)
                return connection
            self._close(connection, IDLE_TIMEOUT)  # past its time: the older ones are too
        return None

    def reserve(self) -> None:
        """Room for one more connection, about to be opened: an idle one is closed if the budget is full."""
        while self.open >= self.max_connections:
            if not self._lru:
                raise GatewayOverloaded(
                    f"the gateway has {self.open} upstream connections open, all busy: its budget "
                    f"(--upstream-max-connections {self.max_connections}) is reached")
            self._evict_oldest()
        self._reserved += 1

    def opened_one(self, connection: C) -> None:
        """The reserved connection is open, and lent out."""
        self._reserved -= 1
        self.opened += 1
        self._busy.add(connection)

    def unreserve(self) -> None:
        """The reserved connection could not be opened."""
        self._reserved -= 1

    def give_back(self, connection: C, reusable: bool, reason: str = ERROR) -> None:
        """A busy connection is done with its exchange: idle again if reusable, else closed for `reason`."""
        try:
            self._busy.remove(connection)
        except KeyError:  # the pool was closed meanwhile, and counted it
            connection.abort()
            return
        if self._retiring and connection in self._retiring:
            self._retiring.discard(connection)
            reusable, reason = False, EVICTED
        if not reusable:
            connection.abort()  # never reuse a connection whose state is not known
            self.closed[reason] += 1
            return
        now = time.monotonic()
        if len(self._lru) >= self.max_idle:
            if self.max_idle == 0:
                self._close(connection, EVICTED)
                return
            self._evict_oldest()
        connection.idle = True
        connection.idle_since = now
        until = now + self.idle_timeout_s
        if connection.idle_until > until:  # not sooner already, by the upstream's Keep-Alive
            connection.idle_until = until
        idle = self._by_key.get(connection.key)
        if idle is None:
            idle = self._by_key[connection.key] = []
        idle.append(connection)
        self._lru[connection] = None
        if self._timer is None:
            self._arm()

    def lost_while_idle(self, connection: C) -> None:
        """The upstream closed an idle connection: forget it (its transport is closing already)."""
        connection.idle = False
        if self._lru.pop(connection, False) is not False:
            self._by_key[connection.key].remove(connection)
            self.closed[UPSTREAM_CLOSED] += 1

    def shed(self, count: int) -> int:
        """Close up to count of the least recently used idle connections (the process is out of fds)."""
        shed = 0
        while self._lru and shed < count:
            self._evict_oldest()
            shed += 1
        return shed

    def retire(self) -> int:
        """Close every idle connection now, and every busy one when it is given back: a reload changed the
        target policy they were checked against when opened (reload.py). The count closed now."""
        self._retiring.update(self._busy)
        return self.shed(len(self._lru))

    def close(self) -> None:
        self._retiring.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._lru:
            connection = next(iter(self._lru))
            del self._lru[connection]
            self._close(connection, SHUTDOWN)
        self._by_key.clear()
        for connection in self._busy:
            connection.abort()
            self.closed[SHUTDOWN] += 1
        self._busy.clear()

    # expiry and eviction

    def _arm(self) -> None:
        tick = min(1.0, max(self.idle_timeout_s / 4, 0.05))
        self._timer = asyncio.get_running_loop().call_later(tick, self._expire)

    def _expire(self) -> None:
        """The timer: close what has been idle for idle_timeout_s; the oldest first, so it stops early.
        Every PRUNE_EVERY ticks it also drops the hosts whose lists are empty."""
        self._timer = None
        self._ticks += 1
        if self._ticks % PRUNE_EVERY == 0:
            self._by_key = {key: idle for key, idle in self._by_key.items() if idle}
        oldest_kept = time.monotonic() - self.idle_timeout_s
        lru = self._lru
        while lru:
            connection = next(iter(lru))
            if connection.idle_since > oldest_kept:
                break
            self._drop_oldest(connection)
            self._close(connection, IDLE_TIMEOUT)
        if lru or self._by_key:
            self._arm()

    def _evict_oldest(self) -> None:
        connection = next(iter(self._lru))
        self._drop_oldest(connection)
        self._close(connection, EVICTED)

    def _drop_oldest(self, connection: C) -> None:
        """Take the globally least recently used idle connection out: the oldest of its host's too."""
        del self._lru[connection]
        del self._by_key[connection.key][0]

    def _close(self, connection: C, reason: str) -> None:
        connection.idle = False
        connection.close()
        self.closed[reason] += 1
