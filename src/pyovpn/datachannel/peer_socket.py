"""The transport socket a ``NewPeer`` hands over: the checks and set-up every userspace data plane does.

The in-process userspace backend and the offload engine's controller both take a descriptor
from the control plane, must refuse the same commands with the same words (as the kernel's
extack would), switch the socket to non-blocking with UDP GRO on, give it back as they found it
when the peer goes, and turn a remote ``(ip, port)`` into what ``sendto()`` and the float check
compare against. That logic lives here once; each backend keeps its own peer object, which
only has to carry the attributes of :class:`RemotePeer`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from collections.abc import Container, Iterable
from typing import Any, Protocol

from pyovpn.datachannel import strangers
from pyovpn.datachannel.api import Address, NewPeer, Transport
from pyovpn.datachannel.validate import check_keepalive, check_new_peer_transport, check_socket_kind
from pyovpn.errors import BackendError
from pyovpn.net.sockets import SOL_UDP, UDP_GRO, UDP_SEGMENT, scope_index, socket_key
from pyovpn.proto.packets import UNDEF_PEER_ID

__all__ = [
    "RemotePeer",
    "adopt_socket",
    "check_new_peer",
    "check_own_connection",
    "check_peer_id_free",
    "check_socket",
    "give_back",
    "gso_supported",
    "set_remote",
    "take_over",
]


class RemotePeer(Protocol):
    """A peer as :func:`set_remote` updates it."""

    sock: socket.socket
    remote: Address | None  # as the API reports it (v4-mapped IPv6 shown as IPv4)
    send_addr: tuple[Any, ...] | None  # what sendto() takes
    raw_ip: str | None  # the remote as recvfrom() spells it, for a cheap float check
    raw_port: int


def check_new_peer(what: str, cmd: NewPeer, *, multipoint: bool) -> int:
    """The checks of a ``NewPeer`` that need no socket; returns the peer id to transmit with."""
    if not 0 <= cmd.peer_id < UNDEF_PEER_ID:
        raise BackendError(f"{what}: peer id {cmd.peer_id} out of range 0..0xFFFFFE")
    tx_id = cmd.peer_id if cmd.tx_peer_id is None else cmd.tx_peer_id
    if not 0 <= tx_id <= UNDEF_PEER_ID:
        raise BackendError(f"{what}: tx peer id {tx_id} out of range 0..0xFFFFFF")
    if not multipoint and (cmd.vpn_ipv4 is not None or cmd.vpn_ipv6 is not None):
        raise BackendError(f"{what}: VPN IPs are not allowed in P2P mode (the kernel rejects them too)")
    if multipoint and cmd.vpn_ipv4 is None and cmd.vpn_ipv6 is None:
        raise BackendError(f"{what}: an MP peer needs vpn_ipv4 or vpn_ipv6 (the kernel requires one too)")
    check_keepalive(what, cmd.keepalive_interval, cmd.keepalive_timeout)
    check_new_peer_transport(cmd)
    if cmd.transport is Transport.TCP and cmd.local_ip is not None:
        raise BackendError(f"{what}: local_ip applies to UDP peers only")
    return tx_id


def check_peer_id_free(what: str, peer_id: int, existing: Container[int]) -> None:
    """MP: a peer id names one peer at a time (P2P replaces the old peer instead)."""
    if peer_id in existing:
        raise BackendError(f"{what}: peer id {peer_id} already exists (delete it first)")


def check_own_connection(what: str, key: tuple[int, int], tcp_peers: Iterable[tuple[int, int]]) -> None:
    """MP: a TCP peer's socket (``key``, see :func:`~pyovpn.net.sockets.socket_key`) must not
    carry another peer; ``tcp_peers``: ``(peer id, socket fd)`` of the TCP peers already there."""
    for peer_id, fd in tcp_peers:
        if socket_key(fd) == key:
            raise BackendError(
                f"{what}: the TCP socket already carries peer {peer_id}; "
                "every TCP peer needs its own connection"
            )


def adopt_socket(what: str, cmd: NewPeer, fd: int | None = None) -> socket.socket:
    """A socket object on ``fd`` (our copy of ``cmd.socket_fd``, closed on failure), or on a new dup."""
    try:
        if fd is None:
            fd = os.dup(cmd.socket_fd)
        return socket.socket(fileno=fd)
    except OSError as e:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise BackendError(f"{what}: socket fd {cmd.socket_fd} is not usable: {e.strerror or e}") from None


def check_socket(what: str, cmd: NewPeer, peer: RemotePeer) -> None:
    """The peer's socket must be an IPv4/IPv6 socket of the command's transport, a TCP one
    connected; a UDP peer is pointed at the command's remote."""
    check_socket_kind(what, cmd.transport, peer.sock)
    if cmd.transport is Transport.UDP:
        assert cmd.remote is not None  # check_new_peer saw to it
        set_remote(what, peer, cmd.remote)


def set_remote(what: str, peer: RemotePeer, remote: Address) -> None:
    """Point a UDP peer at ``remote``, spelled for its socket's address family."""
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


def take_over(sock: socket.socket, transport: Transport, *, want_gro: bool) -> tuple[bool, bool]:
    """Make the socket non-blocking (and a UDP one coalesce with GRO if wanted and offered).

    Returns ``(was_blocking, gro)``: O_NONBLOCK lives on the file description the caller
    shares with us, so :func:`give_back` restores it.
    """
    was_blocking = os.get_blocking(sock.fileno())
    sock.setblocking(False)
    gro = False
    if transport is Transport.UDP and want_gro:
        try:
            sock.setsockopt(SOL_UDP, UDP_GRO, 1)
            gro = True
        except OSError:
            gro = False
    return was_blocking, gro


def gso_supported(sock: socket.socket) -> bool:
    """Whether the kernel offers UDP GSO (``UDP_SEGMENT``) on this socket."""
    try:
        sock.getsockopt(SOL_UDP, UDP_SEGMENT)
    except OSError:
        return False
    return True


def give_back(sock: socket.socket, *, blocking: bool, gro: bool) -> None:
    """Undo :func:`take_over` on a socket that is still open (the caller closes it)."""
    if sock.fileno() < 0:
        return
    strangers.unguard(sock)  # the control plane reads the socket again: it must see everyone
    if gro:
        with contextlib.suppress(OSError):
            sock.setsockopt(SOL_UDP, UDP_GRO, 0)
    with contextlib.suppress(OSError):
        os.set_blocking(sock.fileno(), blocking)
