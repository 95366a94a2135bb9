"""The P2P stranger filter: a socket program that drops, in the kernel, what only our peer may send.

A P2P UDP endpoint talks to one remote. From any other address it still has to take three kinds
of datagram: a client's hard reset (a client that restarted comes back from a new port; key id 0
and long enough, :data:`~pyovpn.proto.packets.STRANGER_FIRST_BYTES`), and data packets that may
float the peer (DATA_V1, and DATA_V2 carrying our peer's id); everything else from a stranger is
dropped anyway (the backends' ``drops_strangers``). Dropping it in the backend still costs a
wakeup and Python's per-datagram work, which under a flood of garbage is most of the CPU. A
classic BPF program attached with ``SO_ATTACH_FILTER`` makes the same decision before the
datagram is queued: random garbage reaches the process about 10 times in 256 (the first bytes
we must let through), and nothing from the peer's own address is ever held back. The kernel
counts what the program drops as socket drops (``/proc/net/udp``, ``SO_MEMINFO``).

The program has to follow the peer: :func:`guard` is called whenever the remote changes (new
peer, SetPeer, float) and :func:`unguard` when the socket is given back, because the control
plane then reads the socket itself and must see every packet of a new handshake from anyone.

For a UDP socket the program's data starts at the UDP header: the source port is at 0, the
payload at 8, and the IP header is reached through ``NET_OFF``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import struct
from typing import Protocol

from pyovpn.net import cbpf
from pyovpn.net.cbpf import (
    ALU_AND_K,
    ALU_RSH_K,
    JEQ_K,
    JGE_K,
    LD_B_ABS,
    LD_H_ABS,
    LD_W_ABS,
    LD_W_LEN,
    NET_OFF,
    RET_K,
)
from pyovpn.proto.packets import MIN_FIRST_PACKET_LEN, OPCODE_DATA_V1, OPCODE_DATA_V2, STRANGER_FIRST_BYTES

__all__ = ["FilteredPeer", "follow", "guard", "program", "socket_drops", "unguard"]

log = logging.getLogger(__name__)

SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
SO_MEMINFO = 55
_SK_MEMINFO = struct.Struct("=9I")  # SK_MEMINFO_DROPS is the last field
_PAYLOAD = 8  # after the UDP header
_KEEP = 0xFFFFFFFF  # "keep the whole datagram"
_DROP = 0

# jump targets by name, resolved by _assemble
_Op = tuple[int, str | int, str | int, int]


def _assemble(ops: list[_Op | str]) -> list[cbpf.Insn]:
    """Resolve label names in jt/jf (a string in ``ops`` marks the next instruction's label)."""
    labels: dict[str, int] = {}
    insns: list[_Op] = []
    for op in ops:
        if isinstance(op, str):
            labels[op] = len(insns)
        else:
            insns.append(op)
    out: list[cbpf.Insn] = []
    for i, (code, jt, jf, k) in enumerate(insns):
        rel = [labels[j] - i - 1 if isinstance(j, str) else j for j in (jt, jf)]
        out.append((code, rel[0], rel[1], k))
    return out


def program(remote_ip: str, remote_port: int, peer_id: int) -> list[cbpf.Insn]:
    """The filter for a peer at ``remote_ip`` (as recvfrom() spells it) and ``remote_port``."""
    ip = ipaddress.ip_address(remote_ip.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack socket receives it with an IPv4 header
    ops: list[_Op | str] = [(LD_B_ABS, 0, 0, _PAYLOAD)]  # (an empty datagram ends the program: dropped)
    for first_byte in sorted(STRANGER_FIRST_BYTES):
        ops.append((JEQ_K, "first packet", 0, first_byte))
    ops += [
        (ALU_RSH_K, 0, 0, 3),  # the opcode
        (JEQ_K, "keep", 0, OPCODE_DATA_V1),
        (JEQ_K, 0, "from", OPCODE_DATA_V2),
        (LD_W_ABS, 0, 0, _PAYLOAD),
        (ALU_AND_K, 0, 0, 0xFFFFFF),  # the peer id
        (JEQ_K, "keep", "from", peer_id),
        "first packet",
        (LD_W_LEN, 0, 0, 0),
        (JGE_K, "keep", "from", _PAYLOAD + MIN_FIRST_PACKET_LEN),
        "from",  # anything else only from the peer's own address
        (LD_H_ABS, 0, 0, 0),  # UDP source port
        (JEQ_K, 0, "drop", remote_port),
        (LD_B_ABS, 0, 0, NET_OFF),
        (ALU_RSH_K, 0, 0, 4),  # IP version
    ]
    if ip.version == 4:
        ops += [(JEQ_K, 0, "drop", 4), (LD_W_ABS, 0, 0, NET_OFF + 12)]
        ops.append((JEQ_K, "keep", "drop", int(ip)))
    else:
        ops += [(JEQ_K, 0, "drop", 6)]
        words = [(int(ip) >> (96 - 32 * i)) & 0xFFFFFFFF for i in range(4)]
        for i, word in enumerate(words):
            ops.append((LD_W_ABS, 0, 0, NET_OFF + 8 + 4 * i))
            ops.append((JEQ_K, "keep" if i == 3 else 0, "drop", word))
    ops += ["keep", (RET_K, 0, 0, _KEEP), "drop", (RET_K, 0, 0, _DROP)]
    return _assemble(ops)


def guard(sock: socket.socket, remote_ip: str | None, remote_port: int, peer_id: int) -> bool:
    """Attach (or replace) the filter for the peer's current address; False if it could not be.

    Without it nothing is lost but speed: the backend's own check drops the same datagrams.
    """
    if remote_ip is None or sock.type != socket.SOCK_DGRAM:
        return False
    try:
        fprog, _keep = cbpf.fprog(program(remote_ip, remote_port, peer_id))
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    except (OSError, ValueError) as exc:
        log.debug("stranger filter: not attached (%s); the data path drops strangers itself", exc)
        return False
    return True


class FilteredPeer(Protocol):
    """A P2P UDP peer as the backends keep it."""

    sock: socket.socket
    raw_ip: str | None
    raw_port: int
    peer_id: int


def follow(peer: FilteredPeer) -> bool:
    """:func:`guard` the peer's socket for its current remote (call on new peer, SetPeer, float)."""
    return guard(peer.sock, peer.raw_ip, peer.raw_port, peer.peer_id)


def unguard(sock: socket.socket) -> None:
    """Remove the filter (none attached is fine)."""
    if sock.fileno() < 0:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)


def socket_drops(sock: socket.socket) -> int:
    """Datagrams the kernel dropped at this socket so far: the filter's, and any for a full buffer."""
    drops: int = _SK_MEMINFO.unpack(sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, _SK_MEMINFO.size))[-1]
    return drops
