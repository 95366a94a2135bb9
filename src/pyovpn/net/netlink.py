"""Raw netlink framing shared by pyovpn's own netlink sockets: the socket options and
header flags not every pyroute2 version exports, and how a receive buffer splits into
messages.

The kernel backend's generic-netlink channel and the userspace route monitor both read
non-blocking ``AF_NETLINK`` sockets on the event loop without pyroute2's socket classes,
so they walk the ``nlmsghdr`` chain themselves; the rules for doing so live here once.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Final, NamedTuple, TypeVar

# linux/netlink.h
NETLINK_GENERIC: Final = 16
SOL_NETLINK: Final = 270
NETLINK_ADD_MEMBERSHIP: Final = 1
NETLINK_CAP_ACK: Final = 10
NETLINK_EXT_ACK: Final = 11
NLM_F_CAPPED: Final = 0x100  # the error message does not echo the request's payload
NLM_F_ACK_TLVS: Final = 0x200  # extended-ACK attributes follow the error
NLA_F_NET_BYTEORDER: Final = 1 << 14

NLMSGHDR: Final = struct.Struct("=IHHII")  # len, type, flags, seq, pid

Buffer = TypeVar("Buffer", bytes, memoryview)


class Header(NamedTuple):
    length: int
    type: int
    flags: int
    seq: int
    pid: int


def messages(data: Buffer) -> Iterator[tuple[Header, Buffer]]:
    """Each whole message in a receive buffer: its header and the message, header included.

    A truncated or malformed header ends the walk: the kernel never splits a message
    across reads, so what follows it cannot be trusted either.
    """
    off = 0
    end = len(data)
    while off + NLMSGHDR.size <= end:
        header = Header(*NLMSGHDR.unpack_from(data, off))
        if header.length < NLMSGHDR.size or off + header.length > end:
            return
        yield header, data[off : off + header.length]
        off += (header.length + 3) & ~3
