"""Transport socket options from the config: `sndbuf`, `rcvbuf`, `mark` and `bind-dev`.

Buffer sizes of 0 (the default) leave the system's. The kernel doubles a requested buffer size
and caps it at net.core.wmem_max / rmem_max, so the log line shows what it actually granted.
`mark` sets the packets' firewall mark (policy routing); `bind-dev` ties the socket to one
interface (e.g. a VRF). Both need CAP_NET_ADMIN, as in OpenVPN; a failure is a fatal Stop.
"""

from __future__ import annotations

import logging
import socket

from pyovpn.config import Options
from pyovpn.edge.stop import Stop

log = logging.getLogger("pyovpn")


def apply_socket_options(sock: socket.socket, opts: Options) -> None:
    """Apply the configured options to a new transport socket, before it carries traffic."""
    _apply_buffers(sock, sndbuf=opts.sndbuf, rcvbuf=opts.rcvbuf)
    try:
        if opts.mark:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, opts.mark)
        if opts.bind_dev:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, opts.bind_dev.encode())
    except OSError as exc:
        sock.close()
        what = "mark" if opts.mark and not opts.bind_dev else "mark/bind-dev"
        raise Stop.fatal(f"cannot apply {what} to the socket: {exc.strerror} (needs CAP_NET_ADMIN)") from None


def _apply_buffers(sock: socket.socket, *, sndbuf: int, rcvbuf: int) -> None:
    if not sndbuf and not rcvbuf:
        return
    before = _buffers(sock)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    after = _buffers(sock)
    log.info("Socket Buffers: R=[%d->%d] S=[%d->%d]", before[0], after[0], before[1], after[1])


def _buffers(sock: socket.socket) -> tuple[int, int]:
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
    )
