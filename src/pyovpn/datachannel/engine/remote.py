"""A peer's remote address in shared memory, so a float reaches the transmit side at once.

The receive side of a peer (one worker) detects a float when an authenticated packet comes
from a new address; the transmit side (usually another worker) must send the very next
packet there, for instance the reply the kernel generates to the packet that floated.
A message through the controller would arrive too late, so the address lives in a small
``memfd`` mapping shared by the controller and both workers, guarded by a sequence
counter (odd while a writer is in the middle of an update, seqlock style). Readers
compare the counter with the one they cached, which costs one ``unpack_from`` per batch.
"""

from __future__ import annotations

import mmap
import os
import socket
import struct
from typing import Any

__all__ = ["RemoteArea", "RemoteCell"]

_GEN = struct.Struct("<I")
_BODY = struct.Struct("<HH16sI")  # family, port, address, scope id
_SIZE = 64


class RemoteCell:
    """One remote address: a mapping of its own (``fd``: map that memfd, None: create one), or
    the ``base`` offset of a slot in a :class:`RemoteArea`'s mapping ``mm``."""

    def __init__(self, fd: int | None = None, *, mm: mmap.mmap | None = None, base: int = 0) -> None:
        self.base = base
        if mm is not None:
            self.fd = -1
            self.mm = mm
            self.owns = False
            return
        if fd is None:
            fd = os.memfd_create("pyovpn-remote", os.MFD_CLOEXEC)
            os.ftruncate(fd, _SIZE)
        self.fd = fd
        self.mm = mmap.mmap(fd, _SIZE)
        self.owns = True

    def generation(self) -> int:
        gen: int = _GEN.unpack_from(self.mm, self.base)[0]
        return gen

    def store(self, send_addr: tuple[Any, ...]) -> None:
        """Publish a socket address: ``(ip, port)`` for AF_INET, ``(ip, port, flow, scope)`` for AF_INET6."""
        family = socket.AF_INET6 if len(send_addr) == 4 else socket.AF_INET
        raw = socket.inet_pton(family, str(send_addr[0]).split("%")[0])
        scope = int(send_addr[3]) if family == socket.AF_INET6 else 0
        gen = self.generation()
        if gen & 1:
            gen += 1
        base = self.base
        _GEN.pack_into(self.mm, base, (gen + 1) & 0xFFFFFFFF)
        _BODY.pack_into(self.mm, base + 4, family, send_addr[1], raw.ljust(16, b"\0"), scope)
        _GEN.pack_into(self.mm, base, (gen + 2) & 0xFFFFFFFF)

    def load(self) -> tuple[int, tuple[Any, ...]]:
        """``(generation, send_addr)``, retrying while a writer is mid-update."""
        while True:
            g1 = self.generation()
            if g1 & 1:
                continue
            family, port, raw, scope = _BODY.unpack_from(self.mm, self.base + 4)
            if self.generation() == g1:
                break
        if family == socket.AF_INET6:
            return g1, (socket.inet_ntop(socket.AF_INET6, raw), port, 0, scope)
        return g1, (socket.inet_ntop(socket.AF_INET, raw[:4]), port)

    def drop_fd(self) -> None:
        """Close the descriptor; the mapping stays (a receiver calls this once it has mapped it)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        if self.owns:
            self.mm.close()
        self.drop_fd()


class RemoteArea:
    """The cells of a multipoint server's peers, as slots of one shared mapping.

    A mapping per peer costs a page of resident memory in each of the three processes and a
    descriptor while it is handed over; a server with thousands of clients keeps them all in
    one sparse memfd instead (only the pages holding used slots become resident). The
    controller hands out the slots (:meth:`take`, :meth:`give`); the workers map the same
    memfd once and address a peer's cell by its slot.
    """

    SLOTS = 1 << 16

    def __init__(self, fd: int | None = None) -> None:
        if fd is None:
            fd = os.memfd_create("pyovpn-remotes", os.MFD_CLOEXEC)
            os.ftruncate(fd, self.SLOTS * _SIZE)
        self.fd = fd
        self.mm = mmap.mmap(fd, self.SLOTS * _SIZE)
        self._free: list[int] = []
        self._next = 0

    def cell(self, slot: int) -> RemoteCell:
        if not 0 <= slot < self.SLOTS:
            raise ValueError(f"remote slot {slot} out of range")
        return RemoteCell(mm=self.mm, base=slot * _SIZE)

    def take(self) -> int | None:
        """A free slot (lowest reused first), or None when all are in use."""
        if self._free:
            return self._free.pop()
        if self._next < self.SLOTS:
            self._next += 1
            return self._next - 1
        return None

    def give(self, slot: int) -> None:
        self._free.append(slot)

    def drop_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        self.drop_fd()
        self.mm.close()
