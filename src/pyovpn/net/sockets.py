"""Socket facts every data plane shares: UDP GSO/GRO option numbers, which send errors are
transient, which mean the TCP peer is gone, and how to name a socket or an IPv6 scope.

The kernel backend, the in-process userspace backend and the offload engine all hand a
socket around by descriptor and must agree on these; they live here once.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Final

SOL_UDP: Final = 17
UDP_SEGMENT: Final = 103  # send: one buffer, cut by the kernel into gso_size datagrams
UDP_GRO: Final = 104  # receive: coalesced datagrams plus a cmsg carrying their size

# A send that fails with one of these loses that packet only: the peer or the path may come
# back (ICMP errors surface as ECONNREFUSED/EHOSTUNREACH on the next send), so the socket stays.
TRANSIENT_SEND_ERRNOS: Final = frozenset(
    {
        errno.EAGAIN,
        errno.ENOBUFS,
        errno.ECONNREFUSED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EPERM,  # netfilter said no
    }
)
# A receive that fails with one of these reports an ICMP error queued on the socket (a port or
# host unreachable for an earlier send); the socket is fine and the next receive goes on.
RECV_ICMP_ERRNOS: Final = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH})
# On a TCP stream these mean the other end went away (PeerDelReason.TRANSPORT_DISCONNECT).
TCP_DISCONNECT_ERRNOS: Final = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ESHUTDOWN})


def socket_key(fd: int) -> tuple[int, int]:
    """Identifies a socket across duplicated descriptors (and across processes)."""
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


def scope_index(scope: str | None) -> int:
    """The interface index of an IPv6 scope (``"2"`` or ``"eth0"``); 0 when absent or unknown."""
    if not scope:
        return 0
    if scope.isdigit():
        return int(scope)
    try:
        return socket.if_nametoindex(scope)
    except OSError:
        return 0
