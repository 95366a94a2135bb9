"""The P2MP server's TCP side (`proto tcp-server`): the listening socket and one framed stream per
client, read and written here until the client's tunnel is up and the data channel takes the
connection over (``NewPeer`` with the socket and the bytes read past the last whole frame).

Over TCP the connection itself proves the client's address, so, as in OpenVPN, there is no
stateless cookie exchange: the first packet of a stream starts a session at once. What bounds
the state a stranger can make is the number of connections that have not come up yet
(:data:`MAX_PENDING`) and the time each may take (``hand-window``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from pyovpn.config import Options
from pyovpn.datachannel.api import normalize_address
from pyovpn.edge import sockets
from pyovpn.errors import ProtocolError
from pyovpn.net import rxbuf
from pyovpn.proto.packets import StreamFramer, frame

log = logging.getLogger("pyovpn")

Addr = tuple[str, int]
# connections that have not handed over yet; beyond this new ones are closed at once
MAX_PENDING = 256
# a control-channel burst that does not fit the socket waits here; beyond it the client is dropped
MAX_QUEUED = 1 << 20
_RECV = 65536


@dataclass(eq=False)
class TcpLink:
    sock: socket.socket
    addr: Addr
    framer: StreamFramer = field(default_factory=StreamFramer)
    out: bytearray = field(default_factory=bytearray)  # frames the socket has not taken yet
    handed_over: bool = False
    timer: asyncio.TimerHandle | None = None


class TcpLinks:
    """The listening socket and the client streams the control plane still reads itself.

    ``on_packet(packet, addr)`` gets every control packet read; ``on_closed(addr, reason)``
    is told when a stream ends before its hand-over.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_packet: Callable[[bytes, Addr], None],
        on_closed: Callable[[Addr, str], None],
        *,
        hand_window: float,
        is_up: Callable[[Addr], bool],
    ) -> None:
        self.loop = loop
        self.on_packet = on_packet
        self.on_closed = on_closed
        self.hand_window = hand_window
        self.is_up = is_up
        self.listener: socket.socket | None = None
        self.links: dict[Addr, TcpLink] = {}

    # ------------------------------------------------------------------ listening

    def listen(self, opts: Options) -> socket.socket:
        """Bind and listen now (a port in use fails at start); :meth:`accept` starts taking clients."""
        lsock = sockets.listen_tcp(opts, backlog=128)
        self.listener = lsock
        return lsock

    def accept(self) -> None:
        """Take connections from now on (those that arrived since :meth:`listen` waited in the backlog)."""
        assert self.listener is not None
        self.loop.add_reader(self.listener.fileno(), self._on_accept)

    def _pending(self) -> int:
        return sum(1 for link in self.links.values() if not link.handed_over)

    def _on_accept(self) -> None:
        assert self.listener is not None
        for _ in range(64):
            try:
                sock, sa = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("TCP accept failed: %s", exc)
                return
            addr = normalize_address(sa[:2])
            if self._pending() >= MAX_PENDING:
                log.warning("TCP connection from %s refused: %d others still handshaking", addr, MAX_PENDING)
                sock.close()
                continue
            old = self.links.get(addr)
            if old is not None:  # the same address and port again: the old stream is gone
                self.close(addr, "replaced by a new connection from the same address")
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = TcpLink(sock, addr)
            self.links[addr] = link
            link.timer = self.loop.call_later(self.hand_window, self._check_came_up, link)
            self.loop.add_reader(sock.fileno(), self._on_readable, link)
            log.info("TCP connection established with %s:%d", *addr)

    def _check_came_up(self, link: TcpLink) -> None:
        link.timer = None
        if self.links.get(link.addr) is link and not link.handed_over and not self.is_up(link.addr):
            self._lost(link, f"no tunnel within hand-window ({self.hand_window:.0f} s)")

    # ------------------------------------------------------------------ one stream

    def _on_readable(self, link: TcpLink) -> None:
        for _ in range(16):
            if self.links.get(link.addr) is not link or link.handed_over:
                return
            try:
                data = rxbuf.recv(link.sock, _RECV)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._lost(link, f"connection error: {exc.strerror or exc}")
                return
            if not data:
                self._lost(link, "connection reset by peer (TCP EOF)")
                return
            try:
                packets = link.framer.feed(data)
            except ProtocolError as exc:
                self._lost(link, str(exc))
                return
            for packet in packets:
                self.on_packet(packet, link.addr)
                if link.handed_over or self.links.get(link.addr) is not link:
                    return

    def _on_writable(self, link: TcpLink) -> None:
        self._flush(link)

    def _flush(self, link: TcpLink) -> None:
        try:
            sent = link.sock.send(link.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._lost(link, f"connection error: {exc.strerror or exc}")
            return
        del link.out[:sent]
        if not link.out:
            self.loop.remove_writer(link.sock.fileno())

    def send(self, addr: Addr, packet: bytes) -> bool:
        """Queue one control packet on a stream we still own; False if there is none."""
        link = self.links.get(addr)
        if link is None or link.handed_over:
            return False
        pending = bool(link.out)
        link.out += frame(packet)
        if len(link.out) > MAX_QUEUED:
            self._lost(link, "the client does not read its control channel")
            return True
        if not pending:
            self._flush(link)
            if link.out:
                self.loop.add_writer(link.sock.fileno(), self._on_writable, link)
        return True

    def owns(self, addr: Addr) -> bool:
        link = self.links.get(addr)
        return link is not None and not link.handed_over

    def hand_over(self, addr: Addr, timeout: float = 5.0) -> tuple[int, bytes]:
        """Stop reading and writing ``addr``'s stream; its descriptor and unframed bytes for NewPeer.

        Frames still queued go out first (blocking, bounded by ``timeout``): the data channel
        starts writing at a frame boundary.
        """
        link = self.links[addr]
        link.handed_over = True
        fd = link.sock.fileno()
        self.loop.remove_reader(fd)
        if link.out:
            self.loop.remove_writer(fd)
            link.sock.settimeout(timeout)
            try:
                link.sock.sendall(link.out)
            finally:
                link.sock.setblocking(False)
            link.out.clear()
        if link.timer is not None:
            link.timer.cancel()
            link.timer = None
        return fd, link.framer.take_backlog()

    # ------------------------------------------------------------------ closing

    def _lost(self, link: TcpLink, reason: str) -> None:
        self.close(link.addr, reason)
        self.on_closed(link.addr, reason)

    def close(self, addr: Addr, reason: str = "") -> None:
        link = self.links.pop(addr, None)
        if link is None:
            return
        if link.timer is not None:
            link.timer.cancel()
        fd = link.sock.fileno()
        if fd >= 0 and not link.handed_over:
            self.loop.remove_reader(fd)
            self.loop.remove_writer(fd)
        if reason:
            log.debug("TCP connection with %s:%d closed: %s", *addr, reason)
        link.sock.close()

    def close_all(self) -> None:
        for addr in list(self.links):
            self.close(addr)
        if self.listener is not None:
            with contextlib.suppress(OSError, ValueError):
                self.loop.remove_reader(self.listener.fileno())
            self.listener.close()
            self.listener = None
