"""OpenVPN's `fragment`: its own fragmentation of data-channel payloads (both userspace planes).

With `fragment MAX` on both ends every payload (IP packet or keepalive ping, after compression
framing, before encryption) starts with a 4-byte header, a big-endian word: the type in bits 0-1
(whole packet, a fragment that is not the last, the last fragment), a sequence id in bits 2-9,
the fragment's index in bits 10-14 and, on the last fragment only, the size of the others
divided by 4 in bits 15-28. Every fragment but the last has exactly that size, so the receiver
puts fragment ``i`` at ``i * size``. A payload is cut so that no UDP datagram is larger than
``MAX`` bytes. Fragments of a packet that do not all arrive within 10 s are dropped.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

__all__ = ["FragmentError", "Fragmenter", "Reassembler", "fragment_size"]

WHOLE, NOT_LAST, LAST, TEST = 0, 1, 2, 3
HEADER = struct.Struct(">I")
WHOLE_HEADER = HEADER.pack(WHOLE)
MAX_FRAGMENTS = 32  # the index has 5 bits
SEQ_IDS = 256
TTL = 10.0  # seconds an incomplete packet waits for its other fragments (OpenVPN's FRAG_TTL_SEC)
# a datagram is the DATA_V2 header (4), packet id (4), AEAD tag (16), this header (4) and a piece
DATAGRAM_OVERHEAD = 4 + 4 + 16 + HEADER.size
_MAX_PENDING = 64  # incomplete packets kept at once; older ones go first


class FragmentError(ValueError):
    """A payload that is not a valid fragment (or a packet too large to fragment)."""


def fragment_size(max_datagram: int) -> int:
    """The size of every fragment but the last: a multiple of 4, so the datagram fits ``max_datagram``."""
    size = (max_datagram - DATAGRAM_OVERHEAD) & ~3
    if size < 64:
        raise FragmentError(f"fragment {max_datagram} leaves no room for data; use at least 100")
    return size


class Fragmenter:
    """Cuts outgoing payloads; one per peer (it owns the sequence id)."""

    def __init__(self, max_datagram: int) -> None:
        self.size = fragment_size(max_datagram)
        self._seq = 0

    def split(self, payload: bytes | memoryview) -> list[bytes]:
        """The payload as one whole-packet piece, or as fragments, each with its header."""
        n = len(payload)
        size = self.size
        if n <= size:
            return [WHOLE_HEADER + bytes(payload)]
        count = -(-n // size)
        if count > MAX_FRAGMENTS:
            raise FragmentError(f"a {n}-byte packet needs more than {MAX_FRAGMENTS} fragments")
        seq = self._seq
        self._seq = (seq + 1) % SEQ_IDS
        pieces = []
        for i in range(count):
            last = i == count - 1
            flags = (LAST | (size >> 2) << 15) if last else NOT_LAST
            pieces.append(HEADER.pack(flags | seq << 2 | i << 10) + bytes(payload[i * size : (i + 1) * size]))
        return pieces


@dataclass
class _Partial:
    size: int
    born: float
    pieces: dict[int, bytes] = field(default_factory=dict)
    last: int | None = None


class Reassembler:
    """Puts incoming fragments back together; one per peer."""

    def __init__(self) -> None:
        self._partial: dict[int, _Partial] = {}

    def add(self, plain: bytes, now: float) -> bytes | None:
        """The whole payload once complete (at once for an unfragmented one), else None."""
        if len(plain) < HEADER.size:
            raise FragmentError("payload shorter than the fragment header")
        (flags,) = HEADER.unpack_from(plain)
        kind = flags & 3
        body = plain[HEADER.size :]
        if kind == WHOLE:
            return body
        if kind == TEST:
            raise FragmentError("fragment type TEST is not used by OpenVPN")
        seq, index = (flags >> 2) & 0xFF, (flags >> 10) & 0x1F
        size = ((flags >> 15) & 0x3FFF) << 2 if kind == LAST else len(body)
        if len(body) > size or not body:
            raise FragmentError(f"fragment of {len(body)} bytes in {size}-byte pieces")
        part = self._partial.get(seq)
        if part is None or part.size != size or now - part.born > TTL:
            if len(self._partial) >= _MAX_PENDING:
                self._expire(now)
            part = self._partial[seq] = _Partial(size, now)
        part.pieces[index] = body
        if kind == LAST:
            part.last = index
        if part.last is None or len(part.pieces) != part.last + 1:
            return None
        del self._partial[seq]
        if max(part.pieces) != part.last:
            raise FragmentError("fragment index beyond the last fragment")
        return b"".join(part.pieces[i] for i in range(part.last + 1))

    def _expire(self, now: float) -> None:
        for seq in [s for s, p in self._partial.items() if now - p.born > TTL]:
            del self._partial[seq]
        while len(self._partial) >= _MAX_PENDING:
            del self._partial[min(self._partial, key=lambda s: self._partial[s].born)]
