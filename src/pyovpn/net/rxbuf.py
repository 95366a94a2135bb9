"""Receiving from a socket through one reused buffer per thread, returning exact-size bytes.

``sock.recv(N)``, ``recvfrom(N)`` and ``recvmsg(N)`` allocate an N-byte object for every call and
shrink it to what arrived. With N between 64 KiB and 1 MiB (a whole datagram, a netlink dump, an
engine message) glibc takes those blocks from its heap; the shrunk blocks that stay alive split
its free space, and over a long run the heap the daemon holds from the system creeps up (the P2P
soak in docs/RELIABILITY.md: a page a minute at reneg-sec 2, flat with this). Here each thread
receives into one anonymous mapping that lives as long as the thread, and each call costs one
copy of exactly the bytes that arrived. Only the pages the largest message so far has touched
are resident.

For the control plane's readers, which copy what they read anyway; the data path keeps its own
preallocated buffers.
"""

from __future__ import annotations

import array
import mmap
import socket
import threading
from typing import Any

_MIN_SIZE = 1 << 16
_local = threading.local()


def _buffer(size: int) -> mmap.mmap:
    buf: mmap.mmap | None = getattr(_local, "buf", None)
    if buf is None or len(buf) < size:
        buf = _local.buf = mmap.mmap(-1, max(size, _MIN_SIZE))
    return buf


def recv(sock: socket.socket, size: int, flags: int = 0) -> bytes:
    """``sock.recv(size, flags)``, through the thread's buffer."""
    buf = _buffer(size)
    n = sock.recv_into(buf, size, flags)
    return buf[:n]


def recvfrom(sock: socket.socket, size: int, flags: int = 0) -> tuple[bytes, Any]:
    """``sock.recvfrom(size, flags)``, through the thread's buffer."""
    buf = _buffer(size)
    n, addr = sock.recvfrom_into(buf, size, flags)
    return buf[:n], addr


def recv_fds(
    sock: socket.socket, size: int, maxfds: int, flags: int = 0
) -> tuple[bytes, list[int], int, Any]:
    """``socket.recv_fds(sock, size, maxfds, flags)``, through the thread's buffer."""
    buf = _buffer(size)
    fds = array.array("i")
    with memoryview(buf) as whole, whole[:size] as view:
        n, anc, msg_flags, addr = sock.recvmsg_into([view], socket.CMSG_SPACE(maxfds * fds.itemsize), flags)
    for level, kind, cdata in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
    return buf[:n], list(fds), msg_flags, addr
