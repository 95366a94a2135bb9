"""Many UDP datagrams per system call: ``recvmmsg(2)`` through ctypes, for the engine's receive side.

A stock OpenVPN peer sends one datagram per packet, so without UDP GRO on the receiving path
every packet cost one ``recvmsg`` call from Python (about 1.8 us of interpreter and call
overhead each). :class:`BatchReceiver` takes up to ``count`` datagrams (or GRO batches) into
fixed 64 KiB slots of one buffer per call. Results are read column-wise through numpy views
of the ``mmsghdr`` array; sender addresses are turned into the tuples ``socket.recvfrom``
would return, cached by their raw bytes, since nearly every datagram comes from an address
seen just before.

Linux x86_64/aarch64 layout (LP64) only; :func:`available` says whether it can be used, and
callers keep their one-``recvmsg``-per-datagram path as the fallback.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import socket
import struct
import sys
from typing import Any

import numpy as np

from pyovpn.net.sockets import SOL_UDP, UDP_GRO

SLOT = 65536  # one receive: a UDP GRO batch is at most 64 KiB
_NAME = 32  # room for a sockaddr_in6 (28 bytes)
_CMSG = 64  # room for the UDP_GRO cmsg (16-byte header + int)
_MSG_DONTWAIT = 0x40
_MSG_TRUNC = 0x20
_HDR = 64  # sizeof(struct mmsghdr) on LP64: msghdr (56) + msg_len (4) + padding
# struct msghdr: name*, namelen, iov*, iovlen, control*, controllen, flags; then msg_len
_MMSGHDR = np.dtype(
    {
        "names": ["name", "namelen", "iov", "iovlen", "control", "controllen", "flags", "len"],
        "formats": ["<u8", "<u4", "<u8", "<u8", "<u8", "<u8", "<i4", "<u4"],
        "offsets": [0, 8, 16, 24, 32, 40, 48, 56],
        "itemsize": _HDR,
    }
)
_IOVEC = np.dtype({"names": ["base", "len"], "formats": ["<u8", "<u8"], "itemsize": 16})
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


def available() -> bool:
    """Whether this platform has ``recvmmsg`` with the LP64 Linux layout this module assumes."""
    if not sys.platform.startswith("linux") or ctypes.sizeof(ctypes.c_void_p) != 8:
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
        self.hdr = np.frombuffer(self._hdrs, dtype=_MMSGHDR)
        iov = np.frombuffer(self._iovs, dtype=_IOVEC)
        base = _address_of(buf)
        iov["base"] = base + np.arange(count, dtype=np.uint64) * SLOT
        iov["len"] = SLOT
        self.hdr["name"] = _address_of(self._names) + np.arange(count, dtype=np.uint64) * _NAME
        self.hdr["iov"] = _address_of(self._iovs) + np.arange(count, dtype=np.uint64) * 16
        self.hdr["iovlen"] = 1
        self.hdr["control"] = _address_of(self._ctl) + np.arange(count, dtype=np.uint64) * _CMSG
        self._hdrs_ptr = _address_of(self._hdrs)
        self._addr_cache: dict[bytes, tuple[Any, ...] | None] = {}
        self.names = np.frombuffer(self._names, dtype=np.uint8).reshape(count, _NAME)
        # set by results(): no datagram was cut short or GRO-coalesced / all came from one sender
        self.plain = True
        self.one_sender = False

    def recv(self) -> int:
        """Take what is queued, without blocking: the number of datagrams (0 if none).

        Raises ``OSError`` for a socket error other than "nothing to read".
        """
        hdr = self.hdr
        hdr["namelen"] = _NAME
        hdr["controllen"] = _CMSG
        n = self._fn(self.fd, self._hdrs_ptr, self.count, _MSG_DONTWAIT, None)
        if n < 0:
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EINTR):
                return 0
            raise OSError(err, f"recvmmsg: {errno.errorcode.get(err, err)}")
        return int(n)

    def results(self, n: int) -> tuple[list[int], list[tuple[Any, ...] | None], list[int], list[bool]]:
        """For the last ``n`` datagrams: lengths, sender addresses, GRO segment sizes (0: not
        coalesced) and whether the datagram was cut short (larger than a slot)."""
        hdr = self.hdr[:n]
        lens: list[int] = hdr["len"].tolist()
        trunc = (hdr["flags"] & _MSG_TRUNC) != 0
        truncated: list[bool] = trunc.tolist()
        segs = [0] * n
        ctl_lens = hdr["controllen"]
        self.plain = not trunc.any() and not ctl_lens.any()
        self.one_sender = False
        if ctl_lens.any():
            ctl = self._ctl
            for i in np.flatnonzero(ctl_lens).tolist():
                segs[i] = _gro_size(ctl, i * _CMSG, int(ctl_lens[i]))
        namelens = hdr["namelen"]
        rows = self.names[:n]
        if n > 1 and (namelens == namelens[0]).all() and (rows == rows[0]).all():
            # the usual case: one sender for the whole batch
            self.one_sender = True
            return lens, [self._sender(0, int(namelens[0]))] * n, segs, truncated
        nl = namelens.tolist()
        names = self._names
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
