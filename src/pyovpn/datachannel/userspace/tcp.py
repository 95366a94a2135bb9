"""TCP transport of the userspace backend: u16-length framing in and out, and a bounded output queue.

Unlike the kernel, which keeps a single frame in flight, a TCP peer has an output buffer; data
frames beyond ``tcp_tx_high_water`` bytes of backlog are dropped, control frames never are.
A read or write error, EOF or a malformed frame deletes the peer (TRANSPORT_DISCONNECT or
TRANSPORT_ERROR, as the kernel reports it).
"""

from __future__ import annotations

import logging

from pyovpn.datachannel.api import ControlPacket, PeerDelReason
from pyovpn.datachannel.datapath import TCP_RX_CHUNK, count, take_frames, tcp_error_reason
from pyovpn.datachannel.userspace.peers import Peer, PeerTable
from pyovpn.proto.packets import OPCODE_DATA_V1, OPCODE_DATA_V2

__all__ = ["TcpPath"]

log = logging.getLogger(__name__)

_TCP_RX_READS = 16


class TcpPath(PeerTable):
    def _on_tcp_readable(self, peer: Peer) -> None:
        sock = peer.sock
        for _ in range(_TCP_RX_READS):
            try:
                data = sock.recv(TCP_RX_CHUNK)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                log.info("userspace data channel: TCP peer %d: %s", peer.peer_id, e)
                self._remove_peer(peer, tcp_error_reason(e))
                return
            if not data:
                self._remove_peer(peer, PeerDelReason.TRANSPORT_DISCONNECT)
                return
            peer.tcp_rx += data
            if not self._tcp_process(peer):
                return
            if len(data) < TCP_RX_CHUNK:
                break

    def _tcp_process(self, peer: Peer) -> bool:
        """Handle every whole frame in the receive buffer; False if the peer was removed."""
        if self._peers.get(peer.peer_id) is not peer:
            return False
        assert self._loop is not None
        now = self._loop.time()
        frames, bad = take_frames(peer.tcp_rx)
        for pkt in frames:
            if (pkt[0] >> 3) in (OPCODE_DATA_V2, OPCODE_DATA_V1):
                self._rx_data(peer, memoryview(pkt), now)
            else:
                self._emit(ControlPacket(peer.peer_id, bytes(pkt), None))
        if bad is not None:
            log.info("userspace data channel: TCP peer %d sent a %d-byte frame", peer.peer_id, bad)
            self._remove_peer(peer, PeerDelReason.TRANSPORT_ERROR)
            return False
        return True

    def _tcp_queue(self, peer: Peer, frames: bytes, *, control: bool) -> bool:
        """Queue whole frames for the TCP stream; frames are never split between callers."""
        out = peer.tcp_tx
        if out:
            if not control and len(out) >= self._tcp_high_water:
                count(peer.stats, "tx_dropped", 1)
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

    def _on_tcp_writable(self, peer: Peer) -> None:
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
