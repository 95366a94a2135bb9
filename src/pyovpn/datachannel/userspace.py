"""The userspace data channel: an asyncio data plane that behaves like the kernel ``ovpn`` driver.

It implements :class:`pyovpn.datachannel.api.DataChannel` on a TUN device and the
transport socket the control plane hands over in ``NewPeer``. From then on this
module owns the socket's receive side: DATA_V2/DATA_V1 packets are decrypted here and
written to the TUN, everything else goes up as a ``ControlPacket`` notification, and
IP packets read from the TUN are encrypted with the primary key and sent to the peer.
Behaviour follows OPENVPN-PROTOCOL.md §7.3-7.4 (key slots, float, keepalive, peer
deletion reasons, key exhaustion).

Differences from the kernel, on purpose: DATA_V1 is accepted (interop with peers that
have no peer-id) and TCP keeps a bounded output buffer instead of a single in-flight
frame. One backend instance drives one interface, because the commands carry no
interface index.

Multipoint (``IfaceMode.MP``, a P2MP server), as the kernel's MP mode (§7.3):

* every peer has a VPN_IPV4 and/or VPN_IPV6 (``NewPeer`` without one fails, and an
  address another peer holds is refused); a peer id that exists is refused too;
* UDP peers share one socket: the same socket (the same fd, or any duplicate of it) may
  be passed in many ``NewPeer`` calls. The first one takes it over and starts the one
  reader; it stays open (our duplicate, reference-counted) until its last peer is
  deleted, and the caller's descriptor gets its blocking mode back then. TCP peers each
  bring their own connected socket, as in P2P;
* incoming DATA_V2 goes to the peer named by its peer-id (that peer must use this
  socket), peer-id 0xFFFFFF and DATA_V1 to the peer whose remote is the source address;
  anything else is dropped and counted in ``iface_stats`` (``rx_unknown_peer``);
* **every non-data packet on the shared socket goes up as** ``ControlPacket``, with the
  peer id of the peer whose remote is the source address, or ``UNDEF_PEER_ID``
  (0xFFFFFF, as the kernel backend reports it) when no peer has that address. So once
  the first peer has handed the socket over, the server edge must stop reading it and
  takes new clients' handshakes from these notifications; it answers a source without
  a peer with a plain ``sendto()`` on its own descriptor (``SendControl`` needs a peer;
  sending on the socket stays fine, only reading moved here);
* an IP packet read from the TUN goes to the peer whose VPN address is its destination,
  else, like the kernel's ``ovpn_peer_get_by_dst``, to the peer whose VPN address is the
  gateway of the longest route through the TUN that covers the destination. iroutes are
  therefore ordinary system routes: ``ip route add 10.55.0.0/24 via <client VPN IP> dev
  <tun>``. The backend mirrors those routes from rtnetlink (see
  :mod:`pyovpn.datachannel.routing`). No peer: the packet is dropped and counted in
  ``iface_stats`` (``tx_dropped_no_peer``). Packets for one peer are sent as one batch
  (UDP GSO as in P2P);
* a decrypted packet is written to the TUN only if that same lookup for its source
  address names the peer it came from (the kernel's ``ovpn_peer_check_by_src``); else it
  is dropped and counted in that peer's stats (``rx_dropped_src``);
* keys, keepalive, stats and float are per peer; a float re-indexes the peer's address.
* when the shared socket was bound with ``SO_REUSEPORT``, a second socket joins it as the
  keepalive lane (:mod:`pyovpn.datachannel.keepalive_lane`): the kernel steers the datagrams
  that can only be pings there, and the keepalive timer drains it at most ``_LANE_MAX_DELAY``
  late, so a thousand idle clients do not wake the loop a hundred times a second.

Unlike the ovpn device, the backend does not switch off ICMP redirects on the TUN
(``net.ipv4.conf.*.send_redirects``), so a server forwarding between clients may send them
redirects; they are harmless on a point-to-point link.

Batching: each reader wakeup drains its descriptor (up to a cap so one busy socket
cannot starve the loop). UDP receive enables UDP_GRO when the kernel offers it and
splits coalesced datagrams by the gso_size control message; UDP send groups runs of
equal-size packets into one ``sendmsg`` with UDP_SEGMENT (GSO) and falls back to one
``sendto`` per packet if the socket or route refuses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import heapq
import ipaddress
import itertools
import logging
import math
import os
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any

from pyovpn.datachannel.api import (
    Address,
    Capabilities,
    Command,
    ControlPacket,
    DelIface,
    DelKey,
    DelPeer,
    GetKey,
    GetPeer,
    IfaceMode,
    KeyExhausted,
    KeyInfo,
    KeySlot,
    NewIface,
    NewKey,
    NewPeer,
    Notification,
    PeerDeleted,
    PeerDelReason,
    PeerFloated,
    PeerInfo,
    SendControl,
    SetPeer,
    Stats,
    SwapKeys,
    Transport,
)
from pyovpn.datachannel.api import normalize_address as _normalize
from pyovpn.datachannel.crypto import DEFAULT_REPLAY_WINDOW, PING_MAGIC, KeyState, PacketIdExhaustedError
from pyovpn.datachannel.keepalive_lane import close_lane, open_lane
from pyovpn.datachannel.routing import AddressInUseError, PeerRouter, RouteMonitor
from pyovpn.datachannel.validate import (
    check_keepalive,
    check_new_key,
    check_new_peer_transport,
    check_set_peer_keepalive,
    check_slot,
)
from pyovpn.errors import AuthenticationError, BackendError, ProtocolError, ReplayError
from pyovpn.net import tun
from pyovpn.net.sockets import (
    SOL_UDP,
    TCP_DISCONNECT_ERRNOS,
    TRANSIENT_SEND_ERRNOS,
    UDP_GRO,
    UDP_SEGMENT,
    scope_index,
    socket_key,
)
from pyovpn.proto.packets import OPCODE_DATA_V1, OPCODE_DATA_V2, UNDEF_PEER_ID

__all__ = ["UserspaceDataChannel"]

log = logging.getLogger(__name__)

_GSO_MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS on older kernels; newer ones allow more
_GSO_MAX_BYTES = 65000  # stay below the 64 KiB IP datagram limit with headers
_GSO_SIZE = struct.Struct("=H")  # the UDP_SEGMENT cmsg is a native u16
_FRAME_LEN = struct.Struct(">H")  # TCP framing: u16 length || packet
_GRO_CMSG_SPACE = socket.CMSG_SPACE(4)
_RX_BUF_SIZE = 65536
_RX_BATCH = 256  # datagrams or TUN packets per wakeup before letting other callbacks run
# Keepalive runs on one timer for all peers, firing on multiples of this many seconds: a
# thousand clients pinging every 10 s cost four wakeups a second instead of a hundred. A
# ping or an expiry is at most this late (OpenVPN's own timers have a 1 s granularity).
_KA_QUANTUM = 0.25
# MP: pings on the keepalive lane wait at most this long (the keepalive timer drains the lane
# first, so a waiting ping still counts before its peer could expire)
_LANE_MAX_DELAY = 1.0
_LANE_BATCH = 4096
_TCP_RX_CHUNK = 262144
_TCP_RX_READS = 16
_TCP_TX_HIGH_WATER = 1 << 20  # drop data (never control) frames above this backlog


class _Iface:
    __slots__ = ("fd", "mode", "monitor", "mtu", "name", "peer", "requested_name", "router")

    def __init__(self, name: str, requested_name: str, fd: int, mode: IfaceMode, mtu: int) -> None:
        self.name = name
        self.requested_name = requested_name
        self.fd = fd
        self.mode = mode
        self.mtu = mtu
        self.peer: _Peer | None = None
        self.router: PeerRouter[_Peer] | None = None  # MP only: VPN IPs and routes -> peer
        self.monitor: RouteMonitor | None = None  # MP only: keeps the router's routes current


class _Peer:
    __slots__ = (
        "fd",
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
        "peer_id",
        "raw_ip",
        "raw_port",
        "remote",
        "send_addr",
        "shared",
        "sock",
        "stats",
        "tcp_rx",
        "tcp_tx",
        "tcp_writer",
        "transport",
        "tx_peer_id",
    )

    def __init__(
        self, peer_id: int, tx_peer_id: int, sock: socket.socket, transport: Transport, iface: _Iface
    ):
        self.peer_id = peer_id
        self.tx_peer_id = tx_peer_id
        self.sock = sock
        self.fd = sock.fileno()
        self.transport = transport
        self.iface = iface
        self.keys: list[KeyState | None] = [None, None]  # [primary, secondary]
        self.stats = Stats()
        self.remote: Address | None = None
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
        self.shared: _SharedUdp | None = None  # MP UDP: the socket this peer shares


class _SharedUdp:
    """MP: our duplicate of the UDP socket the UDP peers share; one reader, closed with its last peer."""

    __slots__ = ("by_addr", "fd", "gro", "gso", "key", "lane", "orig_blocking", "peers", "shadowed", "sock")

    def __init__(self, key: tuple[int, int], sock: socket.socket) -> None:
        self.key = key
        self.sock = sock
        self.fd = sock.fileno()
        self.lane: socket.socket | None = None  # keepalive pings only, drained by the keepalive timer
        self.gro = False
        self.gso = False
        self.orig_blocking = True
        self.peers: set[_Peer] = set()
        self.by_addr: dict[tuple[str | None, int], _Peer] = {}  # (raw_ip, raw_port) -> peer
        # rare: several peers at one address; the newest is indexed, the others wait here
        self.shadowed: dict[tuple[str | None, int], list[_Peer]] = {}

    def attach(self, peer: _Peer) -> None:
        self.peers.add(peer)
        self._index(peer, (peer.raw_ip, peer.raw_port))

    def detach(self, peer: _Peer) -> None:
        self.peers.discard(peer)
        self._unindex(peer, (peer.raw_ip, peer.raw_port))

    def move(self, peer: _Peer, old: tuple[str | None, int]) -> None:
        """The peer's remote changed (float or SetPeer): index it under the new address."""
        new = (peer.raw_ip, peer.raw_port)
        if new != old:
            self._unindex(peer, old)
            self._index(peer, new)

    def _index(self, peer: _Peer, addr: tuple[str | None, int]) -> None:
        other = self.by_addr.get(addr)
        if other is not None and other is not peer:
            self.shadowed.setdefault(addr, []).append(other)
        self.by_addr[addr] = peer

    def _unindex(self, peer: _Peer, addr: tuple[str | None, int]) -> None:
        waiting = self.shadowed.get(addr)
        if self.by_addr.get(addr) is not peer:
            if waiting and peer in waiting:
                waiting.remove(peer)
            return
        del self.by_addr[addr]
        while waiting:  # the next peer still at this address takes over
            other = waiting.pop()
            if other in self.peers and (other.raw_ip, other.raw_port) == addr:
                self.by_addr[addr] = other
                break
        if not waiting:
            self.shadowed.pop(addr, None)


def _count(stats: Stats, name: str, n: int = 1) -> None:
    stats.extra[name] = stats.extra.get(name, 0) + n


class UserspaceDataChannel:
    """The :class:`~pyovpn.datachannel.api.DataChannel` backend in userspace (asyncio, TUN)."""

    name = "userspace"
    capabilities = Capabilities(mp=True, tcp_backlog=True, stats=True, gso=True, lane=True, hooks=True)

    def __init__(
        self,
        *,
        replay_window: int = DEFAULT_REPLAY_WINDOW,
        udp_gso: bool = True,
        udp_gro: bool = True,
        tcp_tx_high_water: int = _TCP_TX_HIGH_WATER,
    ) -> None:
        if not 1 <= replay_window <= 65536:
            raise BackendError(f"replay window must be 1..65536 packets, got {replay_window}")
        self._replay_window = replay_window
        self._want_gso = udp_gso
        self._want_gro = udp_gro
        self._tcp_high_water = tcp_tx_high_water
        self._loop: asyncio.AbstractEventLoop | None = None
        self._iface: _Iface | None = None
        self._peers: dict[int, _Peer] = {}
        self._shared: dict[tuple[int, int], _SharedUdp] = {}  # MP: shared UDP sockets by identity
        # keepalive: (due, tiebreak, peer), stale once peer.ka_due differs
        self._ka_heap: list[tuple[float, int, _Peer]] = []
        self._ka_seq = itertools.count()
        self._ka_timer: asyncio.TimerHandle | None = None
        self._ka_timer_at = 0.0
        self._subscribers: list[Callable[[Notification], None]] = []
        self._closed = False
        self._rx_buf = bytearray(_RX_BUF_SIZE)
        self._rx_mv = memoryview(self._rx_buf)
        self._tun_buf = bytearray(_RX_BUF_SIZE)
        self._tun_mv = memoryview(self._tun_buf)
        self.iface_stats = Stats()  # drops that happen before a peer is known
        self._mp_control: list[Notification] | None = None  # MP: control packets of this wakeup

    # ------------------------------------------------------------------ public API

    @property
    def ifname(self) -> str | None:
        """The TUN interface's actual name (the kernel picks it for ``tun``/``tun%d``)."""
        return self._iface.name if self._iface else None

    def subscribe(self, callback: Callable[[Notification], None]) -> None:
        self._subscribers.append(callback)

    def peer_stats(self, peer_id: int) -> Stats:
        """The live counters of a peer, including drop reasons ``PeerInfo`` does not carry."""
        return self._peer("GetPeer", peer_id).stats

    async def debug(self, peer_id: int, what: str, **kw: Any) -> Any:
        """Test hooks on a peer's primary key, as the engine has (``Capabilities.hooks``)."""
        peer = self._peer("debug", peer_id)
        ks = peer.keys[0]
        if ks is None:
            raise BackendError(f"debug: peer {peer_id} has no primary key")
        if what == "set_tx_pid":
            ks.tx_packet_id = kw["value"]
            return None
        if what == "encrypt":
            return ks.encrypt(kw["payload"], peer.tx_peer_id)
        raise BackendError(f"debug: unknown hook {what!r}")

    async def request(self, command: Command) -> PeerInfo | KeyInfo | None:
        what = type(command).__name__
        if self._closed:
            raise BackendError(f"{what}: the userspace backend is closed")
        self._loop = asyncio.get_running_loop()
        handler = self._handlers.get(type(command))
        if handler is None:
            raise BackendError(f"{what}: not a data-channel command")
        if isinstance(command, NewIface):
            return await self._new_iface(command)
        return handler(self, command)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for peer in list(self._peers.values()):
            self._drop_peer(peer)
        self._peers.clear()
        if self._ka_timer is not None:
            self._ka_timer.cancel()
            self._ka_timer = None
        self._ka_heap.clear()
        if self._iface is not None:
            self._close_iface(self._iface)
            self._iface = None

    # ------------------------------------------------------------------ commands

    async def _new_iface(self, cmd: NewIface) -> None:
        if self._iface is not None:
            raise BackendError(
                f"NewIface: this backend already drives {self._iface.name}; use one backend per interface"
            )
        if cmd.mode not in (IfaceMode.P2P, IfaceMode.MP):
            raise BackendError(f"NewIface: unknown interface mode {cmd.mode!r}")
        if not 68 <= cmd.mtu <= 65535:
            raise BackendError(f"NewIface: MTU {cmd.mtu} out of range 68..65535")
        try:
            fd, ifname = tun.open_tun(cmd.name or None)
        except BackendError as e:
            raise BackendError(f"NewIface: {e}") from None
        try:
            await asyncio.to_thread(tun.configure_link, ifname, cmd.mtu, True)
        except BaseException as e:
            os.close(fd)
            if isinstance(e, BackendError):
                raise BackendError(f"NewIface: {e}") from None
            raise
        if self._closed:  # close() ran while we were configuring
            os.close(fd)
            raise BackendError("NewIface: the userspace backend is closed")
        iface = _Iface(ifname, cmd.name, fd, cmd.mode, cmd.mtu)
        assert self._loop is not None
        if cmd.mode is IfaceMode.MP:
            try:
                # in the loop's thread: the index and the netlink socket belong to its namespace
                iface.router = PeerRouter()
                iface.monitor = RouteMonitor(self._loop, socket.if_nametoindex(ifname), iface.router)
            except OSError as e:
                os.close(fd)
                raise BackendError(
                    f"NewIface: cannot watch the routes through {ifname}: {e.strerror or e}"
                ) from None
        self._iface = iface
        reader = self._on_mp_tun_readable if iface.router is not None else self._on_tun_readable
        self._loop.add_reader(fd, reader, iface)
        log.info("userspace data channel: created %s (%s, mtu %d)", ifname, cmd.mode.name, cmd.mtu)

    def _del_iface(self, cmd: DelIface) -> None:
        iface = self._iface
        if iface is None or cmd.name not in (iface.name, iface.requested_name):
            raise BackendError(f"DelIface: no interface named {cmd.name!r}")
        # like deleting an ovpn link: all its peers go with reason TEARDOWN
        for peer in [p for p in self._peers.values() if p.iface is iface]:
            self._remove_peer(peer, PeerDelReason.TEARDOWN)
        self._close_iface(iface)
        self._iface = None

    def _new_peer(self, cmd: NewPeer) -> None:
        what = "NewPeer"
        iface = self._iface
        if iface is None:
            raise BackendError(f"{what}: no interface; send NewIface first")
        if not 0 <= cmd.peer_id < UNDEF_PEER_ID:
            raise BackendError(f"{what}: peer id {cmd.peer_id} out of range 0..0xFFFFFE")
        tx_id = cmd.peer_id if cmd.tx_peer_id is None else cmd.tx_peer_id
        if not 0 <= tx_id <= UNDEF_PEER_ID:
            raise BackendError(f"{what}: tx peer id {tx_id} out of range 0..0xFFFFFF")
        if iface.router is None and (cmd.vpn_ipv4 is not None or cmd.vpn_ipv6 is not None):
            raise BackendError(f"{what}: VPN IPs are not allowed in P2P mode (the kernel rejects them too)")
        check_keepalive(what, cmd.keepalive_interval, cmd.keepalive_timeout)
        check_new_peer_transport(cmd)
        if cmd.transport is Transport.TCP and cmd.local_ip is not None:
            raise BackendError(f"{what}: local_ip applies to UDP peers only")
        if iface.router is not None:
            self._new_mp_peer(what, cmd, tx_id, iface, iface.router)
            return
        try:
            sock = socket.socket(fileno=os.dup(cmd.socket_fd))
        except OSError as e:
            raise BackendError(
                f"{what}: socket fd {cmd.socket_fd} is not usable: {e.strerror or e}"
            ) from None
        try:
            peer = self._check_socket(what, cmd, sock, tx_id, iface)
        except BaseException:
            sock.close()
            raise
        # P2P has exactly one peer: a new one replaces the old, as in the kernel. Remove it
        # before touching socket flags: it may share our socket and restores them on removal.
        for old in (iface.peer, self._peers.get(cmd.peer_id)):
            if old is not None:
                self._remove_peer(old, PeerDelReason.TEARDOWN)
        self._configure_socket(peer)
        self._peers[cmd.peer_id] = peer
        iface.peer = peer
        assert self._loop is not None
        if cmd.transport is Transport.UDP:
            self._loop.add_reader(peer.fd, self._on_udp_readable, peer)
        else:
            peer.tcp_rx += cmd.tcp_backlog
            self._loop.add_reader(peer.fd, self._on_tcp_readable, peer)
            if peer.tcp_rx:
                # frames read before the handover are processed in order, after this call returns
                self._loop.call_soon(self._tcp_process, peer)
        self._set_keepalive(peer, cmd.keepalive_interval, cmd.keepalive_timeout)
        log.info(
            "userspace data channel: peer %d over %s%s (gso=%s gro=%s)",
            cmd.peer_id,
            cmd.transport.value,
            f" to {peer.remote[0]}:{peer.remote[1]}" if peer.remote else "",
            peer.gso_max > 0,
            peer.gro,
        )

    def _new_mp_peer(
        self, what: str, cmd: NewPeer, tx_id: int, iface: _Iface, router: PeerRouter[_Peer]
    ) -> None:
        """MP: add one of many peers (see the module docstring); UDP peers share one socket."""
        if cmd.vpn_ipv4 is None and cmd.vpn_ipv6 is None:
            raise BackendError(f"{what}: an MP peer needs vpn_ipv4 or vpn_ipv6 (the kernel requires one too)")
        if cmd.peer_id in self._peers:
            raise BackendError(f"{what}: peer id {cmd.peer_id} already exists (delete it first)")
        try:
            key = socket_key(cmd.socket_fd)
        except OSError as e:
            raise BackendError(
                f"{what}: socket fd {cmd.socket_fd} is not usable: {e.strerror or e}"
            ) from None
        shared = self._shared.get(key) if cmd.transport is Transport.UDP else None
        if cmd.transport is Transport.TCP:
            for other in self._peers.values():
                if other.transport is Transport.TCP and socket_key(other.fd) == key:
                    raise BackendError(
                        f"{what}: the TCP socket already carries peer {other.peer_id}; "
                        "every TCP peer needs its own connection"
                    )
        if shared is not None:
            sock = shared.sock
        else:
            try:
                sock = socket.socket(fileno=os.dup(cmd.socket_fd))
            except OSError as e:
                raise BackendError(
                    f"{what}: socket fd {cmd.socket_fd} is not usable: {e.strerror or e}"
                ) from None
        try:
            peer = self._check_socket(what, cmd, sock, tx_id, iface)
            router.add_peer(peer, cmd.vpn_ipv4, cmd.vpn_ipv6)
        except BaseException as e:
            if shared is None:
                sock.close()
            if isinstance(e, AddressInUseError):
                raise BackendError(f"{what}: {e} by peer {e.owner.peer_id}") from None
            if isinstance(e, ValueError):
                raise BackendError(f"{what}: {e}") from None
            raise
        assert self._loop is not None
        if cmd.transport is Transport.TCP:
            self._configure_socket(peer)
            peer.tcp_rx += cmd.tcp_backlog
            self._loop.add_reader(peer.fd, self._on_tcp_readable, peer)
            if peer.tcp_rx:
                self._loop.call_soon(self._tcp_process, peer)
        elif shared is None:
            self._configure_socket(peer)  # the first peer sets the socket up for all of them
            shared = _SharedUdp(key, sock)
            shared.gro = peer.gro
            shared.gso = peer.gso_max > 0
            shared.orig_blocking = peer.orig_blocking
            self._shared[key] = shared
            self._loop.add_reader(shared.fd, self._on_mp_udp_readable, shared)
            shared.lane = open_lane(sock)
            if shared.lane is not None and self._ka_timer is None:
                self._ka_arm()  # the lane is drained even when no peer runs keepalive
        else:
            peer.gro = shared.gro
            peer.gso_max = 0x10000 if shared.gso else 0  # per peer: a path may refuse big segments
            peer.orig_blocking = shared.orig_blocking
        if shared is not None:
            peer.shared = shared
            shared.attach(peer)
        self._peers[cmd.peer_id] = peer
        self._set_keepalive(peer, cmd.keepalive_interval, cmd.keepalive_timeout)
        # debug: the server logs each client already; at thousands of clients this line is noise
        log.debug(
            "userspace data channel: MP peer %d (%s) over %s%s%s",
            cmd.peer_id,
            ", ".join(a for a in (cmd.vpn_ipv4, cmd.vpn_ipv6) if a),
            cmd.transport.value,
            f" from {peer.remote[0]}:{peer.remote[1]}" if peer.remote else "",
            f", sharing the socket with {len(shared.peers) - 1} more" if shared else "",
        )

    def _mp_detach(self, peer: _Peer, shared: _SharedUdp) -> None:
        """A UDP peer leaves its shared socket; the last one out closes our duplicate."""
        peer.shared = None
        shared.detach(peer)
        if shared.peers:
            return
        if self._shared.get(shared.key) is shared:
            del self._shared[shared.key]
        if shared.lane is not None:
            close_lane(shared.lane)
            shared.lane = None
        sock = shared.sock
        if sock.fileno() >= 0:
            if self._loop is not None:
                self._loop.remove_reader(shared.fd)
            # give the caller's socket back as we found it (flags are shared with our dup)
            if shared.gro:
                with contextlib.suppress(OSError):
                    sock.setsockopt(SOL_UDP, UDP_GRO, 0)
            with contextlib.suppress(OSError):
                os.set_blocking(shared.fd, shared.orig_blocking)
        sock.close()

    def mp_routes(self) -> list[tuple[str, str | None]]:
        """MP: the routes through the interface the backend follows, as ``(prefix, gateway)``.

        ``gateway`` is None for a route without one. Empty in P2P mode.
        """
        iface = self._iface
        if iface is None or iface.monitor is None:
            return []
        return iface.monitor.mirror.routes()

    def _check_socket(self, what: str, cmd: NewPeer, sock: socket.socket, tx_id: int, iface: _Iface) -> _Peer:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            raise BackendError(f"{what}: the socket is not an IPv4/IPv6 socket")
        want_type = socket.SOCK_DGRAM if cmd.transport is Transport.UDP else socket.SOCK_STREAM
        if sock.type != want_type:
            raise BackendError(f"{what}: the socket is not a {cmd.transport.value.upper()} socket")
        peer = _Peer(cmd.peer_id, tx_id, sock, cmd.transport, iface)
        if cmd.transport is Transport.TCP:
            try:
                sock.getpeername()
            except OSError:
                raise BackendError(f"{what}: the TCP socket is not connected") from None
        else:
            assert cmd.remote is not None
            self._set_remote(what, peer, cmd.remote)
        return peer

    def _configure_socket(self, peer: _Peer) -> None:
        sock = peer.sock
        # O_NONBLOCK lives on the shared file description: remember it to give it back
        peer.orig_blocking = os.get_blocking(peer.fd)
        sock.setblocking(False)
        if peer.transport is Transport.UDP:
            if self._want_gro:
                try:
                    sock.setsockopt(SOL_UDP, UDP_GRO, 1)
                    peer.gro = True
                except OSError:
                    peer.gro = False
            if self._want_gso:
                try:
                    sock.getsockopt(SOL_UDP, UDP_SEGMENT)
                    peer.gso_max = 0x10000
                except OSError:
                    peer.gso_max = 0

    def _set_remote(self, what: str, peer: _Peer, remote: Address) -> None:
        try:
            ip = ipaddress.ip_address(remote[0])
            port = int(remote[1])
        except (ValueError, TypeError, IndexError):
            raise BackendError(f"{what}: remote {remote!r} is not an (ip, port) pair") from None
        if not 1 <= port <= 65535:
            raise BackendError(f"{what}: remote port {port} out of range 1..65535")
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if peer.sock.family == socket.AF_INET:
            if ip.version != 4:
                raise BackendError(f"{what}: remote {ip} is IPv6 but the socket is IPv4")
            peer.raw_ip = str(ip)
            peer.send_addr = (peer.raw_ip, port)
        else:
            peer.raw_ip = f"::ffff:{ip}" if ip.version == 4 else str(ip)
            scope = ip.scope_id if isinstance(ip, ipaddress.IPv6Address) else None
            peer.send_addr = (peer.raw_ip.split("%")[0], port, 0, scope_index(scope))
        peer.raw_port = port
        peer.remote = (str(ip), port)

    def _set_peer(self, cmd: SetPeer) -> None:
        what = "SetPeer"
        peer = self._peer(what, cmd.peer_id)
        keepalive = check_set_peer_keepalive(cmd)
        if cmd.remote is not None:
            if peer.transport is Transport.TCP:
                raise BackendError(f"{what}: a TCP peer's remote cannot change")
            old = (peer.raw_ip, peer.raw_port)
            self._set_remote(what, peer, cmd.remote)
            if peer.shared is not None:
                peer.shared.move(peer, old)
        if keepalive:
            assert cmd.keepalive_interval is not None and cmd.keepalive_timeout is not None
            self._set_keepalive(peer, cmd.keepalive_interval, cmd.keepalive_timeout)

    def _get_peer(self, cmd: GetPeer) -> PeerInfo:
        peer = self._peer("GetPeer", cmd.peer_id)
        return peer.stats.peer_info(peer.peer_id, peer.remote, peer.ka_interval, peer.ka_timeout)

    def _del_peer(self, cmd: DelPeer) -> None:
        self._remove_peer(self._peer("DelPeer", cmd.peer_id), PeerDelReason.USERSPACE)

    def _new_key(self, cmd: NewKey) -> None:
        what = "NewKey"
        peer = self._peer(what, cmd.peer_id)
        slot, cipher = check_new_key(cmd)
        try:
            ks = KeyState.from_directions(
                cmd.key_id, cipher, cmd.encrypt, cmd.decrypt, replay_window=self._replay_window
            )
        except ValueError as e:
            raise BackendError(f"{what}: {e}") from None
        peer.keys[slot] = ks

    def _del_key(self, cmd: DelKey) -> None:
        peer = self._peer("DelKey", cmd.peer_id)
        # an empty slot is not an error, as in the kernel
        peer.keys[check_slot("DelKey", cmd.slot)] = None

    def _swap_keys(self, cmd: SwapKeys) -> None:
        peer = self._peer("SwapKeys", cmd.peer_id)
        keys = peer.keys
        keys[0], keys[1] = keys[1], keys[0]

    def _get_key(self, cmd: GetKey) -> KeyInfo:
        peer = self._peer("GetKey", cmd.peer_id)
        slot = check_slot("GetKey", cmd.slot)
        ks = peer.keys[slot]
        if ks is None:
            raise BackendError(
                f"GetKey: peer {cmd.peer_id} has no key in the {KeySlot(slot).name.lower()} slot"
            )
        return KeyInfo(peer_id=peer.peer_id, slot=KeySlot(slot), key_id=ks.key_id, cipher=ks.cipher)

    def _send_control(self, cmd: SendControl) -> None:
        what = "SendControl"
        peer = self._peer(what, cmd.peer_id)
        packet = cmd.packet
        if not packet:
            raise BackendError(f"{what}: empty packet")
        if peer.transport is Transport.TCP:
            if len(packet) > 0xFFFF:
                raise BackendError(f"{what}: {len(packet)} bytes do not fit a TCP frame (max 65535)")
            self._tcp_queue(peer, _FRAME_LEN.pack(len(packet)) + packet, control=True)
            return
        try:
            peer.sock.sendto(packet, peer.send_addr)
        except OSError as e:
            if e.errno in TRANSIENT_SEND_ERRNOS:
                # UDP is lossy anyway; the reliability layer retransmits
                _count(peer.stats, "control_tx_dropped")
                return
            raise BackendError(f"{what}: send to {peer.remote} failed: {e.strerror or e}") from None

    _handlers: dict[type, Callable[[UserspaceDataChannel, Any], PeerInfo | KeyInfo | None]] = {
        NewIface: lambda self, cmd: None,  # async, dispatched in request()
        DelIface: _del_iface,
        NewPeer: _new_peer,
        SetPeer: _set_peer,
        GetPeer: _get_peer,
        DelPeer: _del_peer,
        NewKey: _new_key,
        DelKey: _del_key,
        SwapKeys: _swap_keys,
        GetKey: _get_key,
        SendControl: _send_control,
    }

    # ------------------------------------------------------------------ helpers

    def _peer(self, what: str, peer_id: int) -> _Peer:
        peer = self._peers.get(peer_id)
        if peer is None:
            raise BackendError(f"{what}: unknown peer id {peer_id}")
        return peer

    def _emit(self, notification: Notification) -> None:
        # delivered from the loop, never re-entrantly from inside a reader or command
        if self._mp_control is not None:
            self._mp_control.append(notification)  # MP read in progress: one callback, in order
        elif self._loop is not None and self._subscribers:
            self._loop.call_soon(self._dispatch, notification)

    def _dispatch_all(self, notifications: list[Notification]) -> None:
        for notification in notifications:
            self._dispatch(notification)

    def _dispatch(self, notification: Notification) -> None:
        for callback in self._subscribers:
            try:
                callback(notification)
            except Exception:
                log.exception("data-channel notification callback failed for %r", notification)

    def _close_iface(self, iface: _Iface) -> None:
        if self._loop is not None:
            self._loop.remove_reader(iface.fd)
        with contextlib.suppress(OSError):
            os.close(iface.fd)  # a non-persistent TUN disappears with its last descriptor
        iface.peer = None
        if iface.monitor is not None:
            iface.monitor.close()
            iface.monitor = None

    def _remove_peer(self, peer: _Peer, reason: PeerDelReason) -> None:
        if self._peers.get(peer.peer_id) is not peer:
            return
        del self._peers[peer.peer_id]
        if peer.iface.peer is peer:
            peer.iface.peer = None
        if peer.transport is Transport.TCP and peer.tcp_tx and reason is PeerDelReason.USERSPACE:
            # best effort: a control frame queued just before DelPeer (e.g. EXIT) should leave
            with contextlib.suppress(OSError):
                peer.sock.send(peer.tcp_tx)
        self._drop_peer(peer)
        log.info("userspace data channel: peer %d deleted (%s)", peer.peer_id, reason.name)
        self._emit(PeerDeleted(peer.peer_id, reason))

    def _drop_peer(self, peer: _Peer) -> None:
        peer.ka_due = None  # its heap entry is skipped from now on
        if peer.iface.router is not None:
            peer.iface.router.remove_peer(peer)  # MP: its VPN IPs lead nowhere from now on
        if peer.shared is not None:
            self._mp_detach(peer, peer.shared)  # MP UDP: the socket stays while others use it
            peer.keys = [None, None]
            return
        if self._loop is not None and peer.sock.fileno() >= 0:
            self._loop.remove_reader(peer.fd)
            if peer.tcp_writer:
                self._loop.remove_writer(peer.fd)
                peer.tcp_writer = False
        # give the caller's socket back as we found it (flags are shared with our dup)
        if peer.sock.fileno() >= 0:
            if peer.gro:
                with contextlib.suppress(OSError):
                    peer.sock.setsockopt(SOL_UDP, UDP_GRO, 0)
            with contextlib.suppress(OSError):
                os.set_blocking(peer.fd, peer.orig_blocking)
        peer.sock.close()
        peer.keys = [None, None]

    # ------------------------------------------------------------------ keepalive

    def _set_keepalive(self, peer: _Peer, interval: int, timeout: int) -> None:
        assert self._loop is not None
        peer.ka_interval = interval
        peer.ka_timeout = timeout
        now = self._loop.time()
        peer.last_rx = peer.last_tx = now  # as the kernel: both timers restart when set
        peer.ka_due = None
        if interval and timeout:  # the kernel only runs keepalive with both set
            self._ka_schedule(peer, now + min(interval, timeout))

    def _ka_schedule(self, peer: _Peer, due: float) -> None:
        peer.ka_due = due
        heapq.heappush(self._ka_heap, (due, next(self._ka_seq), peer))
        if self._ka_timer is None or due < self._ka_timer_at:
            self._ka_arm()

    def _ka_arm(self) -> None:
        """Point the keepalive timer at the end of the quantum holding the earliest live deadline."""
        assert self._loop is not None
        heap = self._ka_heap
        while heap and heap[0][2].ka_due != heap[0][0]:
            heapq.heappop(heap)  # stale: the peer was rescheduled or removed
        lane_due = self._loop.time() + _LANE_MAX_DELAY if any(s.lane for s in self._shared.values()) else None
        if not heap and lane_due is None:
            return
        due = heap[0][0] if heap else math.inf
        if lane_due is not None:
            due = min(due, lane_due)
        fire = math.ceil(due / _KA_QUANTUM) * _KA_QUANTUM
        if self._ka_timer is not None:
            if fire >= self._ka_timer_at:
                return
            self._ka_timer.cancel()
        self._ka_timer_at = fire
        self._ka_timer = self._loop.call_at(fire, self._ka_tick)

    def _ka_tick(self) -> None:
        """The keepalive timer: check every peer whose deadline falls in the quantum that ended."""
        assert self._loop is not None
        self._ka_timer = None
        until = self._ka_timer_at
        now = max(self._loop.time(), until)
        for shared in list(self._shared.values()):
            if shared.lane is not None:
                self._drain_lane(shared, now)  # first, so no peer expires with its ping still queued
        heap = self._ka_heap
        while heap and heap[0][0] <= until:
            due, _, peer = heapq.heappop(heap)
            if peer.ka_due != due:
                continue  # rescheduled or removed since
            peer.ka_due = None
            try:
                self._keepalive(peer, now)
            except Exception:
                log.exception("userspace data channel: keepalive of peer %d failed", peer.peer_id)
        self._ka_arm()

    def _drain_lane(self, shared: _SharedUdp, now: float) -> None:
        assert shared.lane is not None
        self._mp_udp_read(shared, shared.lane, now, _LANE_BATCH, lane=True)

    def _keepalive(self, peer: _Peer, now: float) -> None:
        if self._peers.get(peer.peer_id) is not peer or not (peer.ka_interval and peer.ka_timeout):
            return
        rx_deadline = peer.last_rx + peer.ka_timeout
        if now >= rx_deadline:
            self._remove_peer(peer, PeerDelReason.EXPIRED)
            return
        if now >= peer.last_tx + peer.ka_interval:
            self._send_ping(peer, now)
            if self._peers.get(peer.peer_id) is not peer:
                return  # the send failed fatally (TCP)
            # a ping lost to a full socket must not make us spin: try again next interval
            peer.last_tx = max(peer.last_tx, now)
        tx_deadline = peer.last_tx + peer.ka_interval
        self._ka_schedule(peer, min(rx_deadline, tx_deadline))

    def _send_ping(self, peer: _Peer, now: float) -> None:
        ks = peer.keys[0]
        if ks is None:
            return
        try:
            packet = ks.encrypt(PING_MAGIC, peer.tx_peer_id)
        except PacketIdExhaustedError:
            self._key_exhausted(peer, ks)
            return
        _count(peer.stats, "keepalive_tx")
        self._send_data(peer, [packet], now)

    def _key_exhausted(self, peer: _Peer, ks: KeyState) -> None:
        keys = peer.keys
        for i in (0, 1):
            if keys[i] is ks:
                keys[i] = None
                log.warning(
                    "userspace data channel: killing key %d of peer %d (packet ids exhausted)",
                    ks.key_id,
                    peer.peer_id,
                )
                self._emit(KeyExhausted(peer.peer_id, ks.key_id))

    # ------------------------------------------------------------------ TUN -> network

    def _on_tun_readable(self, iface: _Iface) -> None:
        fd = iface.fd
        buf = [self._tun_buf]
        mv = self._tun_mv
        readv = os.readv
        peer = iface.peer
        ks = peer.keys[0] if peer is not None else None
        tx_id = peer.tx_peer_id if peer is not None else 0
        out: list[bytes] = []
        vpn_bytes = 0
        dropped = 0
        for _ in range(_RX_BATCH):
            try:
                n = readv(fd, buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                log.warning("userspace data channel: reading %s failed: %s", iface.name, e)
                break
            if ks is None:
                dropped += 1
                continue
            try:
                out.append(ks.encrypt(mv[:n], tx_id))
            except PacketIdExhaustedError:
                assert peer is not None
                self._key_exhausted(peer, ks)
                ks = None
                dropped += 1
                continue
            vpn_bytes += n
        if dropped:
            _count(peer.stats if peer is not None else self.iface_stats, "tx_dropped_no_key", dropped)
        if out:
            assert peer is not None and self._loop is not None
            st = peer.stats
            st.vpn_tx_packets += len(out)
            st.vpn_tx_bytes += vpn_bytes
            self._send_data(peer, out, self._loop.time())

    def _send_data(self, peer: _Peer, packets: list[bytes], now: float) -> None:
        if peer.transport is Transport.TCP:
            pack = _FRAME_LEN.pack
            frames = b"".join([b for p in packets for b in (pack(len(p)), p)])
            if self._tcp_queue(peer, frames, control=False):
                st = peer.stats
                st.link_tx_packets += len(packets)
                st.link_tx_bytes += len(frames) - 2 * len(packets)
                peer.last_tx = now
            return
        sent_packets, sent_bytes = self._udp_send(peer, packets)
        if sent_packets:
            st = peer.stats
            st.link_tx_packets += sent_packets
            st.link_tx_bytes += sent_bytes
            peer.last_tx = now

    def _udp_send(self, peer: _Peer, packets: list[bytes]) -> tuple[int, int]:
        sock = peer.sock
        addr = peer.send_addr
        total = len(packets)
        sent_packets = sent_bytes = 0
        i = 0
        while i < total:
            size = len(packets[i])
            j = i + 1
            if size < peer.gso_max and total - i > 1:
                limit = min(total, i + _GSO_MAX_SEGMENTS, i + _GSO_MAX_BYTES // size)
                while j < limit and len(packets[j]) == size:
                    j += 1
                if j < limit and len(packets[j]) < size:
                    j += 1  # GSO allows one shorter segment at the end of a train
            if j - i > 1:
                train = packets[i:j]
                try:
                    sock.sendmsg(train, [(SOL_UDP, UDP_SEGMENT, _GSO_SIZE.pack(size))], 0, addr)
                    sent_packets += j - i
                    sent_bytes += sum(map(len, train))
                    _count(peer.stats, "gso_sends")
                    i = j
                    continue
                except OSError as e:
                    if e.errno in (errno.EAGAIN, errno.ENOBUFS):
                        _count(peer.stats, "tx_dropped", j - i)
                        i = j
                        continue
                    if e.errno in (errno.EINVAL, errno.EMSGSIZE):
                        # segments this big do not fit the path MTU: keep GSO for smaller ones
                        peer.gso_max = min(peer.gso_max, size)
                    else:
                        # the route or device cannot segment at all
                        peer.gso_max = 0
                    log.info(
                        "userspace data channel: UDP GSO off for peer %d at %d-byte segments: %s",
                        peer.peer_id,
                        size,
                        e,
                    )
                    _count(peer.stats, "gso_fallbacks")
                    j = i + 1
            try:
                sock.sendto(packets[i], addr)
                sent_packets += 1
                sent_bytes += size
            except OSError as e:
                _count(peer.stats, "tx_dropped")
                if e.errno not in TRANSIENT_SEND_ERRNOS:
                    log.debug("userspace data channel: send to peer %d failed: %s", peer.peer_id, e)
            i += 1
        return sent_packets, sent_bytes

    # ------------------------------------------------------------------ MP data path

    def _on_mp_tun_readable(self, iface: _Iface) -> None:
        """MP TUN -> network: each packet goes to the peer its destination routes to."""
        router = iface.router
        assert router is not None and self._loop is not None
        fd = iface.fd
        buf = [self._tun_buf]
        mv = self._tun_mv
        readv = os.readv
        for_dst = router.for_dst
        batches: dict[_Peer, list[bytes]] = {}
        no_peer = 0
        for _ in range(_RX_BATCH):
            try:
                n = readv(fd, buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                log.warning("userspace data channel: reading %s failed: %s", iface.name, e)
                break
            pkt = mv[:n]
            peer = for_dst(pkt)
            if peer is None:
                no_peer += 1
                continue
            ks = peer.keys[0]
            if ks is None:
                _count(peer.stats, "tx_dropped_no_key")
                continue
            try:
                sealed = ks.encrypt(pkt, peer.tx_peer_id)
            except PacketIdExhaustedError:
                self._key_exhausted(peer, ks)
                _count(peer.stats, "tx_dropped_no_key")
                continue
            peer.stats.vpn_tx_bytes += n
            batch = batches.get(peer)
            if batch is None:
                batches[peer] = [sealed]
            else:
                batch.append(sealed)
        if no_peer:
            _count(self.iface_stats, "tx_dropped_no_peer", no_peer)
        if batches:
            now = self._loop.time()
            for peer, out in batches.items():
                if self._peers.get(peer.peer_id) is not peer:
                    continue  # a TCP send failure above removed it
                peer.stats.vpn_tx_packets += len(out)
                self._send_data(peer, out, now)

    def _on_mp_udp_readable(self, shared: _SharedUdp) -> None:
        """MP network -> TUN: the one reader of the UDP socket all UDP peers share.

        The notifications of one wakeup (mostly control packets) go up in order in one loop callback.
        """
        self._mp_control = []
        try:
            assert self._loop is not None
            self._mp_udp_read(shared, shared.sock, self._loop.time(), _RX_BATCH)
        finally:
            batch, self._mp_control = self._mp_control, None
            if batch and self._loop is not None and self._subscribers:
                self._loop.call_soon(self._dispatch_all, batch)

    def _mp_udp_read(
        self, shared: _SharedUdp, sock: socket.socket, now: float, batch: int, lane: bool = False
    ) -> None:
        """Read the shared socket (or its keepalive lane, whose packets may have waited)."""
        rx = self._rx_buf
        mv = self._rx_mv
        gro = shared.gro and not lane
        for _ in range(batch):
            if self._shared.get(shared.key) is not shared:
                return
            try:
                if gro:
                    n, anc, _flags, addr = sock.recvmsg_into([rx], _GRO_CMSG_SPACE)
                else:
                    n, addr = sock.recvfrom_into(rx)
                    anc = None
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # ICMP errors queued on the socket (e.g. port unreachable) are reported once
                _count(self.iface_stats, "rx_errors")
                if e.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    continue
                what = "keepalive lane" if lane else "shared socket"
                log.debug("userspace data channel: receive on the %s failed: %s", what, e)
                return
            if lane:
                _count(self.iface_stats, "keepalive_lane_rx")
                self._mp_udp_packet(shared, mv[:n], addr, now, late=True)
                continue
            seg = 0
            if anc:
                for level, kind, data in anc:
                    if level == SOL_UDP and kind == UDP_GRO and len(data) >= 4:
                        seg = int.from_bytes(data[:4], sys.byteorder)
            if seg and seg < n:
                _count(self.iface_stats, "gro_batches")
                for off in range(0, n, seg):
                    self._mp_udp_packet(shared, mv[off : min(off + seg, n)], addr, now)
            else:
                self._mp_udp_packet(shared, mv[:n], addr, now)

    def _mp_udp_packet(
        self, shared: _SharedUdp, pkt: memoryview, addr: tuple[Any, ...], now: float, late: bool = False
    ) -> None:
        if not pkt:
            _count(self.iface_stats, "rx_empty")
            return
        opcode = pkt[0] >> 3
        peer: _Peer | None
        if opcode == OPCODE_DATA_V2:
            if len(pkt) < 4:
                self.iface_stats.dropped_other += 1
                return
            rx_id = (pkt[1] << 16) | (pkt[2] << 8) | pkt[3]
            if rx_id == UNDEF_PEER_ID:
                peer = shared.by_addr.get((addr[0], addr[1]))  # as the kernel: by source address
            else:
                peer = self._peers.get(rx_id)
                if peer is not None and peer.shared is not shared:
                    peer = None  # a TCP peer's id, or another socket's
        elif opcode == OPCODE_DATA_V1:
            peer = shared.by_addr.get((addr[0], addr[1]))
        else:
            peer = shared.by_addr.get((addr[0], addr[1]))
            # unknown source: UNDEF_PEER_ID, so the server edge sees new clients' handshakes
            owner = peer.peer_id if peer is not None else UNDEF_PEER_ID
            self._emit(ControlPacket(owner, bytes(pkt), _normalize(addr)))
            return
        if peer is None:
            _count(self.iface_stats, "rx_unknown_peer")
            return
        if self._rx_data(peer, pkt, now, late) and (addr[0] != peer.raw_ip or addr[1] != peer.raw_port):
            # float: an authenticated packet from a new address moves the peer there
            old = (peer.raw_ip, peer.raw_port)
            peer.raw_ip = addr[0]
            peer.raw_port = addr[1]
            peer.send_addr = addr
            peer.remote = _normalize(addr)
            shared.move(peer, old)
            log.info("userspace data channel: peer %d floated to %s:%d", peer.peer_id, *peer.remote)
            self._emit(PeerFloated(peer.peer_id, peer.remote))

    # ------------------------------------------------------------------ network -> TUN

    def _on_udp_readable(self, peer: _Peer) -> None:
        sock = peer.sock
        rx = self._rx_buf
        mv = self._rx_mv
        assert self._loop is not None
        now = self._loop.time()
        for _ in range(_RX_BATCH):
            if self._peers.get(peer.peer_id) is not peer:
                return
            try:
                if peer.gro:
                    n, anc, _flags, addr = sock.recvmsg_into([rx], _GRO_CMSG_SPACE)
                else:
                    n, addr = sock.recvfrom_into(rx)
                    anc = None
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # ICMP errors queued on the socket (e.g. port unreachable) are reported once
                _count(peer.stats, "rx_errors")
                if e.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    continue
                log.debug("userspace data channel: receive for peer %d failed: %s", peer.peer_id, e)
                return
            seg = 0
            if anc:
                for level, kind, data in anc:
                    if level == SOL_UDP and kind == UDP_GRO and len(data) >= 4:
                        seg = int.from_bytes(data[:4], sys.byteorder)  # a native int: gso_size
            if seg and seg < n:
                _count(peer.stats, "gro_batches")
                for off in range(0, n, seg):
                    self._udp_packet(peer, mv[off : min(off + seg, n)], addr, now)
            else:
                self._udp_packet(peer, mv[:n], addr, now)

    def _udp_packet(self, peer: _Peer, pkt: memoryview, addr: tuple[Any, ...], now: float) -> None:
        if not pkt:
            _count(peer.stats, "rx_empty")
            return
        opcode = pkt[0] >> 3
        if opcode == OPCODE_DATA_V2:
            if len(pkt) < 4:
                peer.stats.dropped_other += 1
                return
            rx_id = (pkt[1] << 16) | (pkt[2] << 8) | pkt[3]
            if rx_id != peer.peer_id and (
                rx_id != UNDEF_PEER_ID or addr[0] != peer.raw_ip or addr[1] != peer.raw_port
            ):
                # another peer-id, or an UNDEF one not from our remote: not our peer (kernel drops)
                _count(peer.stats, "rx_unknown_peer")
                return
        elif opcode != OPCODE_DATA_V1:
            self._emit(ControlPacket(peer.peer_id, bytes(pkt), _normalize(addr)))
            return
        if self._rx_data(peer, pkt, now) and (addr[0] != peer.raw_ip or addr[1] != peer.raw_port):
            # float: an authenticated packet from a new address moves the peer there
            peer.raw_ip = addr[0]
            peer.raw_port = addr[1]
            peer.send_addr = addr
            peer.remote = _normalize(addr)
            log.info("userspace data channel: peer %d floated to %s:%d", peer.peer_id, *peer.remote)
            self._emit(PeerFloated(peer.peer_id, peer.remote))

    def _rx_data(self, peer: _Peer, pkt: memoryview, now: float, late: bool = False) -> bool:
        """Decrypt one data packet and deliver it; True if it authenticated.

        ``late``: it waited on the keepalive lane, so newer data may have moved the replay window
        past it; an authenticated 40-byte packet is a ping, and a stale ping is dropped uncounted
        as a replay (counted as ``keepalive_late``): it would not have refreshed anything.
        """
        st = peer.stats
        st.link_rx_packets += 1
        st.link_rx_bytes += len(pkt)
        kid = pkt[0] & 7
        keys = peer.keys
        ks = keys[0]
        if ks is None or ks.key_id != kid:
            ks = keys[1]
            if ks is None or ks.key_id != kid:
                st.dropped_other += 1
                _count(st, "rx_no_key")
                return False
        try:
            plain = ks.decrypt(pkt)
        except AuthenticationError:
            st.dropped_auth += 1
            return False
        except ReplayError:
            if late:
                _count(st, "keepalive_late")
            else:
                st.dropped_replay += 1
            return False
        except ProtocolError:
            st.dropped_other += 1
            return False
        peer.last_rx = now
        size = len(plain)
        if size == 16 and plain == PING_MAGIC:
            _count(st, "keepalive_rx")
            return True
        if not size or (plain[0] >> 4) not in (4, 6):
            # not an IP packet (e.g. OCC): the kernel drops these too
            st.dropped_other += 1
            _count(st, "rx_not_ip")
            return True
        router = peer.iface.router
        if router is not None and router.for_src(plain) is not peer:
            # MP reverse-path check: the source must be this peer's VPN IP or behind its routes
            st.dropped_other += 1
            _count(st, "rx_dropped_src")
            return True
        try:
            os.write(peer.iface.fd, plain)
        except OSError:
            st.dropped_other += 1
            _count(st, "tun_write_errors")
            return True
        st.vpn_rx_packets += 1
        st.vpn_rx_bytes += size
        return True

    # ------------------------------------------------------------------ TCP framing

    def _on_tcp_readable(self, peer: _Peer) -> None:
        sock = peer.sock
        for _ in range(_TCP_RX_READS):
            try:
                data = sock.recv(_TCP_RX_CHUNK)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                reason = (
                    PeerDelReason.TRANSPORT_DISCONNECT
                    if e.errno in TCP_DISCONNECT_ERRNOS
                    else PeerDelReason.TRANSPORT_ERROR
                )
                log.info("userspace data channel: TCP peer %d: %s", peer.peer_id, e)
                self._remove_peer(peer, reason)
                return
            if not data:
                self._remove_peer(peer, PeerDelReason.TRANSPORT_DISCONNECT)
                return
            peer.tcp_rx += data
            if not self._tcp_process(peer):
                return
            if len(data) < _TCP_RX_CHUNK:
                break

    def _tcp_process(self, peer: _Peer) -> bool:
        """Handle every whole frame in the receive buffer; False if the peer was removed."""
        if self._peers.get(peer.peer_id) is not peer:
            return False
        assert self._loop is not None
        now = self._loop.time()
        buf = peer.tcp_rx
        end_all = len(buf)
        off = 0
        while end_all - off >= 2:
            size = (buf[off] << 8) | buf[off + 1]
            if size < 2:
                # the kernel's strparser refuses such frames and aborts the stream
                log.info("userspace data channel: TCP peer %d sent a %d-byte frame", peer.peer_id, size)
                self._remove_peer(peer, PeerDelReason.TRANSPORT_ERROR)
                return False
            end = off + 2 + size
            if end > end_all:
                break
            # a copy, so the buffer can be trimmed below without live views into it
            pkt = buf[off + 2 : end]
            opcode = pkt[0] >> 3
            if opcode in (OPCODE_DATA_V2, OPCODE_DATA_V1):
                self._rx_data(peer, memoryview(pkt), now)
            else:
                self._emit(ControlPacket(peer.peer_id, bytes(pkt), None))
            off = end
        if off:
            del buf[:off]
        return True

    def _tcp_queue(self, peer: _Peer, frames: bytes, *, control: bool) -> bool:
        """Queue whole frames for the TCP stream; frames are never split between callers."""
        out = peer.tcp_tx
        if out:
            if not control and len(out) >= self._tcp_high_water:
                _count(peer.stats, "tx_dropped", 1)
                return False
            out += frames
            return True
        try:
            sent = peer.sock.send(frames)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as e:
            log.info("userspace data channel: TCP send to peer %d failed: %s", peer.peer_id, e)
            self._remove_peer(peer, PeerDelReason.TRANSPORT_ERROR)
            return False
        if sent < len(frames):
            out += memoryview(frames)[sent:]
            if not peer.tcp_writer:
                assert self._loop is not None
                self._loop.add_writer(peer.fd, self._on_tcp_writable, peer)
                peer.tcp_writer = True
        return True

    def _on_tcp_writable(self, peer: _Peer) -> None:
        out = peer.tcp_tx
        try:
            sent = peer.sock.send(out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.info("userspace data channel: TCP send to peer %d failed: %s", peer.peer_id, e)
            self._remove_peer(peer, PeerDelReason.TRANSPORT_ERROR)
            return
        del out[:sent]
        if not out and peer.tcp_writer:
            assert self._loop is not None
            self._loop.remove_writer(peer.fd)
            peer.tcp_writer = False

