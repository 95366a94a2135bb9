"""Data-path pieces the in-process userspace backend and the offload engine's workers share.

Both move the same packets over the same sockets: TCP frames are a u16 length before each
packet, UDP GSO sends trains of equal-size datagrams with a ``UDP_SEGMENT`` cmsg, UDP GRO hands
coalesced datagrams up with their size in a cmsg. The framing constants, the reading of a GRO
cmsg, the splitting of a TCP receive buffer into frames and the reaction to a refused GSO send
live here once. Only code that runs once per receive, per buffer or on an error path is shared:
the per-packet loops stay inline in each data plane.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import sys
from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol, TypeVar

from pyovpn.datachannel.api import Framing, PeerDelReason, Stats
from pyovpn.datachannel.crypto import PING_MAGIC, KeyState, PacketIdExhaustedError
from pyovpn.datachannel.fragment import WHOLE_HEADER, Fragmenter, FragmentError, Reassembler
from pyovpn.datachannel.framing import frame_payload
from pyovpn.net.sockets import SOL_UDP, TCP_DISCONNECT_ERRNOS, UDP_GRO

__all__ = [
    "FRAME_LEN",
    "GRO_CMSG_SPACE",
    "GSO_MAX_BYTES",
    "GSO_MAX_SEGMENTS",
    "GSO_SIZE",
    "KA_QUANTUM",
    "LANE_MAX_DELAY",
    "TCP_RX_CHUNK",
    "TCP_TX_HIGH_WATER",
    "GsoPeer",
    "PingPeer",
    "count",
    "gro_segment_size",
    "gso_train_refused",
    "reassemble",
    "seal_ping",
    "take_frames",
    "tcp_error_reason",
]

FRAME_LEN: Final = struct.Struct(">H")  # TCP framing: u16 length || packet
GSO_SIZE: Final = struct.Struct("=H")  # the UDP_SEGMENT cmsg is a native u16
GRO_CMSG_SPACE: Final = socket.CMSG_SPACE(4)  # the UDP_GRO cmsg is a native int
GSO_MAX_SEGMENTS: Final = 64  # UDP_MAX_SEGMENTS on older kernels; newer ones allow more
GSO_MAX_BYTES: Final = 65000  # stay below the 64 KiB IP datagram limit with headers
TCP_RX_CHUNK: Final = 262144
TCP_TX_HIGH_WATER: Final = 1 << 20  # drop data (never control) frames above this backlog
# keepalive timers fire on multiples of this many seconds: a thousand clients pinging every
# 10 s cost four wakeups a second instead of a hundred (OpenVPN's own timers have 1 s steps)
KA_QUANTUM: Final = 0.25
# MP: pings on the keepalive lane wait at most this long (the keepalive timer drains the lane
# first, so a waiting ping still counts before its peer could expire)
LANE_MAX_DELAY: Final = 1.0


class GsoPeer(Protocol):
    """What :func:`gso_train_refused` needs of a peer."""

    peer_id: int
    gso_max: int  # use UDP GSO for datagrams smaller than this; 0 = never
    stats: Stats


class PingPeer(Protocol):
    """What :func:`seal_ping` needs of a peer."""

    keys: list[KeyState | None]  # [primary, secondary]
    tx_peer_id: int
    stats: Stats
    framing: Framing  # pings are framed like every other payload (OpenVPN frames before encrypting)
    frag: Fragmenter | None  # with `fragment`, a ping carries the whole-packet header too


_P = TypeVar("_P", bound=PingPeer)


def count(stats: Stats, name: str, n: int = 1) -> None:
    """Add ``n`` to the extra counter ``name`` (drop reasons and the like)."""
    stats.extra[name] = stats.extra.get(name, 0) + n


def reassemble(
    stats: Stats, reasm: Reassembler, payload: bytes, now: float, log: logging.Logger, who: str, peer_id: int
) -> bytes | None:
    """`fragment`: an opened ``payload`` joins its packet; the whole packet once it is complete,
    else None (more to come, or a bad fragment, which is counted and dropped)."""
    try:
        return reasm.add(payload, now)
    except FragmentError as e:
        stats.dropped_other += 1
        count(stats, "rx_bad_fragment")
        log.debug("%s: peer %d: %s", who, peer_id, e)
        return None


def gro_segment_size(anc: list[tuple[int, int, bytes]]) -> int:
    """The datagram size of a coalesced UDP GRO receive from its ancillary data; 0 if absent."""
    seg = 0
    for level, kind, data in anc:
        if level == SOL_UDP and kind == UDP_GRO and len(data) >= 4:
            seg = int.from_bytes(data[:4], sys.byteorder)
    return seg


def gso_train_refused(
    peer: GsoPeer, size: int, segments: int, err: OSError, log: logging.Logger, who: str
) -> bool:
    """A GSO send of ``segments`` datagrams of ``size`` bytes failed with ``err``.

    True: the socket is full, the train is dropped (and counted). False: send its datagrams
    one by one; GSO stays on for smaller datagrams if these did not fit the path MTU, else the
    route or device cannot segment at all and it is off for the peer.
    """
    if err.errno in (errno.EAGAIN, errno.ENOBUFS):
        count(peer.stats, "tx_dropped", segments)
        return True
    if err.errno in (errno.EINVAL, errno.EMSGSIZE):
        peer.gso_max = min(peer.gso_max, size)
    else:
        peer.gso_max = 0
    log.info("%s: UDP GSO off for peer %d at %d-byte segments: %s", who, peer.peer_id, size, err)
    count(peer.stats, "gso_fallbacks")
    return False


def seal_ping(peer: _P, key_exhausted: Callable[[_P, KeyState], None]) -> bytes | None:
    """A keepalive ping under the peer's primary key (counted), or None without a usable one.

    A key whose packet ids ran out is handed to ``key_exhausted`` (which kills it and says so).
    """
    ks = peer.keys[0]
    if ks is None:
        return None
    try:
        payload = PING_MAGIC if peer.framing is Framing.NONE else frame_payload(peer.framing, PING_MAGIC)
        if peer.frag is not None:
            payload = WHOLE_HEADER + payload
        packet = ks.encrypt(payload, peer.tx_peer_id)
    except PacketIdExhaustedError:
        key_exhausted(peer, ks)
        return None
    count(peer.stats, "keepalive_tx")
    return packet


def debug_hook(peer: PingPeer, what: str, args: Mapping[str, Any]) -> bytes | None:
    """The test hooks on a peer's primary key (``Capabilities.hooks``); ValueError if not possible.

    ``set_tx_pid`` moves the packet-id counter (key exhaustion without 2**32 packets),
    ``encrypt`` seals a payload as the peer would send it.
    """
    ks = peer.keys[0]
    if ks is None:
        raise ValueError("no primary key")
    if what == "set_tx_pid":
        ks.tx_packet_id = args["value"]
        return None
    if what == "encrypt":
        return ks.encrypt(args["payload"], peer.tx_peer_id)
    raise ValueError(f"unknown debug hook {what!r}")


def take_frames(buf: bytearray) -> tuple[list[bytearray], int | None]:
    """Cut the whole TCP frames off the front of a receive buffer, packets without their length.

    The second value is the length of a frame shorter than 2 bytes, else None: the kernel's
    strparser refuses such frames and aborts the stream, so the caller drops the connection
    after handling the frames before it (the buffer is then left as it was).
    """
    end_all = len(buf)
    off = 0
    frames: list[bytearray] = []
    while end_all - off >= 2:
        size = (buf[off] << 8) | buf[off + 1]
        if size < 2:
            return frames, size
        end = off + 2 + size
        if end > end_all:
            break
        frames.append(buf[off + 2 : end])  # a copy: the buffer is trimmed below
        off = end
    if off:
        del buf[:off]
    return frames, None


def tcp_error_reason(err: OSError) -> PeerDelReason:
    """Why a TCP peer is deleted after its stream failed with ``err``."""
    if err.errno in TCP_DISCONNECT_ERRNOS:
        return PeerDelReason.TRANSPORT_DISCONNECT
    return PeerDelReason.TRANSPORT_ERROR
