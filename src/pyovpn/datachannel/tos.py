"""OpenVPN's `passtos` for the userspace data planes: the inner packet's TOS on the outer packet.

OpenVPN reads the TOS byte of each IPv4 packet from the tun and sets it on the transport socket
(``IP_TOS``) before that packet is sent. pyovpn does the same and, beyond OpenVPN, copies an
IPv6 packet's traffic class too (both are DSCP + ECN in one byte). The socket option is only
set when the value changes, so a flow of equally marked packets costs one byte comparison per
packet; the backends send the packets read before a change first, so every outer packet
carries its own inner packet's byte.
"""

from __future__ import annotations

import contextlib
import socket

__all__ = ["inner_tos", "set_outer_tos"]


def inner_tos(buf: bytes | bytearray | memoryview, off: int = 0) -> int:
    """The DSCP+ECN byte of the IP packet at ``buf[off:]``: IPv4 TOS or IPv6 traffic class (0 if none)."""
    if len(buf) < off + 2:
        return 0
    first = buf[off]
    version = first >> 4
    if version == 4:
        return buf[off + 1]
    if version == 6:
        return ((first & 0x0F) << 4) | (buf[off + 1] >> 4)
    return 0


def set_outer_tos(sock: socket.socket, tos: int) -> None:
    """Mark what ``sock`` sends from now on with ``tos`` (IPv4 and v4-mapped: IP_TOS; IPv6: IPV6_TCLASS).

    A refusal is not fatal (the packet still goes out, unmarked), as in OpenVPN.
    """
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tos)
    if sock.family == socket.AF_INET6:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, tos)
