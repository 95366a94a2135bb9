"""The multipoint (MP) data path of the userspace backend: demultiplexing and route lookup.

Network -> TUN: one reader per shared UDP socket (and its keepalive lane) hands DATA_V2 to the
peer its peer-id names (that peer must use this socket), peer-id 0xFFFFFF and DATA_V1 to the
peer whose remote is the source address, and every other packet up as ``ControlPacket``
(``UNDEF_PEER_ID`` for a source without a peer). The control packets of one wakeup go up in
one loop callback, in order.

TUN -> network: each packet goes to the peer its destination routes to
(:meth:`~pyovpn.datachannel.routing.PeerRouter.for_dst`); the packets of one wakeup
are sent per peer as one batch.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from pyovpn.datachannel.api import ControlPacket, Framing, normalize_address
from pyovpn.datachannel.crypto import PacketIdExhaustedError
from pyovpn.datachannel.datapath import GRO_CMSG_SPACE, count, gro_segment_size
from pyovpn.datachannel.framing import frame_payload
from pyovpn.datachannel.lane import close_lane
from pyovpn.datachannel.peer_socket import give_back
from pyovpn.datachannel.tos import inner_tos, set_outer_tos
from pyovpn.datachannel.userspace.peers import MMSG_COUNT, RX_BATCH, Iface, Peer, PeerTable, SharedUdp
from pyovpn.net import mmsg
from pyovpn.net.sockets import RECV_ICMP_ERRNOS
from pyovpn.proto.packets import OPCODE_DATA_V1, OPCODE_DATA_V2, UNDEF_PEER_ID

__all__ = ["Multipoint"]

log = logging.getLogger(__name__)


class Multipoint(PeerTable):
    def mp_routes(self) -> list[tuple[str, str | None]]:
        """MP: the routes through the interface the backend follows, as ``(prefix, gateway)``.

        ``gateway`` is None for a route without one. Empty in P2P mode.
        """
        iface = self._iface
        if iface is None or iface.monitor is None:
            return []
        return iface.monitor.mirror.routes()

    def _mp_detach(self, peer: Peer, shared: SharedUdp) -> None:
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
        if sock.fileno() >= 0 and self._loop is not None:
            self._loop.remove_reader(shared.fd)
        # give the caller's socket back as we found it (flags are shared with our dup)
        give_back(sock, blocking=shared.orig_blocking, gro=shared.gro)
        sock.close()

    # ------------------------------------------------------------------ TUN -> network

    def _on_mp_tun_readable(self, iface: Iface) -> None:
        """MP TUN -> network: each packet goes to the peer its destination routes to."""
        router = iface.router
        assert router is not None and self._loop is not None
        fd = iface.fd
        buf = [self._tun_buf]
        mv = self._tun_mv
        readv = os.readv
        for_dst = router.for_dst
        batches: dict[Peer, list[bytes]] = {}
        no_peer = 0
        for _ in range(RX_BATCH):
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
                count(peer.stats, "tx_dropped_no_key")
                continue
            try:
                if peer.framing is Framing.NONE:
                    sealed = ks.encrypt(pkt, peer.tx_peer_id)
                else:
                    sealed = ks.encrypt(frame_payload(peer.framing, pkt), peer.tx_peer_id)
            except PacketIdExhaustedError:
                self._key_exhausted(peer, ks)
                count(peer.stats, "tx_dropped_no_key")
                continue
            peer.stats.vpn_tx_bytes += n
            if peer.passtos:
                # the socket may be shared by all peers: mark it for this packet (when the mark
                # changes) and send the packet now, before another peer's packet changes it again
                marked = peer.shared if peer.shared is not None else peer
                if (tos := inner_tos(pkt)) != marked.tos:
                    set_outer_tos(peer.sock, tos)
                    marked.tos = tos
                peer.stats.vpn_tx_packets += 1
                self._send_data(peer, [sealed], self._loop.time())
                continue
            batch = batches.get(peer)
            if batch is None:
                batches[peer] = [sealed]
            else:
                batch.append(sealed)
        if no_peer:
            count(self.iface_stats, "tx_dropped_no_peer", no_peer)
        if batches:
            now = self._loop.time()
            for peer, out in batches.items():
                if self._peers.get(peer.peer_id) is not peer:
                    continue  # a TCP send failure above removed it
                peer.stats.vpn_tx_packets += len(out)
                self._send_data(peer, out, now)

    # ------------------------------------------------------------------ network -> TUN

    def _on_mp_udp_readable(self, shared: SharedUdp) -> None:
        """MP network -> TUN: the one reader of the UDP socket all UDP peers share.

        The notifications of one wakeup (mostly control packets) go up in order in one loop callback.
        """
        self._mp_control = []
        try:
            assert self._loop is not None
            self._mp_udp_read(shared, shared.sock, self._loop.time(), RX_BATCH)
        finally:
            batch, self._mp_control = self._mp_control, None
            if batch and self._loop is not None and self._subscribers:
                self._loop.call_soon(self._dispatch_all, batch)

    def _mp_udp_read(
        self, shared: SharedUdp, sock: socket.socket, now: float, batch: int, lane: bool = False
    ) -> None:
        """Read the shared socket (or its keepalive lane, whose packets may have waited)."""
        if not lane and mmsg.available():
            self._mp_udp_read_many(shared, now, batch)
            return
        rx = self._rx_buf
        mv = self._rx_mv
        gro = shared.gro and not lane
        for _ in range(batch):
            if self._shared.get(shared.key) is not shared:
                return
            try:
                if gro:
                    n, anc, _flags, addr = sock.recvmsg_into([rx], GRO_CMSG_SPACE)
                else:
                    n, addr = sock.recvfrom_into(rx)
                    anc = None
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # ICMP errors queued on the socket (e.g. port unreachable) are reported once
                count(self.iface_stats, "rx_errors")
                if e.errno in RECV_ICMP_ERRNOS:
                    continue
                what = "keepalive lane" if lane else "shared socket"
                log.debug("userspace data channel: receive on the %s failed: %s", what, e)
                return
            if lane:
                count(self.iface_stats, "keepalive_lane_rx")
                self._mp_udp_packet(shared, mv[:n], addr, now, late=True)
                continue
            seg = gro_segment_size(anc) if anc else 0  # only a coalesced receive carries the cmsg
            if seg and seg < n:
                count(self.iface_stats, "gro_batches")
                for off in range(0, n, seg):
                    self._mp_udp_packet(shared, mv[off : min(off + seg, n)], addr, now)
            else:
                self._mp_udp_packet(shared, mv[:n], addr, now)

    def _mp_udp_read_many(self, shared: SharedUdp, now: float, batch: int) -> None:
        """:meth:`_mp_udp_read` with ``recvmmsg`` (net/mmsg.py): many datagrams per system call."""
        if self._mmsg_buf is None:
            self._mmsg_buf = mmsg.slot_buffer(MMSG_COUNT)
        rcv = shared.mmsg
        if rcv is None:
            rcv = shared.mmsg = mmsg.BatchReceiver(shared.fd, self._mmsg_buf, MMSG_COUNT)
        mv = memoryview(self._mmsg_buf)
        slot = mmsg.SLOT
        taken = 0
        while taken < batch:
            if self._shared.get(shared.key) is not shared:
                return
            try:
                n = rcv.recv()
            except OSError as e:
                count(self.iface_stats, "rx_errors")
                if e.errno in RECV_ICMP_ERRNOS:
                    continue
                log.debug("userspace data channel: receive on the shared socket failed: %s", e)
                return
            if not n:
                return
            lens, addrs, segs, truncated = rcv.results(n)
            for i in range(n):
                if self._shared.get(shared.key) is not shared:
                    return
                ln = lens[i]
                addr = addrs[i]
                if truncated[i] or addr is None:  # over 64 KiB, or not an IP sender: not ours
                    self.iface_stats.dropped_other += 1
                    count(self.iface_stats, "rx_truncated" if truncated[i] else "rx_unknown_family")
                    continue
                base = i * slot
                seg = segs[i]
                if seg and seg < ln:
                    count(self.iface_stats, "gro_batches")
                    for off in range(0, ln, seg):
                        self._mp_udp_packet(shared, mv[base + off : base + min(off + seg, ln)], addr, now)
                else:
                    self._mp_udp_packet(shared, mv[base : base + ln], addr, now)
            taken += n
            if n < rcv.count:  # the queue is empty
                return

    def _mp_udp_packet(
        self, shared: SharedUdp, pkt: memoryview, addr: tuple[Any, ...], now: float, late: bool = False
    ) -> None:
        if not pkt:
            count(self.iface_stats, "rx_empty")
            return
        opcode = pkt[0] >> 3
        peer: Peer | None
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
            self._emit(ControlPacket(owner, bytes(pkt), normalize_address(addr)))
            return
        if peer is None:
            count(self.iface_stats, "rx_unknown_peer")
            return
        if self._rx_data(peer, pkt, now, late) and (addr[0] != peer.raw_ip or addr[1] != peer.raw_port):
            old = (peer.raw_ip, peer.raw_port)
            self._floated(peer, addr)
            shared.move(peer, old)
