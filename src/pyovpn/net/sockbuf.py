"""Socket buffer sizing for every socket pyovpn opens (UDP server/peer sockets, netlink, the lane)."""

from __future__ import annotations

import socket

SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33


def grow_buffers(sock: socket.socket, size: int, *, send: bool = True, receive: bool = True) -> None:
    """Ask for ``size``-byte kernel buffers, best effort.

    The ``*FORCE`` options pass the ``net.core.[rw]mem_max`` caps but need CAP_NET_ADMIN; without
    it the plain options apply, capped by those sysctls. If both are refused the default stays.
    """
    pairs = []
    if send:
        pairs.append((SO_SNDBUFFORCE, socket.SO_SNDBUF))
    if receive:
        pairs.append((SO_RCVBUFFORCE, socket.SO_RCVBUF))
    for force, plain in pairs:
        for opt in (force, plain):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, size)
                break
            except OSError:
                continue
