"""The keepalive deadline heap both userspace planes schedule their peers on."""

from __future__ import annotations

import random

from pyovpn.datachannel.datapath import KA_QUANTUM
from pyovpn.datachannel.deadlines import DeadlineHeap, fire_time


class _Peer:
    def __init__(self, name: str) -> None:
        self.name = name
        self.ka_due: float | None = None


def test_pop_due_takes_only_the_peers_that_are_due_in_deadline_order() -> None:
    heap: DeadlineHeap[_Peer] = DeadlineHeap()
    peers = [_Peer(f"p{i}") for i in range(1000)]
    rng = random.Random(7)
    dues = {p.name: rng.uniform(0, 100) for p in peers}
    for p in peers:
        heap.schedule(p, dues[p.name])
    assert heap.earliest() == min(dues.values())
    taken = heap.pop_due(10.0)
    assert [p.name for p in taken] == sorted((n for n, d in dues.items() if d <= 10.0), key=dues.__getitem__)
    assert all(p.ka_due is None for p in taken)
    assert len(heap) == 1000 - len(taken)  # a pass never touches the peers that are not due
    assert heap.earliest() == min(d for d in dues.values() if d > 10.0)


def test_a_rescheduled_or_cancelled_peer_leaves_a_stale_entry_that_is_skipped() -> None:
    heap: DeadlineHeap[_Peer] = DeadlineHeap()
    a, b, c = _Peer("a"), _Peer("b"), _Peer("c")
    heap.schedule(a, 1.0)
    heap.schedule(b, 2.0)
    heap.schedule(c, 3.0)
    heap.schedule(a, 5.0)  # traffic moved a's deadline: its entry at 1.0 is stale
    heap.cancel(b)  # b was removed
    assert heap.earliest() == 3.0
    assert heap.pop_due(4.0) == [c]
    assert heap.pop_due(4.0) == []
    assert heap.pop_due(10.0) == [a]
    assert heap.earliest() is None and len(heap) == 0


def test_equal_deadlines_never_compare_peers() -> None:
    heap: DeadlineHeap[_Peer] = DeadlineHeap()
    peers = [_Peer(str(i)) for i in range(5)]
    for p in peers:
        heap.schedule(p, 1.0)  # _Peer has no ordering: a tie must not reach it
    assert heap.pop_due(1.0) == peers


def test_clear_empties_the_heap_and_forgets_every_deadline() -> None:
    heap: DeadlineHeap[_Peer] = DeadlineHeap()
    peers = [_Peer(str(i)) for i in range(3)]
    for i, p in enumerate(peers):
        heap.schedule(p, float(i))
    heap.clear()
    assert len(heap) == 0 and all(p.ka_due is None for p in peers)


def test_timers_fire_on_quantum_steps_and_never_before_the_deadline() -> None:
    rng = random.Random(3)
    for _ in range(1000):
        due = rng.uniform(0, 1e6)
        fire = fire_time(due)
        assert due <= fire < due + KA_QUANTUM + 1e-9
        assert abs(fire / KA_QUANTUM - round(fire / KA_QUANTUM)) < 1e-6
