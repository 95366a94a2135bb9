"""The P2P data path of the userspace backend: UDP receive (with GRO), decryption into the TUN,
the TUN reader, and sending sealed packets (UDP with GSO trains, or TCP frames via :mod:`.tcp`).

:meth:`UdpPath._rx_data` (decrypt, check, write to the TUN) and :meth:`UdpPath._send_data`
serve every transport and the multipoint path too.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from pyovpn.datachannel.api import ControlPacket, Framing, Transport, normalize_address
from pyovpn.datachannel.crypto import PING_MAGIC, PacketIdExhaustedError
from pyovpn.datachannel.datapath import (
    FRAME_LEN,
    GRO_CMSG_SPACE,
    GSO_MAX_BYTES,
    GSO_MAX_SEGMENTS,
    GSO_SIZE,
    count,
    gro_segment_size,
    gso_train_refused,
    reassemble,
)
from pyovpn.datachannel.fragment import FragmentError
from pyovpn.datachannel.framing import FramingError, frame_payload, note_framing_error, unframe_bytes
from pyovpn.datachannel.tos import inner_tos, set_outer_tos
from pyovpn.datachannel.userspace.peers import RX_BATCH, Iface, Peer, PeerTable
from pyovpn.errors import AuthenticationError, ProtocolError, ReplayError
from pyovpn.net.sockets import RECV_ICMP_ERRNOS, SOL_UDP, TRANSIENT_SEND_ERRNOS, UDP_SEGMENT
from pyovpn.proto.packets import (
    MIN_FIRST_PACKET_LEN,
    OPCODE_DATA_V1,
    OPCODE_DATA_V2,
    STRANGER_FIRST_BYTES,
    UNDEF_PEER_ID,
)

__all__ = ["UdpPath"]

log = logging.getLogger(__name__)


class UdpPath(PeerTable):
    # ------------------------------------------------------------------ network -> TUN

    def _on_udp_readable(self, peer: Peer) -> None:
        sock = peer.sock
        rx = self._rx_buf
        mv = self._rx_mv
        assert self._loop is not None
        now = self._loop.time()
        for _ in range(RX_BATCH):
            if self._peers.get(peer.peer_id) is not peer:
                return
            try:
                if peer.gro:
                    n, anc, _flags, addr = sock.recvmsg_into([rx], GRO_CMSG_SPACE)
                else:
                    n, addr = sock.recvfrom_into(rx)
                    anc = None
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # ICMP errors queued on the socket (e.g. port unreachable) are reported once
                count(peer.stats, "rx_errors")
                if e.errno in RECV_ICMP_ERRNOS:
                    continue
                log.debug("userspace data channel: receive for peer %d failed: %s", peer.peer_id, e)
                return
            seg = gro_segment_size(anc) if anc else 0  # only a coalesced receive carries the cmsg
            if seg and seg < n:
                count(peer.stats, "gro_batches")
                for off in range(0, n, seg):
                    self._udp_packet(peer, mv[off : min(off + seg, n)], addr, now)
            else:
                self._udp_packet(peer, mv[:n], addr, now)

    def _udp_packet(self, peer: Peer, pkt: memoryview, addr: tuple[Any, ...], now: float) -> None:
        if not pkt:
            count(peer.stats, "rx_empty")
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
                count(peer.stats, "rx_unknown_peer")
                return
        elif opcode != OPCODE_DATA_V1:
            if (addr[0] != peer.raw_ip or addr[1] != peer.raw_port) and (
                pkt[0] not in STRANGER_FIRST_BYTES or len(pkt) < MIN_FIRST_PACKET_LEN
            ):
                count(peer.stats, "rx_control_stranger")  # the edge would drop it (Capabilities)
                return
            self._emit(ControlPacket(peer.peer_id, bytes(pkt), normalize_address(addr)))
            return
        if self._rx_data(peer, pkt, now) and (addr[0] != peer.raw_ip or addr[1] != peer.raw_port):
            self._floated(peer, addr)

    def _rx_data(self, peer: Peer, pkt: memoryview, now: float, late: bool = False) -> bool:
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
                count(st, "rx_no_key")
                return False
        try:
            plain = ks.decrypt(pkt)
        except AuthenticationError:
            st.dropped_auth += 1
            return False
        except ReplayError:
            if late:
                count(st, "keepalive_late")
            else:
                st.dropped_replay += 1
            return False
        except ProtocolError:
            st.dropped_other += 1
            return False
        peer.last_rx = now
        if peer.reasm is not None:
            whole = reassemble(st, peer.reasm, plain, now, log, "userspace data channel", peer.peer_id)
            if whole is None:
                return True  # more fragments to come, or a bad one (counted)
            plain = whole
        if peer.framing is not Framing.NONE:
            try:
                plain = unframe_bytes(peer.framing, plain)
            except FramingError as e:
                note_framing_error(st, e, log, "userspace data channel", peer.peer_id)
                return True
        size = len(plain)
        if size == 16 and plain == PING_MAGIC:
            count(st, "keepalive_rx")
            return True
        if not size or (plain[0] >> 4) not in (4, 6):
            # not an IP packet (e.g. OCC): the kernel drops these too
            st.dropped_other += 1
            count(st, "rx_not_ip")
            return True
        router = peer.iface.router
        if router is not None and router.for_src(plain) is not peer:
            # MP reverse-path check: the source must be this peer's VPN IP or behind its routes
            st.dropped_other += 1
            count(st, "rx_dropped_src")
            return True
        try:
            os.write(peer.iface.fd, plain)
        except OSError:
            st.dropped_other += 1
            count(st, "tun_write_errors")
            return True
        st.vpn_rx_packets += 1
        st.vpn_rx_bytes += size
        return True

    # ------------------------------------------------------------------ TUN -> network

    def _on_tun_readable(self, iface: Iface) -> None:
        fd = iface.fd
        buf = [self._tun_buf]
        mv = self._tun_mv
        readv = os.readv
        peer = iface.peer
        ks = peer.keys[0] if peer is not None else None
        tx_id = peer.tx_peer_id if peer is not None else 0
        framing = peer.framing if peer is not None and peer.framing is not Framing.NONE else None
        passtos = peer is not None and peer.passtos
        frag = peer.frag if peer is not None else None
        dropped_big = 0
        out: list[bytes] = []
        vpn_bytes = 0
        dropped = 0
        for _ in range(RX_BATCH):
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
            if passtos and n and (tos := inner_tos(mv)) != peer.tos:  # type: ignore[union-attr]
                assert peer is not None  # passtos is a peer's
                if out:  # what was read before goes out with the TOS it was read under
                    self._tx_out(peer, out, vpn_bytes)
                    out, vpn_bytes = [], 0
                set_outer_tos(peer.sock, tos)
                peer.tos = tos
            try:
                payload = mv[:n] if framing is None else frame_payload(framing, mv[:n])
                if frag is None:
                    out.append(ks.encrypt(payload, tx_id))
                else:
                    out.extend([ks.encrypt(piece, tx_id) for piece in frag.split(payload)])
            except FragmentError:
                dropped_big += 1
                continue
            except PacketIdExhaustedError:
                assert peer is not None
                self._key_exhausted(peer, ks)
                ks = None
                dropped += 1
                continue
            vpn_bytes += n
        if dropped:
            count(peer.stats if peer is not None else self.iface_stats, "tx_dropped_no_key", dropped)
        if dropped_big:
            count(peer.stats if peer is not None else self.iface_stats, "tx_dropped_too_big", dropped_big)
        if out:
            assert peer is not None
            self._tx_out(peer, out, vpn_bytes)

    def _tx_out(self, peer: Peer, out: list[bytes], vpn_bytes: int) -> None:
        """Count and send sealed packets read from the TUN (``vpn_bytes``: their plaintext size)."""
        assert self._loop is not None
        st = peer.stats
        st.vpn_tx_packets += len(out)
        st.vpn_tx_bytes += vpn_bytes
        self._send_data(peer, out, self._loop.time())

    def _send_data(self, peer: Peer, packets: list[bytes], now: float) -> None:
        if peer.transport is Transport.TCP:
            pack = FRAME_LEN.pack
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

    def _udp_send(self, peer: Peer, packets: list[bytes]) -> tuple[int, int]:
        sock = peer.sock
        addr = peer.send_addr
        assert addr is not None  # a UDP peer has a remote from NewPeer on
        total = len(packets)
        sent_packets = sent_bytes = 0
        i = 0
        while i < total:
            size = len(packets[i])
            j = i + 1
            if size < peer.gso_max and total - i > 1:
                limit = min(total, i + GSO_MAX_SEGMENTS, i + GSO_MAX_BYTES // size)
                while j < limit and len(packets[j]) == size:
                    j += 1
                if j < limit and len(packets[j]) < size:
                    j += 1  # GSO allows one shorter segment at the end of a train
            if j - i > 1:
                train = packets[i:j]
                try:
                    sock.sendmsg(train, [(SOL_UDP, UDP_SEGMENT, GSO_SIZE.pack(size))], 0, addr)
                    sent_packets += j - i
                    sent_bytes += sum(map(len, train))
                    count(peer.stats, "gso_sends")
                    i = j
                    continue
                except OSError as e:
                    if gso_train_refused(peer, size, j - i, e, log, "userspace data channel"):
                        i = j
                        continue
                    j = i + 1
            try:
                sock.sendto(packets[i], addr)
                sent_packets += 1
                sent_bytes += size
            except OSError as e:
                count(peer.stats, "tx_dropped")
                if e.errno not in TRANSIENT_SEND_ERRNOS:
                    log.debug("userspace data channel: send to peer %d failed: %s", peer.peer_id, e)
            i += 1
        return sent_packets, sent_bytes
