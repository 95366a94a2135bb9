"""`sndbuf` / `rcvbuf`: the transport socket's kernel buffer sizes, as OpenVPN sets them.

0 (the default) leaves the system's sizes. The kernel doubles what it is asked for and caps
it at net.core.wmem_max / rmem_max, so the log line shows what it actually granted.
"""

from __future__ import annotations

import logging
import socket

log = logging.getLogger("pyovpn")


def apply_socket_buffers(sock: socket.socket, *, sndbuf: int, rcvbuf: int) -> None:
    """Ask for the configured buffer sizes on ``sock`` (before it carries traffic)."""
    if not sndbuf and not rcvbuf:
        return
    before = (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
    )
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    after = (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
    )
    log.info("Socket Buffers: R=[%d->%d] S=[%d->%d]", before[0], after[0], before[1], after[1])
