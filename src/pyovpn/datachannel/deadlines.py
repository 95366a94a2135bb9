"""Keepalive deadlines of many peers: one heap, checked on a coarse clock (both userspace planes).

A server with thousands of clients must not walk all of them on every timer: each peer sits
in the heap once, under the earliest of its ping and expiry deadlines, and a timer pass pops
only the peers that are due. Traffic moves a peer's real deadlines later without touching
the heap (that would cost a push per packet); a popped peer whose deadlines moved is simply
checked and pushed back under the new ones.

An entry is stale once its peer's ``ka_due`` differs from the entry's deadline (the peer was
rescheduled or removed, see :meth:`DeadlineHeap.cancel`); stale entries are dropped as they
surface. Timers fire on multiples of ``KA_QUANTUM`` (:func:`fire_time`), so a thousand
clients pinging every 10 s cost four wakeups a second, not a hundred.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Generic, Protocol, TypeVar

from pyovpn.datachannel.datapath import KA_QUANTUM

__all__ = ["DeadlineHeap", "Scheduled", "fire_time"]


class Scheduled(Protocol):
    ka_due: float | None  # the deadline of this peer's live heap entry, None when it has none


P = TypeVar("P", bound=Scheduled)


def fire_time(due: float) -> float:
    """When a timer for ``due`` fires: the end of the ``KA_QUANTUM`` step holding it (never early)."""
    return math.ceil(due / KA_QUANTUM) * KA_QUANTUM


class DeadlineHeap(Generic[P]):
    __slots__ = ("_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, P]] = []
        self._seq = itertools.count()  # ties never compare peers

    def schedule(self, peer: P, due: float) -> None:
        """Put ``peer`` under ``due``; an entry it had before becomes stale."""
        peer.ka_due = due
        heapq.heappush(self._heap, (due, next(self._seq), peer))

    @staticmethod
    def cancel(peer: P) -> None:
        peer.ka_due = None

    def earliest(self) -> float | None:
        """The earliest live deadline, or None when no peer is waiting."""
        heap = self._heap
        while heap and heap[0][2].ka_due != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def pop_due(self, until: float) -> list[P]:
        """Take out every peer whose deadline is at or before ``until`` (their ``ka_due`` is cleared)."""
        heap = self._heap
        due_now: list[P] = []
        while heap and heap[0][0] <= until:
            due, _, peer = heapq.heappop(heap)
            if peer.ka_due == due:
                peer.ka_due = None
                due_now.append(peer)
        return due_now

    def clear(self) -> None:
        for _, _, peer in self._heap:
            peer.ka_due = None
        self._heap.clear()

    def __len__(self) -> int:
        """Entries, stale ones included (for tests and statistics)."""
        return len(self._heap)
