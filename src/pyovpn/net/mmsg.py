"""Many UDP datagrams per system call: ``recvmmsg(2)`` through ctypes, for the engine's receive side.

A stock OpenVPN peer sends one datagram per packet, so without UDP GRO on the receiving path
every packet cost one ``recvmsg`` call from Python (about 1.8 us of interpreter and call
overhead each). :class:`BatchReceiver` takes up to ``count`` datagrams (or GRO batches) into
fixed 64 KiB slots of one buffer per call. Results are read column-wise through strided
memoryviews of the ``mmsghdr`` array (no numpy: the daemon, which reads a P2MP server's socket
this way, must not pay numpy's resident memory). Sender addresses are turned into the tuples
``socket.recvfrom`` would return, cached by their raw bytes, since nearly every datagram comes
from an address seen just before.

Linux little-endian LP64 layout (x86_64, aarch64) only; :func:`available` says whether it can
be used, and callers keep their one-``recvmsg``-per-datagram path as the fallback.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import mmap
import socket
import struct
import sys
from typing import Any

from pyovpn.net.sockets import SOL_UDP, UDP_GRO

SLOT = 65536  # one receive: a UDP GRO batch is at most 64 KiB
_NAME = 32  # room for a sockaddr_in6 (28 bytes)
_CMSG = 64  # room for the UDP_GRO cmsg (16-byte header + int)
_MSG_DONTWAIT = 0x40
_MSG_TRUNC = 0x20
_HDR = 64  # sizeof(struct mmsghdr) on LP64: msghdr (56) + msg_len (4) + padding
# struct msghdr: name*, namelen, iov*, iovlen, control*, controllen, flags; then msg_len
_MMSGHDR = struct.Struct("=QI4xQQQQi4xI4x")
assert _MMSGHDR.size == _HDR
_IOVEC = struct.Struct("=QQ")
# the fields results() reads, as indexes of 32-bit words in one 64-byte record (16 words)
_W_NAMELEN, _W_CTLLEN, _W_FLAGS, _W_LEN = 2, 10, 12, 14
_CACHE_MAX = 4096

_libc: Any = None


def _recvmmsg() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = _libc.recvmmsg
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
        fn.restype = ctypes.c_int
    return _libc.recvmmsg


@functools.cache
def available() -> bool:
    """Whether this platform has ``recvmmsg`` with the LP64 Linux layout this module assumes."""
    if (
        not sys.platform.startswith("linux")
        or ctypes.sizeof(ctypes.c_void_p) != 8
        or sys.byteorder != "little"
    ):
        return False
    try:
        _recvmmsg()
    except (OSError, AttributeError):
        return False
    return True


SlotBuffer = bytearray | mmap.mmap


def slot_buffer(count: int) -> mmap.mmap:
    """Room for ``count`` slots. Anonymous memory, so only the pages the kernel writes become
    resident: 32 one-datagram receives touch 128 KiB of the 2 MiB, not all of it."""
    return mmap.mmap(-1, count * SLOT)


def _address_of(buf: SlotBuffer) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def sockaddr_tuple(raw: bytes) -> tuple[Any, ...] | None:
    """The address tuple ``socket.recvfrom`` gives for the raw sockaddr ``raw``; None if unknown."""
    family = int.from_bytes(raw[0:2], sys.byteorder)
    if family == socket.AF_INET and len(raw) >= 8:
        return (socket.inet_ntop(socket.AF_INET, raw[4:8]), int.from_bytes(raw[2:4], "big"))
    if family == socket.AF_INET6 and len(raw) >= 28:
        host = socket.inet_ntop(socket.AF_INET6, raw[8:24])
        scope = int.from_bytes(raw[24:28], sys.byteorder)
        if scope:
            # CPython names the address with getnameinfo(NI_NUMERICHOST): the scope as the
            # interface's name where it has one
            try:
                host = f"{host}%{socket.if_indextoname(scope)}"
            except OSError:
                host = f"{host}%{scope}"
        return (host, int.from_bytes(raw[2:4], "big"), int.from_bytes(raw[4:8], "big"), scope)
    return None


class BatchReceiver:
    """Receives up to ``count`` datagrams per call into ``count`` slots of :data:`SLOT` bytes.

    ``buf`` (at least ``count * SLOT`` bytes; :func:`slot_buffer` makes one) must stay alive and
    unresized while this object is used: the kernel is handed pointers into it. Datagram ``i``
    of the last call starts at ``i * SLOT``.
    """

    def __init__(self, fd: int, buf: SlotBuffer, count: int = 32) -> None:
        if len(buf) < count * SLOT:
            raise ValueError(f"the buffer needs {count * SLOT} bytes for {count} slots")
        self.fd = fd
        self.count = count
        self.buf = buf
        self._fn = _recvmmsg()
        self._hdrs = bytearray(count * _HDR)
        self._iovs = bytearray(count * 16)
        self._names = bytearray(count * _NAME)
        self._ctl = bytearray(count * _CMSG)
        base = _address_of(buf)
        names = _address_of(self._names)
        iovs = _address_of(self._iovs)
        ctl = _address_of(self._ctl)
        for i in range(count):
            _IOVEC.pack_into(self._iovs, i * 16, base + i * SLOT, SLOT)
            _MMSGHDR.pack_into(
                self._hdrs, i * _HDR, names + i * _NAME, _NAME, iovs + i * 16, 1, ctl + i * _CMSG, _CMSG, 0, 0
            )
        # the kernel overwrites namelen/controllen of every message it fills: one copy restores them
        self._pristine = bytes(self._hdrs)
        self._words = memoryview(self._hdrs).cast("I")
        self._hdrs_ptr = _address_of(self._hdrs)
        self._last = 0
        self._addr_cache: dict[bytes, tuple[Any, ...] | None] = {}
        # set by results(): no datagram was cut short or GRO-coalesced / all came from one sender
        self.plain = True
        self.one_sender = False

    def recv(self) -> int:
        """Take what is queued, without blocking: the number of datagrams (0 if none).

        Raises ``OSError`` for a socket error other than "nothing to read".
        """
        last = self._last * _HDR
        if last:
            self._hdrs[:last] = self._pristine[:last]
        n = self._fn(self.fd, self._hdrs_ptr, self.count, _MSG_DONTWAIT, None)
        self._last = n if n > 0 else 0
        if n < 0:
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EINTR):
                return 0
            raise OSError(err, f"recvmmsg: {errno.errorcode.get(err, err)}")
        return int(n)

    def results(self, n: int) -> tuple[list[int], list[tuple[Any, ...] | None], list[int], list[bool]]:
        """For the last ``n`` datagrams: lengths, sender addresses, GRO segment sizes (0: not
        coalesced) and whether the datagram was cut short (larger than a slot)."""
        words = self._words
        if n == 1:  # a quiet socket (handshakes, pings): skip the column work
            ln, flag, clen = words[_W_LEN], words[_W_FLAGS], words[_W_CTLLEN]
            cut = bool(flag & _MSG_TRUNC)
            self.plain = not cut and not clen
            self.one_sender = True
            seg = _gro_size(self._ctl, 0, clen) if clen else 0
            return [ln], [self._sender(0, words[_W_NAMELEN])], [seg], [cut]
        end = n * 16
        lens: list[int] = words[_W_LEN:end:16].tolist()
        flags: list[int] = words[_W_FLAGS:end:16].tolist()
        ctl_lens: list[int] = words[_W_CTLLEN:end:16].tolist()
        nl: list[int] = words[_W_NAMELEN:end:16].tolist()
        cut = any(f & _MSG_TRUNC for f in flags)
        truncated = [bool(f & _MSG_TRUNC) for f in flags] if cut else [False] * n
        segs = [0] * n
        coalesced = any(ctl_lens)
        self.plain = not cut and not coalesced
        self.one_sender = False
        if coalesced:
            ctl = self._ctl
            for i, clen in enumerate(ctl_lens):
                if clen:
                    segs[i] = _gro_size(ctl, i * _CMSG, clen)
        names = self._names
        if n > 1 and nl.count(nl[0]) == n and names[: n * _NAME] == names[:_NAME] * n:
            # the usual case: one sender for the whole batch
            self.one_sender = True
            return lens, [self._sender(0, nl[0])] * n, segs, truncated
        addrs: list[tuple[Any, ...] | None] = []
        last_raw = None
        last: tuple[Any, ...] | None = None
        for i in range(n):
            raw = names[i * _NAME : i * _NAME + nl[i]]
            if raw != last_raw:
                last_raw = raw
                last = self._sender(i, nl[i])
            addrs.append(last)
        return lens, addrs, segs, truncated

    def _sender(self, i: int, namelen: int) -> tuple[Any, ...] | None:
        """Datagram ``i``'s sender as ``socket.recvfrom`` names it (cached by the raw sockaddr)."""
        raw = bytes(self._names[i * _NAME : i * _NAME + namelen])
        cache = self._addr_cache
        addr = cache.get(raw, ())
        if addr == ():
            if len(cache) >= _CACHE_MAX:
                cache.clear()
            addr = cache[raw] = sockaddr_tuple(raw)
        return addr


_CMSG_HDR = struct.Struct("=Qii")  # cmsg_len, cmsg_level, cmsg_type (LP64)


def _gro_size(ctl: bytearray, off: int, length: int) -> int:
    """The UDP_GRO segment size in the control data ``ctl[off:off+length]``; 0 if absent."""
    end = off + length
    while off + _CMSG_HDR.size <= end:
        clen, level, kind = _CMSG_HDR.unpack_from(ctl, off)
        if clen < _CMSG_HDR.size:
            break
        if level == SOL_UDP and kind == UDP_GRO and clen >= _CMSG_HDR.size + 4:
            return int.from_bytes(ctl[off + 16 : off + 20], sys.byteorder)
        off += (clen + 7) & ~7
    return 0
