"""The in-process userspace data channel: an asyncio data plane on a TUN device (see :mod:`.backend`).

One module per concern: :mod:`.backend` (commands, notifications, peer lifecycle), :mod:`.peers`
(interface and peer state, the shared UDP socket's address index), :mod:`.udp` (UDP receive and
send with GRO/GSO, the P2P TUN reader), :mod:`.tcp` (TCP framing), :mod:`.keepalive` (the
keepalive timer and lane draining), :mod:`.multipoint` (MP demultiplexing and route lookup),
:mod:`.routing` (the mirror of the routes through the TUN) and :mod:`.lane` (the keepalive lane).
"""

from pyovpn.datachannel.userspace.backend import UserspaceDataChannel

__all__ = ["UserspaceDataChannel"]
