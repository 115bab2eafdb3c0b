"""Open connections held to limits: admission against a total and a per-client cap, and who makes
room when the total is reached (the connection idle longest, so idle or slow clients, even many of
them, cannot lock a new client out while any of them is idle). DNS over TCP (dns/listeners.py) and the
API (http/listener.py) each keep a table.
"""

from __future__ import annotations

from collections import Counter
from typing import Generic, Protocol, TypeVar


class Held(Protocol):
    """What the table needs of a connection."""

    @property
    def client(self) -> str: ...

    @property
    def last_active(self) -> float: ...  # loop time of its last complete request (or of its start)

    @property
    def busy(self) -> bool: ...  # a request of its is being answered: not idle, never the one to go

    def abort(self) -> None: ...


C = TypeVar("C", bound=Held)


class ConnectionTable(Generic[C]):
    def __init__(self, max_connections: int, max_per_client: int) -> None:
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self.open: dict[C, None] = {}
        self.per_client: Counter[str] = Counter()
        self.closed: Counter[str] = Counter()  # why connections were refused or closed early (metrics, tests)

    def admit(self, conn: C) -> bool:
        if self.per_client[conn.client] >= self.max_per_client:
            self.closed["per_client_limit"] += 1
            return False
        if len(self.open) >= self.max_connections:
            idle = [c for c in self.open if not c.busy]
            if not idle:
                self.closed["total_limit"] += 1
                return False
            victim = min(idle, key=lambda c: c.last_active)
            self.closed["evicted"] += 1
            victim.abort()
            # out of the count now: its transport reports the close only on a later turn of the loop,
            # and a burst of accepts in between would otherwise pick the same victim again and again
            self.discard(victim)
        self.open[conn] = None
        self.per_client[conn.client] += 1
        return True

    def discard(self, conn: C) -> None:
        if self.open.pop(conn, 0) is None:
            self.per_client[conn.client] -= 1
            if not self.per_client[conn.client]:
                del self.per_client[conn.client]

    def __len__(self) -> int:
        return len(self.open)
