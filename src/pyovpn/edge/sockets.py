"""Transport sockets for the edge: address family and bind address from the options, name
resolution, and opening a UDP socket, a TCP client, a one-peer TCP server and the P2MP server socket.

Every failure comes back as a :class:`pyovpn.edge.stop.Stop` saying whether to retry
(an unreachable or unresolvable peer) or give up (a port that cannot be bound).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from typing import Any

from pyovpn.config import Options
from pyovpn.datachannel.api import normalize_address
from pyovpn.edge.sockopts import apply_socket_options
from pyovpn.edge.stop import Stop
from pyovpn.proto.packets import frame

log = logging.getLogger("pyovpn")

Addr = tuple[str, int]
#: (host, port, family) of one connection-list entry; family 4/6 when its proto forces one
Target = tuple[str, int, int | None]
TCP_CONNECT_TIMEOUT = 10.0


def listen_family(opts: Options) -> int:
    """AF_INET6 (dual-stack unless udp6/tcp6) by default; AF_INET for udp4/tcp4 or an IPv4 ``local``."""
    if opts.family == 4:
        return socket.AF_INET
    if opts.local:
        try:
            return socket.AF_INET if ipaddress.ip_address(opts.local).version == 4 else socket.AF_INET6
        except ValueError:
            return int(socket.getaddrinfo(opts.local, None)[0][0])
    return socket.AF_INET6


def bind_address(opts: Options, af: int) -> Addr:
    port = 0 if opts.nobind else (opts.lport if opts.lport is not None else opts.port)
    host = opts.local or ("::" if af == socket.AF_INET6 else "0.0.0.0")
    return host, port


def is_dual_stack(opts: Options, af: int) -> bool:
    """An IPv6 socket also takes IPv4 (mapped) unless the config asked for IPv6 only."""
    return af == socket.AF_INET6 and opts.family != 6


def resolve(host: str, port: int, family: int | None, stype: int) -> tuple[int, Addr]:
    """The first address for ``host``; a name that does not resolve is worth a retry."""
    fam = {4: socket.AF_INET, 6: socket.AF_INET6}.get(family or 0, socket.AF_UNSPEC)
    try:
        infos = socket.getaddrinfo(host, port, fam, stype)
    except socket.gaierror as exc:
        raise Stop.restart(f"cannot resolve remote {host}: {exc}") from None
    af, _, _, _, sa = infos[0]
    return int(af), (str(sa[0]), int(sa[1]))


def first_remote(opts: Options, stype: int, target: Target | None = None) -> tuple[int, Addr] | None:
    """The resolved ``target`` if given, else the first ``remote`` (its own port, else the global
    one), or None."""
    if target is not None:
        host, port, family = target
        return resolve(host, port, family or opts.family, stype)
    if not opts.remotes:
        return None
    r = opts.remotes[0]
    return resolve(r.host, r.port or opts.rport or opts.port, opts.family, stype)


def _bound(opts: Options, af: int, stype: int, what: str) -> socket.socket:
    """A socket of ``af``/``stype`` bound where the options say; a failure to bind is fatal."""
    sock = socket.socket(af, stype)
    apply_socket_options(sock, opts)
    if is_dual_stack(opts, af):
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    address = bind_address(opts, af)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise Stop.fatal(f"cannot bind {what} {address}: {exc.strerror}") from None
    return sock


def open_udp(opts: Options, target: Target | None = None) -> tuple[socket.socket, Addr | None]:
    """The P2P UDP socket and the peer to talk to (None: wait for the peer to come to us)."""
    found = first_remote(opts, socket.SOCK_DGRAM, target)
    af, remote = found if found else (listen_family(opts), None)
    sock = _bound(opts, af, socket.SOCK_DGRAM, "UDP")
    if af == socket.AF_INET6 and remote and "." in remote[0]:
        remote = ("::ffff:" + remote[0], remote[1])
    sock.setblocking(False)
    log.info(
        "UDP link local: %s, remote: %s",
        normalize_address(sock.getsockname()[:2]),
        remote or "[undef] (waiting for the peer)",
    )
    return sock, remote


async def open_tcp_client(
    opts: Options, target: Target | None = None, timeout: float = TCP_CONNECT_TIMEOUT
) -> tuple[socket.socket, Addr]:
    """A connected TCP socket to ``target`` (default: the first remote); a refused or slow
    (``timeout``) connect is worth a retry."""
    found = first_remote(opts, socket.SOCK_STREAM, target)
    if found is None:
        raise Stop.fatal("tcp-client needs a remote")
    af, remote = found
    sock = socket.socket(af, socket.SOCK_STREAM)
    apply_socket_options(sock, opts)
    sock.setblocking(False)
    if opts.local or (not opts.nobind and opts.lport):
        sock.bind(bind_address(opts, af))
    log.info("Attempting to establish TCP connection with %s", remote)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, remote), timeout)
    except (OSError, TimeoutError) as exc:
        sock.close()
        raise Stop.restart(f"TCP connection to {remote} failed: {exc}") from None
    except asyncio.CancelledError:  # a signal ended the attempt
        sock.close()
        raise
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    log.info("TCP connection established with %s", remote)
    return sock, remote


def listen_tcp(opts: Options, backlog: int) -> socket.socket:
    """A non-blocking TCP socket listening where the options say; a failure to bind is fatal."""
    lsock = _bound(opts, listen_family(opts), socket.SOCK_STREAM, "TCP")
    lsock.listen(backlog)
    lsock.setblocking(False)
    log.info("Listening for incoming TCP connection on %s", normalize_address(lsock.getsockname()[:2]))
    return lsock


async def accept_tcp_peer(opts: Options) -> tuple[socket.socket, Addr]:
    """Listen, take the first TCP connection and stop listening: OpenVPN's one-peer TCP server."""
    lsock = listen_tcp(opts, 1)
    try:
        sock, sa = await asyncio.get_running_loop().sock_accept(lsock)
    finally:
        lsock.close()
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    remote = normalize_address(sa[:2])
    log.info("TCP connection established with %s", remote)
    return sock, remote


def bind_server_socket(af: int, address: tuple[Any, ...], dual_stack: bool) -> socket.socket:
    """The server's UDP socket, bound with ``SO_REUSEPORT`` so a data channel may add a lane to it.

    A probe without ``SO_REUSEPORT`` binds first: a port another program (or another pyovpn)
    already holds still fails with EADDRINUSE instead of silently sharing its traffic.
    """

    def fresh() -> socket.socket:
        sock = socket.socket(af, socket.SOCK_DGRAM)
        if dual_stack:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        return sock

    with fresh() as probe:
        probe.bind(address)
    sock = fresh()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def open_server_udp(opts: Options) -> socket.socket:
    """The P2MP server's shared UDP socket (see :func:`bind_server_socket`); failing to bind is fatal."""
    af = listen_family(opts)
    address = bind_address(opts, af)
    try:
        sock = bind_server_socket(af, address, is_dual_stack(opts, af))
    except OSError as exc:
        raise Stop.fatal(f"cannot bind UDP {address}: {exc.strerror}") from None
    apply_socket_options(sock, opts)
    return sock


def send_control(
    sock: socket.socket, packet: bytes, remote: Addr | None = None, *, stream: bool = False
) -> OSError | None:
    """Send one control packet (to ``remote``, or on a connected socket; length-framed on a stream).

    A full socket buffer drops it: the control channel's reliability layer sends it again.
    Any other failure is returned for the caller to report, as it sees fit.
    """
    try:
        if stream:
            sock.sendall(frame(packet))
        elif remote is not None:
            sock.sendto(packet, remote)
        else:
            sock.send(packet)
    except BlockingIOError:
        log.debug("socket busy; control packet dropped (it will be retransmitted)")
    except OSError as exc:
        return exc
    return None
