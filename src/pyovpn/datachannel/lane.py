"""The keepalive lane: a second socket on an MP server's UDP port that receives only keepalive pings.

An idle server with a thousand clients receives a keepalive ping every ten milliseconds. Each one
woke the event loop, and in CPython a wakeup costs about 100 µs of CPU whatever the packet, far
more than the ping's own work. Linux lets the sockets of one ``SO_REUSEPORT`` group divide the
incoming datagrams by a classic BPF program (``SO_ATTACH_REUSEPORT_CBPF``, Linux 4.5+). Ours
sends the datagrams that can only be keepalive pings to the lane socket, which nobody polls: the
userspace data channel drains it on its keepalive timer, at least once a second and always before
it looks for expired peers. Everything else goes to
the main socket, read at once, so user data and control packets are never delayed.

Which datagrams: opcode DATA_V2 and exactly 40 bytes, i.e. the 4-byte header, the 4-byte packet
id, the 16-byte AEAD tag and a 16-byte payload. No IP packet is 16 bytes long, so the only
payload of that size is the ping. The sorting is only a hint about timing: the lane's packets go
through the same lookup, decryption and replay checks as any other.

The group index a socket gets is its join order, so the main socket (bound first) is 0 and the
lane 1; a stranger joining later gets 2, which the program never returns, so it receives nothing.
Only sockets of the same user may join at all, and ours are created as root.
"""

from __future__ import annotations

import logging
import socket

from pyovpn.net import cbpf
from pyovpn.net.sockbuf import grow_buffers

log = logging.getLogger(__name__)

SO_ATTACH_REUSEPORT_CBPF = 51
LANE_INDEX = 1
PING_DATAGRAM_SIZE = 40  # DATA_V2 header 4 + packet id 4 + tag 16 + ping payload 16
_DATA_V2_HEADER = 9 << 3
_LANE_RCVBUF = 4 << 20  # room for ~one second of pings from tens of thousands of clients

_PROGRAM = (  # the program sees the UDP payload
    (cbpf.LD_W_LEN, 0, 0, 0),  # A = payload length
    (cbpf.JEQ_K, 0, 4, PING_DATAGRAM_SIZE),  # not 40 bytes: main socket
    (cbpf.LD_B_ABS, 0, 0, 0),  # A = first byte
    (cbpf.ALU_AND_K, 0, 0, 0xF8),  # opcode bits
    (cbpf.JEQ_K, 0, 1, _DATA_V2_HEADER),
    (cbpf.RET_K, 0, 0, LANE_INDEX),
    (cbpf.RET_K, 0, 0, 0),
)


def open_lane(main: socket.socket) -> socket.socket | None:
    """A non-blocking lane socket in ``main``'s reuseport group, with the sorting program attached.

    None when ``main`` was not bound with ``SO_REUSEPORT`` or the kernel refuses a step; the
    reason is logged at debug level and every packet then simply arrives on ``main``.
    """
    try:
        if not main.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
            log.debug("keepalive lane: the server socket has no SO_REUSEPORT; pings wake the loop")
            return None
        local = main.getsockname()
    except OSError as exc:
        log.debug("keepalive lane: cannot inspect the server socket: %s", exc)
        return None
    lane = socket.socket(main.family, socket.SOCK_DGRAM)
    try:
        lane.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if main.family == socket.AF_INET6:
            v6only = main.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
            lane.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
        # a datagram is only spread over sockets bound alike
        mark = main.getsockopt(socket.SOL_SOCKET, socket.SO_MARK)
        if mark:
            lane.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        device = main.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16).rstrip(b"\0")
        if device:
            lane.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device)
        grow_buffers(lane, _LANE_RCVBUF, send=False)
        lane.bind(local)
        fprog, _keep = cbpf.fprog(_PROGRAM)
        lane.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
        lane.setblocking(False)
    except OSError as exc:
        lane.close()
        log.debug("keepalive lane: not available (%s); pings wake the loop", exc)
        return None
    return lane


def close_lane(lane: socket.socket) -> None:
    """Leave the group; the program stays with the main socket but, alone, it gets everything."""
    lane.close()
