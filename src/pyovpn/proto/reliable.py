"""The control channel's reliability layer: send window, retransmission, ACK bookkeeping, ordering.

Semantics follow OpenVPN's ``reliable.c``: per key state, message ids start at 0 and have no
gaps; a packet is retransmitted after ``timeout`` seconds, doubling each time, or early once
three ACKs for later ids arrived; every received packet with an id inside the receive
window is ACKed (duplicates too) and delivered strictly in order.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from pyovpn.proto.packets import Opcode

SEND_WINDOW = 6
RECV_WINDOW = 12
ACK_MRU_SIZE = 8
FAST_RETRANSMIT_ACKS = 3


@dataclass
class _Outgoing:
    message_id: int
    opcode: Opcode
    payload: bytes
    due: float
    timeout: float
    later_acks: int = 0


class ReliableSender:
    def __init__(self, *, initial_timeout: float = 2.0, window: int = SEND_WINDOW, first_id: int = 0) -> None:
        self.initial_timeout = initial_timeout
        self.window = window
        self.next_id = first_id
        self._unacked: dict[int, _Outgoing] = {}
        self._queue: deque[tuple[Opcode, bytes]] = deque()

    def enqueue(self, opcode: Opcode, payload: bytes) -> None:
        self._queue.append((opcode, payload))

    def skip_id(self) -> None:
        """Consume an id as if sent and ACKed (the stateless-handshake reset)."""
        self.next_id += 1

    @property
    def idle(self) -> bool:
        """Nothing queued and everything sent has been ACKed."""
        return not self._unacked and not self._queue

    def _fill(self, now: float) -> None:
        while self._queue:
            oldest = min(self._unacked) if self._unacked else self.next_id
            if self.next_id - oldest >= self.window:
                return
            opcode, payload = self._queue.popleft()
            mid = self.next_id
            self.next_id += 1
            self._unacked[mid] = _Outgoing(mid, opcode, payload, now, self.initial_timeout)

    def process_acks(self, acks: tuple[int, ...] | list[int]) -> None:
        for mid in acks:
            if self._unacked.pop(mid, None) is None:
                continue
            for out in self._unacked.values():
                if out.message_id < mid:
                    out.later_acks += 1

    def due(self, now: float) -> list[_Outgoing]:
        """Packets to (re)transmit now; their next retransmit time is pushed back."""
        self._fill(now)
        ready: list[_Outgoing] = []
        for out in sorted(self._unacked.values(), key=lambda o: o.message_id):
            if out.due <= now or out.later_acks >= FAST_RETRANSMIT_ACKS:
                ready.append(out)
                out.due = now + out.timeout
                out.timeout *= 2
                out.later_acks = 0
        return ready

    def burst(self, now: float) -> None:
        """Make every outstanding packet due at once (the peer just became reachable)."""
        for out in self._unacked.values():
            out.due = now

    def next_deadline(self) -> float | None:
        if not self._unacked:
            return None
        return min(o.due for o in self._unacked.values())


class ReliableReceiver:
    def __init__(self, *, window: int = RECV_WINDOW, expected: int = 0) -> None:
        self.window = window
        self.expected = expected
        self._buf: dict[int, tuple[Opcode, bytes]] = {}

    def receive(self, message_id: int, opcode: Opcode, payload: bytes) -> bool:
        """Store a packet; returns whether it must be ACKed."""
        if message_id < self.expected:
            return True  # duplicate: ACK again, our ACK was probably lost
        if message_id >= self.expected + self.window:
            return False
        self._buf.setdefault(message_id, (opcode, payload))
        return True

    def pop_ready(self) -> list[tuple[Opcode, bytes]]:
        out = []
        while self.expected in self._buf:
            out.append(self._buf.pop(self.expected))
            self.expected += 1
        return out


class AckTracker:
    """ACKs owed to the peer plus a most-recently-sent list that is repeated on later packets."""

    def __init__(self) -> None:
        self.pending: list[int] = []
        self._mru: deque[int] = deque(maxlen=ACK_MRU_SIZE)

    def add(self, message_id: int) -> None:
        if message_id not in self.pending:
            self.pending.append(message_id)

    def take(self, limit: int) -> list[int]:
        out = self.pending[:limit]
        del self.pending[:limit]
        for mid in self._mru:
            if len(out) >= limit:
                break
            if mid not in out:
                out.append(mid)
        for mid in reversed(out):
            if mid in self._mru:
                self._mru.remove(mid)
            self._mru.appendleft(mid)
        return out
