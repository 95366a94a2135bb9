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
  :mod:`.routing`). No peer: the packet is dropped and counted in
  ``iface_stats`` (``tx_dropped_no_peer``). Packets for one peer are sent as one batch
  (UDP GSO as in P2P);
* a decrypted packet is written to the TUN only if that same lookup for its source
  address names the peer it came from (the kernel's ``ovpn_peer_check_by_src``); else it
  is dropped and counted in that peer's stats (``rx_dropped_src``);
* keys, keepalive, stats and float are per peer; a float re-indexes the peer's address.
* when the shared socket was bound with ``SO_REUSEPORT``, a second socket joins it as the
  keepalive lane (:mod:`.lane`): the kernel steers the datagrams
  that can only be pings there, and the keepalive timer drains it at most ``_LANE_MAX_DELAY``
  late (see :mod:`.keepalive`), so a thousand idle clients do not wake the loop a hundred times a second.

Unlike the ovpn device, the backend does not switch off ICMP redirects on the TUN
(``net.ipv4.conf.*.send_redirects``), so a server forwarding between clients may send them
redirects; they are harmless on a point-to-point link.

Batching: each reader wakeup drains its descriptor (up to a cap so one busy socket
cannot starve the loop). UDP receive enables UDP_GRO when the kernel offers it and
splits coalesced datagrams by the gso_size control message; UDP send groups runs of
equal-size packets into one ``sendmsg`` with UDP_SEGMENT (GSO) and falls back to one
``sendto`` per packet if the socket or route refuses it.

This module owns the command set and the peers' lifecycle; the data path is split by concern
into mixins (:mod:`.udp`, :mod:`.tcp`, :mod:`.keepalive`, :mod:`.multipoint`) over the state in
:mod:`.peers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from typing import Any, cast

from pyovpn.datachannel import api, peer_socket, strangers
from pyovpn.datachannel.crypto import DEFAULT_REPLAY_WINDOW, KeyState
from pyovpn.datachannel.datapath import FRAME_LEN, TCP_TX_HIGH_WATER, count, debug_hook
from pyovpn.datachannel.deadlines import DeadlineHeap
from pyovpn.datachannel.fragment import Fragmenter, Reassembler
from pyovpn.datachannel.lane import open_lane
from pyovpn.datachannel.routing import AddressInUseError, PeerRouter, RouteMonitor
from pyovpn.datachannel.userspace.keepalive import Keepalive
from pyovpn.datachannel.userspace.multipoint import Multipoint
from pyovpn.datachannel.userspace.peers import Iface, Peer, SharedUdp
from pyovpn.datachannel.userspace.tcp import TcpPath
from pyovpn.datachannel.userspace.udp import UdpPath
from pyovpn.datachannel.validate import (
    check_fragment,
    check_new_key,
    check_no_shaper,
    check_null_dev_is_p2p,
    check_set_peer_keepalive,
    check_slot,
    no_key_in_slot,
)
from pyovpn.errors import BackendError
from pyovpn.net import tun
from pyovpn.net.sockets import TRANSIENT_SEND_ERRNOS, socket_key

__all__ = ["UserspaceDataChannel"]

log = logging.getLogger(__name__)


class UserspaceDataChannel(Keepalive, Multipoint, UdpPath, TcpPath):
    """The :class:`~pyovpn.datachannel.api.DataChannel` backend in userspace (asyncio, TUN)."""

    name = "userspace"
    capabilities = api.Capabilities(
        mp=True,
        tcp_backlog=True,
        stats=True,
        gso=True,
        lane=True,
        hooks=True,
        drops_strangers=True,
        framing=True,
        passtos=True,
        null_dev=True,
        fragment=True,
    )

    def __init__(
        self,
        *,
        replay_window: int = DEFAULT_REPLAY_WINDOW,
        udp_gso: bool = True,
        udp_gro: bool = True,
        tcp_tx_high_water: int = TCP_TX_HIGH_WATER,
    ) -> None:
        if not 1 <= replay_window <= 65536:
            raise BackendError(f"replay window must be 1..65536 packets, got {replay_window}")
        self._replay_window = replay_window
        self._want_gso = udp_gso
        self._want_gro = udp_gro
        self._tcp_high_water = tcp_tx_high_water
        self._init_state()

    # ------------------------------------------------------------------ public API

    @property
    def ifname(self) -> str | None:
        """The TUN interface's actual name (the kernel picks it for ``tun``/``tun%d``)."""
        return self._iface.name if self._iface else None

    def subscribe(self, callback: Callable[[api.Notification], None]) -> None:
        self._subscribers.add(callback)

    def peer_stats(self, peer_id: int) -> api.Stats:
        """The live counters of a peer, including drop reasons ``PeerInfo`` does not carry."""
        return self._peer("GetPeer", peer_id).stats

    async def debug(self, peer_id: int, what: str, **kw: Any) -> Any:
        """Test hooks on a peer's primary key, as the engine has (``Capabilities.hooks``)."""
        peer = self._peer("debug", peer_id)
        try:
            return debug_hook(peer, what, kw)
        except ValueError as e:
            raise BackendError(f"debug: peer {peer_id}: {e}") from None

    async def request(self, command: api.Command) -> api.PeerInfo | api.KeyInfo | None:
        what = type(command).__name__
        if self._closed:
            raise BackendError(f"{what}: the userspace backend is closed")
        self._loop = asyncio.get_running_loop()
        handler = api.handler_for(self, command)
        if isinstance(command, api.NewIface):
            await self._new_iface(command)
            return None
        return cast("api.PeerInfo | api.KeyInfo | None", handler(command))

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

    async def _new_iface(self, cmd: api.NewIface) -> None:
        if self._iface is not None:
            raise BackendError(
                f"NewIface: this backend already drives {self._iface.name}; use one backend per interface"
            )
        if cmd.mode not in (api.IfaceMode.P2P, api.IfaceMode.MP):
            raise BackendError(f"NewIface: unknown interface mode {cmd.mode!r}")
        if not 68 <= cmd.mtu <= 65535:
            raise BackendError(f"NewIface: MTU {cmd.mtu} out of range 68..65535")
        if cmd.null:
            self._new_null_iface(cmd)
            return
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
        iface = Iface(ifname, cmd.name, fd, cmd.mode, cmd.mtu)
        assert self._loop is not None
        if cmd.mode is api.IfaceMode.MP:
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

    def _new_null_iface(self, cmd: api.NewIface) -> None:
        """`dev null`: no device; what the peer sends is decrypted and written to /dev/null."""
        check_null_dev_is_p2p(cmd)
        try:
            fd = tun.open_null()
        except OSError as e:
            raise BackendError(f"NewIface: cannot open {os.devnull}: {e.strerror or e}") from None
        # no reader: nothing ever comes from a null device
        self._iface = Iface(cmd.name or "null", cmd.name, fd, cmd.mode, cmd.mtu)
        log.info("userspace data channel: null device (packets from the peer are discarded)")

    def _del_iface(self, cmd: api.DelIface) -> None:
        iface = self._iface
        if iface is None or cmd.name not in (iface.name, iface.requested_name):
            raise BackendError(f"DelIface: no interface named {cmd.name!r}")
        # like deleting an ovpn link: all its peers go with reason TEARDOWN
        for peer in [p for p in self._peers.values() if p.iface is iface]:
            self._remove_peer(peer, api.PeerDelReason.TEARDOWN)
        self._close_iface(iface)
        self._iface = None

    def _new_peer(self, cmd: api.NewPeer) -> None:
        what = "NewPeer"
        iface = self._iface
        if iface is None:
            raise BackendError(f"{what}: no interface; send NewIface first")
        tx_id = peer_socket.check_new_peer(what, cmd, multipoint=iface.router is not None)
        if iface.router is not None:
            self._new_mp_peer(what, cmd, tx_id, iface, iface.router)
            return
        sock = peer_socket.adopt_socket(what, cmd)
        try:
            peer = self._check_socket(what, cmd, sock, tx_id, iface)
        except BaseException:
            sock.close()
            raise
        # P2P has exactly one peer: a new one replaces the old, as in the kernel. Remove it
        # before touching socket flags: it may share our socket and restores them on removal.
        for old in (iface.peer, self._peers.get(cmd.peer_id)):
            if old is not None:
                self._remove_peer(old, api.PeerDelReason.TEARDOWN)
        self._configure_socket(peer)
        strangers.follow(peer)
        self._peers[cmd.peer_id] = peer
        iface.peer = peer
        assert self._loop is not None
        if cmd.transport is api.Transport.UDP:
            self._loop.add_reader(peer.fd, self._on_udp_readable, peer)
        else:
            self._start_tcp(peer, cmd.tcp_backlog)
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
        self, what: str, cmd: api.NewPeer, tx_id: int, iface: Iface, router: PeerRouter[Peer]
    ) -> None:
        """MP: add one of many peers (see the module docstring); UDP peers share one socket."""
        peer_socket.check_peer_id_free(what, cmd.peer_id, self._peers)
        try:
            key = socket_key(cmd.socket_fd)
        except OSError as e:
            raise BackendError(
                f"{what}: socket fd {cmd.socket_fd} is not usable: {e.strerror or e}"
            ) from None
        shared = self._shared.get(key) if cmd.transport is api.Transport.UDP else None
        if cmd.transport is api.Transport.TCP:
            tcp = self._peers.values()
            peer_socket.check_own_connection(
                what, key, ((p.peer_id, p.fd) for p in tcp if p.transport is api.Transport.TCP)
            )
        sock = shared.sock if shared is not None else peer_socket.adopt_socket(what, cmd)
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
        if cmd.transport is api.Transport.TCP:
            self._configure_socket(peer)
            self._start_tcp(peer, cmd.tcp_backlog)
        elif shared is None:
            self._configure_socket(peer)  # the first peer sets the socket up for all of them
            shared = SharedUdp(key, sock)
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

    def _check_socket(
        self, what: str, cmd: api.NewPeer, sock: socket.socket, tx_id: int, iface: Iface
    ) -> Peer:
        peer = Peer(cmd.peer_id, tx_id, sock, cmd.transport, iface)
        peer.framing = cmd.framing
        peer.passtos = cmd.passtos
        check_fragment(what, cmd, multipoint=iface.router is not None)
        check_no_shaper(cmd, "userspace (in-process)")
        if cmd.fragment:
            peer.frag = Fragmenter(cmd.fragment)
            peer.reasm = Reassembler()
        peer_socket.check_socket(what, cmd, peer)
        return peer

    def _configure_socket(self, peer: Peer) -> None:
        sock = peer.sock
        peer.orig_blocking, peer.gro = peer_socket.take_over(sock, peer.transport, want_gro=self._want_gro)
        if peer.transport is api.Transport.UDP and self._want_gso:
            peer.gso_max = 0x10000 if peer_socket.gso_supported(sock) else 0

    def _start_tcp(self, peer: Peer, backlog: bytes) -> None:
        """Read a TCP peer's stream from now on, after the frames the control plane read before."""
        assert self._loop is not None
        peer.tcp_rx += backlog
        self._loop.add_reader(peer.fd, self._on_tcp_readable, peer)
        if peer.tcp_rx:
            # frames read before the handover are processed in order, after this call returns
            self._loop.call_soon(self._tcp_process, peer)

    def _set_peer(self, cmd: api.SetPeer) -> None:
        what = "SetPeer"
        peer = self._peer(what, cmd.peer_id)
        keepalive = check_set_peer_keepalive(cmd)
        if cmd.remote is not None:
            if peer.transport is api.Transport.TCP:
                raise BackendError(f"{what}: a TCP peer's remote cannot change")
            old = (peer.raw_ip, peer.raw_port)
            peer_socket.set_remote(what, peer, cmd.remote)
            if peer.shared is not None:
                peer.shared.move(peer, old)
            else:
                strangers.follow(peer)
        if keepalive:
            assert cmd.keepalive_interval is not None and cmd.keepalive_timeout is not None
            self._set_keepalive(peer, cmd.keepalive_interval, cmd.keepalive_timeout)

    def _get_peer(self, cmd: api.GetPeer) -> api.PeerInfo:
        peer = self._peer("GetPeer", cmd.peer_id)
        return peer.stats.peer_info(peer.peer_id, peer.remote, peer.ka_interval, peer.ka_timeout)

    def _del_peer(self, cmd: api.DelPeer) -> None:
        self._remove_peer(self._peer("DelPeer", cmd.peer_id), api.PeerDelReason.USERSPACE)

    def _new_key(self, cmd: api.NewKey) -> None:
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

    def _del_key(self, cmd: api.DelKey) -> None:
        peer = self._peer("DelKey", cmd.peer_id)
        # an empty slot is not an error, as in the kernel
        peer.keys[check_slot("DelKey", cmd.slot)] = None

    def _swap_keys(self, cmd: api.SwapKeys) -> None:
        peer = self._peer("SwapKeys", cmd.peer_id)
        keys = peer.keys
        keys[0], keys[1] = keys[1], keys[0]

    def _get_key(self, cmd: api.GetKey) -> api.KeyInfo:
        peer = self._peer("GetKey", cmd.peer_id)
        slot = check_slot("GetKey", cmd.slot)
        ks = peer.keys[slot]
        if ks is None:
            raise no_key_in_slot("GetKey", cmd.peer_id, slot)
        return api.KeyInfo(peer_id=peer.peer_id, slot=api.KeySlot(slot), key_id=ks.key_id, cipher=ks.cipher)

    def _send_control(self, cmd: api.SendControl) -> None:
        what = "SendControl"
        peer = self._peer(what, cmd.peer_id)
        packet = cmd.packet
        if not packet:
            raise BackendError(f"{what}: empty packet")
        if peer.transport is api.Transport.TCP:
            if len(packet) > 0xFFFF:
                raise BackendError(f"{what}: {len(packet)} bytes do not fit a TCP frame (max 65535)")
            self._tcp_queue(peer, FRAME_LEN.pack(len(packet)) + packet, control=True)
            return
        assert peer.send_addr is not None
        try:
            peer.sock.sendto(packet, peer.send_addr)
        except OSError as e:
            if e.errno in TRANSIENT_SEND_ERRNOS:
                # UDP is lossy anyway; the reliability layer retransmits
                count(peer.stats, "control_tx_dropped")
                return
            raise BackendError(f"{what}: send to {peer.remote} failed: {e.strerror or e}") from None

    # ------------------------------------------------------------------ teardown

    def _close_iface(self, iface: Iface) -> None:
        if self._loop is not None:
            self._loop.remove_reader(iface.fd)
        with contextlib.suppress(OSError):
            os.close(iface.fd)  # a non-persistent TUN disappears with its last descriptor
        iface.peer = None
        if iface.monitor is not None:
            iface.monitor.close()
            iface.monitor = None

    def _remove_peer(self, peer: Peer, reason: api.PeerDelReason) -> None:
        if self._peers.get(peer.peer_id) is not peer:
            return
        del self._peers[peer.peer_id]
        if peer.iface.peer is peer:
            peer.iface.peer = None
        if peer.transport is api.Transport.TCP and peer.tcp_tx and reason is api.PeerDelReason.USERSPACE:
            # best effort: a control frame queued just before DelPeer (e.g. EXIT) should leave
            with contextlib.suppress(OSError):
                peer.sock.send(peer.tcp_tx)
        self._drop_peer(peer)
        log.info("userspace data channel: peer %d deleted (%s)", peer.peer_id, reason.name)
        self._emit(api.PeerDeleted(peer.peer_id, reason))

    def _drop_peer(self, peer: Peer) -> None:
        DeadlineHeap.cancel(peer)  # its heap entry is skipped from now on
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
        peer_socket.give_back(peer.sock, blocking=peer.orig_blocking, gro=peer.gro)
        peer.sock.close()
        peer.keys = [None, None]
