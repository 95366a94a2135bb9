"""The kernel backend's side of the handed-over transport sockets.

After ``NewPeer`` the kernel consumes DATA_V2 on the socket and passes every other packet
up it, so the backend keeps a duplicate of each socket, reads it on the event loop and
reports those packets as ``ControlPacket``. ``SendControl`` is a plain send on the same
socket: for UDP a ``sendto()`` the peer's address, for TCP exactly one whole
length-prefixed frame per ``send()``, which is what the kernel's TCP hook demands.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any

from pyovpn.datachannel import api
from pyovpn.errors import BackendError
from pyovpn.net import rxbuf
from pyovpn.net.sockets import RECV_ICMP_ERRNOS, TCP_DISCONNECT_ERRNOS, TRANSIENT_SEND_ERRNOS
from pyovpn.proto.packets import OPCODE_DATA_V1, OPCODE_DATA_V2, UNDEF_PEER_ID

__all__ = ["Peer", "Reader", "Transports"]

log = logging.getLogger(__name__)

_FRAME_LEN = struct.Struct(">H")
_TCP_RX_BUF = 2 + 0xFFFF  # the kernel hands up one whole frame (prefix included) per recv()
_RX_BATCH = 256
_TCP_RETRY_MIN = 0.001
_TCP_RETRY_MAX = 0.05


class Reader:
    """Our duplicate of one handed-over socket and the peers it carries (MP UDP shares one)."""

    __slots__ = ("fd", "key", "peers", "sock", "transport")

    def __init__(self, key: tuple[int, int], sock: socket.socket, transport: api.Transport) -> None:
        self.key = key
        self.sock = sock
        self.fd = sock.fileno()
        self.transport = transport
        self.peers: set[int] = set()


class Peer:
    """What the backend keeps of one kernel peer: its socket and where control packets go."""

    __slots__ = (
        "peer_id",
        "reader",
        "remote",
        "send_addr",
        "tcp_delay",
        "tcp_out",
        "tcp_retry",
        "transport",
    )

    def __init__(self, peer_id: int, transport: api.Transport, reader: Reader) -> None:
        self.peer_id = peer_id
        self.transport = transport
        self.reader = reader
        self.remote: api.Address | None = None
        self.send_addr: tuple[Any, ...] | None = None  # a sendto() address, as the socket module takes it
        self.tcp_out: collections.deque[bytes] = collections.deque()
        self.tcp_retry: asyncio.TimerHandle | None = None
        self.tcp_delay = _TCP_RETRY_MIN


def _tcp_end_reason(e: OSError) -> api.PeerDelReason:
    if e.errno in TCP_DISCONNECT_ERRNOS:
        return api.PeerDelReason.TRANSPORT_DISCONNECT
    return api.PeerDelReason.TRANSPORT_ERROR


class Transports:
    """The readers of the handed-over sockets and the control-packet output of the peers.

    ``peers`` is the backend's table (shared, not copied): a peer no longer in it gets no
    more packets read or sent. ``emit`` delivers a notification; ``lost`` is called when a
    TCP stream ends or fails under a peer.
    """

    def __init__(
        self,
        peers: dict[int, Peer],
        emit: Callable[[api.Notification], None],
        lost: Callable[[Peer, api.PeerDelReason], None],
    ) -> None:
        self._peers = peers
        self._emit = emit
        self._lost = lost
        self._loop: asyncio.AbstractEventLoop | None = None
        self.readers: dict[tuple[int, int], Reader] = {}

    def attach(
        self, peer_id: int, transport: api.Transport, key: tuple[int, int], sock: socket.socket
    ) -> Peer:
        """A peer on our duplicate ``sock`` of the socket ``key``; starts reading it, or
        closes ``sock`` if a reader of that socket exists already (MP: one UDP socket)."""
        reader = self.readers.get(key)
        if reader is None:
            self._loop = asyncio.get_running_loop()
            reader = Reader(key, sock, transport)
            self.readers[key] = reader
            callback = self._on_udp_readable if transport is api.Transport.UDP else self._on_tcp_readable
            self._loop.add_reader(reader.fd, callback, reader)
        else:
            sock.close()
        reader.peers.add(peer_id)
        return Peer(peer_id, transport, reader)

    def detach(self, peer: Peer) -> None:
        """Drop the peer's queued output; stop reading its socket when no peer is left on it."""
        if peer.tcp_retry is not None:
            peer.tcp_retry.cancel()
            peer.tcp_retry = None
        peer.tcp_out.clear()
        reader = peer.reader
        reader.peers.discard(peer.peer_id)
        if not reader.peers and self.readers.get(reader.key) is reader:
            del self.readers[reader.key]
            if self._loop is not None and reader.sock.fileno() >= 0:
                self._loop.remove_reader(reader.fd)
            reader.sock.close()

    # ------------------------------------------------------------------ output

    def send(self, what: str, peer: Peer, packet: bytes) -> None:
        if peer.transport is api.Transport.TCP:
            if len(packet) > 0xFFFF:
                raise BackendError(f"{what}: {len(packet)} bytes do not fit a TCP frame (max 65535)")
            peer.tcp_out.append(_FRAME_LEN.pack(len(packet)) + bytes(packet))
            if len(peer.tcp_out) == 1 and peer.tcp_retry is None:
                self._tcp_pump(peer)
            return
        assert peer.send_addr is not None  # every UDP peer has a remote
        try:
            peer.reader.sock.sendto(packet, socket.MSG_DONTWAIT, peer.send_addr)
        except OSError as e:
            if e.errno in TRANSIENT_SEND_ERRNOS:
                return  # UDP is lossy anyway; the reliability layer retransmits
            raise BackendError(f"{what}: send to {peer.remote} failed: {e.strerror or e}") from None

    def _tcp_pump(self, peer: Peer) -> None:
        """Send queued frames, one whole frame per send(); retry later on EAGAIN."""
        peer.tcp_retry = None
        sock = peer.reader.sock
        while peer.tcp_out:
            if self._peers.get(peer.peer_id) is not peer:
                peer.tcp_out.clear()
                return
            frame = peer.tcp_out[0]
            try:
                sock.send(frame, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                # a previous frame (ours or the kernel's data) is still in flight
                assert self._loop is not None
                peer.tcp_retry = self._loop.call_later(peer.tcp_delay, self._tcp_pump, peer)
                peer.tcp_delay = min(peer.tcp_delay * 2, _TCP_RETRY_MAX)
                return
            except OSError as e:
                if e.errno in (errno.EIO, errno.EBADF):
                    peer.tcp_out.clear()  # detached by the kernel: its PEER_DEL_NTF follows
                    return
                log.info("kernel data channel: TCP send to peer %d failed: %s", peer.peer_id, e)
                self._lost(peer, _tcp_end_reason(e))
                return
            peer.tcp_out.popleft()
            peer.tcp_delay = _TCP_RETRY_MIN

    async def flush(self, peer: Peer, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the peer's queued TCP frames to leave."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while peer.tcp_out and self._peers.get(peer.peer_id) is peer and loop.time() < deadline:
            if peer.tcp_retry is not None:
                peer.tcp_retry.cancel()
            self._tcp_pump(peer)
            if peer.tcp_out:
                await asyncio.sleep(0.005)

    # ------------------------------------------------------------------ input

    def _on_udp_readable(self, reader: Reader) -> None:
        sock = reader.sock
        for _ in range(_RX_BATCH):
            if self.readers.get(reader.key) is not reader:
                return
            try:
                data, addr = rxbuf.recvfrom(sock, 0x10000, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # ICMP errors queued on the socket (e.g. port unreachable) are reported once
                if e.errno in RECV_ICMP_ERRNOS:
                    continue
                log.debug("kernel data channel: receive failed: %s", e)
                return
            if not data or (data[0] >> 3) in (OPCODE_DATA_V2, OPCODE_DATA_V1):
                # DATA_V2 for our peers never gets here; the rest the kernel drops too
                continue
            remote = api.normalize_address(addr)
            self._emit(api.ControlPacket(self._udp_owner(reader, remote), data, remote))

    def _udp_owner(self, reader: Reader, remote: api.Address) -> int:
        if len(reader.peers) == 1:
            return next(iter(reader.peers))
        for peer_id in reader.peers:
            peer = self._peers.get(peer_id)
            if peer is not None and peer.remote == remote:
                return peer_id
        return UNDEF_PEER_ID  # MP: a packet from an address no peer has (yet)

    def _on_tcp_readable(self, reader: Reader) -> None:
        peer_id = next(iter(reader.peers), None)
        peer = self._peers.get(peer_id) if peer_id is not None else None
        if peer is None or peer.reader is not reader:
            return
        sock = reader.sock
        for _ in range(_RX_BATCH):
            try:
                data = rxbuf.recv(sock, _TCP_RX_BUF, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno == errno.EBADF:
                    # the kernel already dropped the peer (its PEER_DEL_NTF follows): stop reading
                    log.debug("kernel data channel: TCP peer %d detached by the kernel", peer.peer_id)
                    if self._loop is not None:
                        self._loop.remove_reader(reader.fd)
                    return
                log.info("kernel data channel: TCP peer %d: %s", peer.peer_id, e)
                self._lost(peer, _tcp_end_reason(e))
                return
            if not data:
                self._lost(peer, api.PeerDelReason.TRANSPORT_DISCONNECT)
                return
            if len(data) < 2:
                continue
            size = _FRAME_LEN.unpack_from(data)[0]
            packet = data[2:]
            if size != len(packet):
                log.debug("kernel data channel: TCP frame says %d bytes, got %d", size, len(packet))
                packet = packet[:size]
            if packet:
                self._emit(api.ControlPacket(peer.peer_id, packet, None))
