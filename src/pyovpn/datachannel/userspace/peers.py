"""The userspace data plane's state: the interface, its peers, the shared MP UDP sockets' address index.

:class:`PeerTable` is the base of :class:`~pyovpn.datachannel.userspace.backend.UserspaceDataChannel`:
it declares the state every concern (UDP, TCP, keepalive, multipoint) works on, delivers
notifications, and names the few methods one concern calls in another, so each module
type-checks on its own. The concerns are mixins combined by the backend class; a method
resolves once per class, so splitting them costs the packet loops nothing.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import socket
from typing import Any

from pyovpn.datachannel import api, strangers
from pyovpn.datachannel.crypto import KeyState
from pyovpn.datachannel.deadlines import DeadlineHeap
from pyovpn.datachannel.fragment import Fragmenter, Reassembler
from pyovpn.datachannel.notify import Subscribers
from pyovpn.datachannel.routing import PeerRouter, RouteMonitor
from pyovpn.errors import BackendError
from pyovpn.net.mmsg import BatchReceiver

__all__ = ["RX_BATCH", "RX_BUF_SIZE", "Iface", "Peer", "PeerTable", "SharedUdp"]

log = logging.getLogger(__name__)

RX_BUF_SIZE = 65536
RX_BATCH = 256  # datagrams or TUN packets per wakeup before letting other callbacks run
MMSG_COUNT = 32  # MP: datagrams per recvmmsg call on the shared socket (64 KiB slots: 2 MiB)


class Iface:
    __slots__ = ("fd", "mode", "monitor", "mtu", "name", "peer", "requested_name", "router")

    def __init__(self, name: str, requested_name: str, fd: int, mode: api.IfaceMode, mtu: int) -> None:
        self.name = name
        self.requested_name = requested_name
        self.fd = fd
        self.mode = mode
        self.mtu = mtu
        self.peer: Peer | None = None
        self.router: PeerRouter[Peer] | None = None  # MP only: VPN IPs and routes -> peer
        self.monitor: RouteMonitor | None = None  # MP only: keeps the router's routes current


class Peer:
    __slots__ = (
        "fd",
        "frag",
        "framing",
        "gro",
        "gso_max",
        "iface",
        "ka_due",
        "ka_interval",
        "ka_timeout",
        "keys",
        "last_rx",
        "last_tx",
        "orig_blocking",
        "passtos",
        "peer_id",
        "raw_ip",
        "raw_port",
        "reasm",
        "remote",
        "send_addr",
        "shared",
        "sock",
        "stats",
        "tcp_rx",
        "tcp_tx",
        "tcp_writer",
        "tos",
        "transport",
        "tx_peer_id",
    )

    def __init__(
        self, peer_id: int, tx_peer_id: int, sock: socket.socket, transport: api.Transport, iface: Iface
    ):
        self.peer_id = peer_id
        self.tx_peer_id = tx_peer_id
        self.sock = sock
        self.fd = sock.fileno()
        self.transport = transport
        self.iface = iface
        self.keys: list[KeyState | None] = [None, None]  # [primary, secondary]
        self.stats = api.Stats()
        self.remote: api.Address | None = None
        self.send_addr: tuple[Any, ...] | None = None
        self.raw_ip: str | None = None  # remote as recvfrom() spells it, for a cheap float check
        self.raw_port = 0
        self.last_rx = 0.0
        self.last_tx = 0.0
        self.ka_interval = 0
        self.ka_timeout = 0
        self.ka_due: float | None = None  # this peer's entry in the keepalive heap
        self.gro = False
        self.gso_max = 0  # use UDP GSO for segments smaller than this; 0 = never
        self.orig_blocking = True
        self.tcp_rx = bytearray()
        self.tcp_tx = bytearray()
        self.tcp_writer = False
        self.shared: SharedUdp | None = None  # MP UDP: the socket this peer shares
        self.framing = api.Framing.NONE
        self.passtos = False  # `passtos`: copy each packet's TOS to the outer packet (datachannel/tos.py)
        self.tos = -1  # the TOS last set on the socket for passtos (-1: never set)
        self.frag: Fragmenter | None = None  # `fragment` (datachannel/fragment.py): outgoing ...
        self.reasm: Reassembler | None = None  # ... and incoming


class SharedUdp:
    """MP: our duplicate of the UDP socket the UDP peers share; one reader, closed with its last peer."""

    __slots__ = (
        "by_addr",
        "fd",
        "gro",
        "gso",
        "key",
        "lane",
        "mmsg",
        "orig_blocking",
        "peers",
        "shadowed",
        "sock",
        "tos",
    )

    def __init__(self, key: tuple[int, int], sock: socket.socket) -> None:
        self.key = key
        self.sock = sock
        self.fd = sock.fileno()
        self.lane: socket.socket | None = None  # keepalive pings only, drained by the keepalive timer
        self.mmsg: BatchReceiver | None = None  # MP reads with recvmmsg (net/mmsg.py), made at first read
        self.gro = False
        self.gso = False
        self.orig_blocking = True
        self.tos = -1  # passtos: the TOS last set on the shared socket
        self.peers: set[Peer] = set()
        self.by_addr: dict[tuple[str | None, int], Peer] = {}  # (raw_ip, raw_port) -> peer
        # rare: several peers at one address; the newest is indexed, the others wait here
        self.shadowed: dict[tuple[str | None, int], list[Peer]] = {}

    def attach(self, peer: Peer) -> None:
        self.peers.add(peer)
        self._index(peer, (peer.raw_ip, peer.raw_port))

    def detach(self, peer: Peer) -> None:
        self.peers.discard(peer)
        self._unindex(peer, (peer.raw_ip, peer.raw_port))

    def move(self, peer: Peer, old: tuple[str | None, int]) -> None:
        """The peer's remote changed (float or SetPeer): index it under the new address."""
        new = (peer.raw_ip, peer.raw_port)
        if new != old:
            self._unindex(peer, old)
            self._index(peer, new)

    def _index(self, peer: Peer, addr: tuple[str | None, int]) -> None:
        other = self.by_addr.get(addr)
        if other is not None and other is not peer:
            self.shadowed.setdefault(addr, []).append(other)
        self.by_addr[addr] = peer

    def _unindex(self, peer: Peer, addr: tuple[str | None, int]) -> None:
        waiting = self.shadowed.get(addr)
        if self.by_addr.get(addr) is not peer:
            if waiting and peer in waiting:
                waiting.remove(peer)
                if not waiting:
                    del self.shadowed[addr]
            return
        del self.by_addr[addr]
        while waiting:  # the next peer still at this address takes over
            other = waiting.pop()
            if other in self.peers and (other.raw_ip, other.raw_port) == addr:
                self.by_addr[addr] = other
                break
        if not waiting:
            self.shadowed.pop(addr, None)


class PeerTable:
    """The state of one userspace data plane, and notification delivery."""

    _replay_window: int
    _want_gso: bool
    _want_gro: bool
    _tcp_high_water: int
    _loop: asyncio.AbstractEventLoop | None
    _iface: Iface | None
    _peers: dict[int, Peer]
    _shared: dict[tuple[int, int], SharedUdp]  # MP: shared UDP sockets by identity
    _ka_heap: DeadlineHeap[Peer]  # keepalive deadlines (datachannel/deadlines.py)
    _ka_timer: asyncio.TimerHandle | None
    _ka_timer_at: float
    _subscribers: Subscribers
    _closed: bool
    _rx_buf: bytearray
    _rx_mv: memoryview
    _mmsg_buf: mmap.mmap | None
    _tun_buf: bytearray
    _tun_mv: memoryview
    iface_stats: api.Stats  # drops that happen before a peer is known
    _mp_control: list[api.Notification] | None  # MP: control packets of this wakeup

    def _init_state(self) -> None:
        self._loop = None
        self._iface = None
        self._peers = {}
        self._shared = {}
        self._ka_heap = DeadlineHeap()
        self._ka_timer = None
        self._ka_timer_at = 0.0
        self._subscribers = Subscribers()
        self._closed = False
        self._rx_buf = bytearray(RX_BUF_SIZE)
        self._rx_mv = memoryview(self._rx_buf)
        self._mmsg_buf: mmap.mmap | None = None  # the recvmmsg slots of MP shared sockets
        self._tun_buf = bytearray(RX_BUF_SIZE)
        self._tun_mv = memoryview(self._tun_buf)
        self.iface_stats = api.Stats()
        self._mp_control = None

    def _peer(self, what: str, peer_id: int) -> Peer:
        peer = self._peers.get(peer_id)
        if peer is None:
            raise BackendError(f"{what}: unknown peer id {peer_id}")
        return peer

    def _emit(self, notification: api.Notification) -> None:
        # delivered from the loop, never re-entrantly from inside a reader or command
        if self._mp_control is not None:
            self._mp_control.append(notification)  # MP read in progress: one callback, in order
        else:
            self._subscribers.emit(self._loop, notification)

    def _dispatch_all(self, notifications: list[api.Notification]) -> None:
        for notification in notifications:
            self._subscribers.deliver(notification)

    def _floated(self, peer: Peer, addr: tuple[Any, ...]) -> None:
        """An authenticated packet came from a new address: the peer moves there."""
        peer.raw_ip = addr[0]
        peer.raw_port = addr[1]
        peer.send_addr = addr
        peer.remote = api.normalize_address(addr)
        if peer.shared is None:  # P2P: the kernel filter lets the new address through from now on
            strangers.follow(peer)
        log.info("userspace data channel: peer %d floated to %s:%d", peer.peer_id, *peer.remote)
        self._emit(api.PeerFloated(peer.peer_id, peer.remote))

    def _key_exhausted(self, peer: Peer, ks: KeyState) -> None:
        keys = peer.keys
        for i in (0, 1):
            if keys[i] is ks:
                keys[i] = None
                log.warning(
                    "userspace data channel: killing key %d of peer %d (packet ids exhausted)",
                    ks.key_id,
                    peer.peer_id,
                )
                self._emit(api.KeyExhausted(peer.peer_id, ks.key_id))

    # ---------------------------------------------------- implemented by the concern mixins

    def _remove_peer(self, peer: Peer, reason: api.PeerDelReason) -> None:
        """Delete a peer and report it (backend)."""
        raise NotImplementedError

    def _rx_data(self, peer: Peer, pkt: memoryview, now: float, late: bool = False) -> bool:
        """Decrypt one data packet and write it to the TUN (udp)."""
        raise NotImplementedError

    def _send_data(self, peer: Peer, packets: list[bytes], now: float) -> None:
        """Send sealed data packets over the peer's transport (udp)."""
        raise NotImplementedError

    def _tcp_queue(self, peer: Peer, frames: bytes, *, control: bool) -> bool:
        """Queue whole frames on a TCP stream (tcp)."""
        raise NotImplementedError

    def _mp_udp_read(
        self, shared: SharedUdp, sock: socket.socket, now: float, batch: int, lane: bool = False
    ) -> None:
        """Read a shared MP socket or its keepalive lane (multipoint)."""
        raise NotImplementedError
