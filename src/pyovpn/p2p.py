"""The one-peer connection (``mode p2p``, and a client of a P2MP server): one socket, one
sans-I/O :class:`Session`, until the tunnel ends.

It owns the transport socket until the tunnel is up, then hands it to the data-channel
backend (``NewPeer``) exactly as OpenVPN hands it to the kernel; from then on control
packets arrive as ``ControlPacket`` notifications and leave through ``SendControl``.
Everything it needs from the daemon comes through :class:`pyovpn.edge.host.PeerHost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
from typing import Any

from pyovpn.connlist import ConnectionList, GiveUp, randomized_hostname
from pyovpn.datachannel import api
from pyovpn.datachannel.api import Notification, PeerDelReason, Transport
from pyovpn.datachannel.api import normalize_address as _addr
from pyovpn.edge import backendfit, compression, sockets
from pyovpn.edge.host import PeerHost
from pyovpn.edge.instance import Instance
from pyovpn.edge.stop import Stop, StopReason
from pyovpn.errors import BackendError, ConfigError, PyovpnError
from pyovpn.net import rxbuf
from pyovpn.proto.packets import DATA_OPCODES, STRANGER_CONTROL_OPCODES, StreamFramer
from pyovpn.proto.session import PeerRestarted, Session, SessionClosed, TunnelUp
from pyovpn.scripts import ScriptFailed

log = logging.getLogger("pyovpn")

EXIT_FLUSH_SECONDS = 1.0
RECV_BATCH = 64

# why the data channel dropped our peer, as the log says it
_PEER_DELETED = {
    PeerDelReason.EXPIRED: "Inactivity timeout (--ping-restart), restarting",
    PeerDelReason.TRANSPORT_DISCONNECT: "connection reset by peer, restarting",
    PeerDelReason.TRANSPORT_ERROR: "transport error, restarting",
}

Command = TunnelUp | api.NewKey | api.SwapKeys | api.DelKey | api.SendControl


class Connection(Instance[Command]):
    """One session attempt: socket, handshake, tunnel, until it ends."""

    def __init__(
        self,
        host: PeerHost,
        first_packet: tuple[bytes, tuple[str, int] | None] | None = None,
        connlist: ConnectionList | None = None,
    ) -> None:
        super().__init__()
        self.host = host
        self.opts = host.opts
        #: the client's connection list, already advanced to the entry this attempt uses
        self.connlist = connlist
        self.proto = connlist.current.proto if connlist is not None else self.opts.proto
        self.transport = Transport.TCP if self.proto.startswith("tcp") else Transport.UDP
        self._heard_from_peer = False
        self.remote: tuple[str, int] | None = None
        self.session: Session | None = None
        self.handed_over = False
        self.peer_id: int | None = None
        self.tunnel: TunnelUp | None = None
        self.connected_since = 0.0
        self.rekeys = 0
        self._auth_token: str | None = None  # the last auth-token the server pushed or renewed
        self.first_packet = first_packet
        self._last_source: tuple[str, int] | None = None
        self.framer = StreamFramer()
        self._timer: asyncio.TimerHandle | None = None
        self._poll_timer: asyncio.TimerHandle | None = None
        self._inactivity: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------ setup

    async def _open_socket(self) -> None:
        target = self._resolve_entry()
        poll = float(self.connlist.current.server_poll_timeout) if self.connlist else None
        if self.transport is Transport.UDP:
            sock, self.remote = sockets.open_udp(self.opts, target)
        elif self.proto == "tcp-client":
            # OpenVPN's connect-timeout/server-poll-timeout bounds the TCP connect
            timeout = poll if poll else sockets.TCP_CONNECT_TIMEOUT
            sock, self.remote = await sockets.open_tcp_client(self.opts, target, timeout)
        else:  # tcp-server: one peer, like OpenVPN's P2P TCP server
            sock, self.remote = await sockets.accept_tcp_peer(self.opts)
        self.sock = sock

    def _resolve_entry(self) -> sockets.Target | None:
        """Resolve the current entry's name now (every attempt, as OpenVPN does), per resolv-retry."""
        cl = self.connlist
        if cl is None or self.proto == "tcp-server":
            return None  # a one-peer TCP server waits for its peer; it contacts nobody
        entry = cl.current
        host = entry.host
        if self.opts.remote_random_hostname:
            host = randomized_hostname(host, os.urandom)
        log.info(
            "Connection entry %d/%d: %s:%d (%s)", cl.index + 1, len(cl.entries), host, entry.port, entry.proto
        )
        stype = socket.SOCK_DGRAM if self.transport is Transport.UDP else socket.SOCK_STREAM
        try:
            _, (address, port) = sockets.resolve(host, entry.port, entry.family or self.opts.family, stype)
        except Stop as stop:
            try:
                cl.resolve_failed(time.time(), stop.message)
            except GiveUp as exc:
                raise Stop.fatal(str(exc)) from None
            raise
        cl.resolved()
        return address, port, entry.family

    def _server_poll_timeout(self) -> None:
        """UDP: a server that has not answered within server-poll-timeout -> the next entry."""
        if not self._heard_from_peer:
            self.stop(Stop.restart("Server poll timeout, trying the next server"))

    async def _watch_inactivity(self, seconds: int, least_bytes: int) -> None:
        """`inactive`: every period, tunnel traffic (the data channel's counters) must exceed
        ``least_bytes`` or the process exits; keepalive pings do not count."""
        counted = 0
        while True:
            await asyncio.sleep(seconds)
            total = 0
            if self.handed_over and self.peer_id is not None:
                with contextlib.suppress(PyovpnError, OSError):
                    info = await self.host.dc.request(api.GetPeer(self.peer_id))
                    if isinstance(info, api.PeerInfo):
                        total = info.vpn_rx_bytes + info.vpn_tx_bytes
            if total - counted > least_bytes:
                counted = total
                continue
            log.info("Inactivity timeout (--inactive), exiting")
            self.stop(Stop(StopReason.SIGNAL_EXIT, "inactivity timeout (--inactive)", signal="SIGTERM"))
            return

    # ------------------------------------------------------------------ run

    async def run(self) -> Stop:
        # a TCP connect or accept can wait a long time: a signal must end that wait too
        opening = asyncio.ensure_future(self._open_socket())
        waits: set[asyncio.Future[Any]] = {opening, self._done}
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if not opening.done():
            opening.cancel()
            with contextlib.suppress(asyncio.CancelledError, Stop):
                await opening
            return self._done.result()
        try:
            opening.result()
        except Stop as stop:
            return stop
        cfg = self.host.session_cfg
        if cfg.proto != self.proto:  # this entry's own proto: the options string must say so
            cfg = dataclasses.replace(cfg, proto=self.proto)
        self.session = Session(cfg, rng=os.urandom, now=time.time())
        if self.connlist is not None and self.transport is Transport.UDP:
            poll = self.connlist.current.server_poll_timeout
            if poll > 0:
                self._poll_timer = self.loop.call_later(poll, self._server_poll_timeout)
        self._start_reading()
        self._start_worker()
        if self.opts.inactive is not None:
            self._inactivity = asyncio.ensure_future(self._watch_inactivity(*self.opts.inactive))
        if self.first_packet is not None:
            # a restarted peer's hard reset that ended the previous connection: answer it now
            self._on_packet(*self.first_packet)
        self.session.handle_timer(time.time())  # sends the client's hard reset
        self._pump()
        return await self._until_stopped()

    async def _teardown(self) -> None:
        if self._timer:
            self._timer.cancel()
        if self._poll_timer:
            self._poll_timer.cancel()
        if self._inactivity is not None:
            self._inactivity.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._inactivity
        sess = self.session
        stop = self.stopped
        if sess is not None and stop is not None and stop.by_a_signal:
            sess.close(time.time())
            self._send_packets()
            if sess.cc_exit and self.opts.explicit_exit_notify:
                await asyncio.sleep(min(EXIT_FLUSH_SECONDS, self.opts.explicit_exit_notify))
        await self._drain_worker()
        if self.sock is not None:
            self._stop_reading()
            if self.handed_over and self.peer_id is not None:
                with contextlib.suppress(PyovpnError):
                    await self.host.dc.request(api.DelPeer(self.peer_id))
            self.sock.close()

    # ------------------------------------------------------------------ packet I/O

    def _on_readable(self) -> None:
        assert self.sock is not None
        try:
            if self.transport is Transport.UDP:
                for _ in range(RECV_BATCH):
                    try:
                        data, sa = rxbuf.recvfrom(self.sock, 65535)
                    except BlockingIOError:
                        break
                    self._on_packet(data, (sa[0], sa[1]))
            else:
                for _ in range(RECV_BATCH):
                    try:
                        data = self.sock.recv(self.framer.wanted())
                    except BlockingIOError:
                        return
                    if not data:
                        self.stop(Stop.restart("connection reset by peer (TCP EOF)"))
                        return
                    for pkt in self.framer.feed(data):
                        self._on_packet(pkt, self.remote)
                        if self.handed_over:
                            return  # the data channel reads the socket from here on
        except (ConnectionError, PyovpnError) as exc:
            self.stop(Stop.restart(f"transport error: {exc}"))

    def _on_packet(self, data: bytes, source: tuple[str, int] | None) -> None:
        sess = self.session
        if sess is None or not data:
            return
        opcode = data[0] >> 3
        log.debug("control packet opcode %d from %s (%d bytes)", opcode, source, len(data))
        if opcode in DATA_OPCODES:
            return  # data before keys are installed: drop, as OpenVPN does
        if self.transport is Transport.UDP and source is not None:
            if self.remote is None:
                self.remote = source
            elif _addr(source) != _addr(self.remote):
                if sess.peer_session_id is not None and not (
                    opcode in STRANGER_CONTROL_OPCODES and sess.cfg.is_tls_server
                ):
                    return  # a stranger; the peer we talk to has not moved
                # before the handshake, or a (re)starting client: the session decides
                if sess.peer_session_id is None:
                    self.remote = source
        self._last_source = source
        self._heard_from_peer = True
        sess.receive(data, time.time())
        self._pump()

    def _send_packets(self) -> None:
        sess = self.session
        assert sess is not None and self.sock is not None
        for pkt in sess.packets_to_send():
            if self.handed_over and self.peer_id is not None:
                self._cmds.put_nowait(api.SendControl(self.peer_id, pkt))
                continue
            if self.transport is Transport.UDP and self.remote is None:
                continue  # nobody to answer yet
            remote = self.remote if self.transport is Transport.UDP else None
            failed = sockets.send_control(self.sock, pkt, remote, stream=self.transport is Transport.TCP)
            if failed is not None:
                log.warning("send failed: %s", failed.strerror)

    def _pump(self) -> None:
        """Send what the session has to send, act on its events, and keep its timer current."""
        if self.session is None:
            return
        self._send_packets()
        sess = self.session
        for ev in sess.events():
            if isinstance(ev, SessionClosed):
                kind = StopReason.RESTART if ev.restart else StopReason.FATAL
                self.stop(Stop(kind, ev.reason, exit_code=0 if ev.restart else 1, auth_failed=ev.auth_failed))
            elif isinstance(ev, PeerRestarted):
                self.stop(Stop.peer_restarted(ev.packet, self._last_source))
            elif isinstance(ev, (TunnelUp, api.NewKey, api.SwapKeys, api.DelKey)):
                if isinstance(ev, api.NewKey) and ev.key_id != 0:
                    self.rekeys += 1
                if isinstance(ev, TunnelUp) and not self.handed_over:
                    # Stop reading now, not when the worker gets to NewPeer: whatever arrives in
                    # between stays queued in the socket for the data channel instead of being lost.
                    self._stop_reading()
                self._cmds.put_nowait(ev)
        if sess.auth_token is not None and sess.auth_token != self._auth_token:
            self._auth_token = sess.auth_token  # pushed with the options, or renewed at a rekey
            self.host.auth_token_pushed(sess.auth_token)
        if self._timer:
            self._timer.cancel()
            self._timer = None
        deadline = sess.next_timer()
        if deadline is not None:
            delay = max(0.0, deadline - time.time())
            self._timer = self.loop.call_later(delay + 0.001, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.session is not None:
            self.session.handle_timer(time.time())
            self._pump()

    # ------------------------------------------------------------------ data channel

    async def _command_worker(self) -> None:
        while True:
            cmd = await self._cmds.get()
            if cmd is None:
                return
            try:
                if isinstance(cmd, TunnelUp):
                    await self._tunnel_up(cmd)
                else:
                    await self.host.dc.request(cmd)
            except ScriptFailed as exc:
                self.stop(Stop.fatal(str(exc)))
                return
            except (BackendError, ConfigError) as exc:
                self.stop(Stop.fatal(f"data channel: {exc}"))
                return
            except OSError as exc:
                self.stop(Stop.restart(f"data channel: {exc}"))
                return

    async def _tunnel_up(self, up: TunnelUp) -> None:
        assert self.sock is not None
        log.info(
            "Data Channel: cipher '%s', peer-id: %d, key derivation %s, keepalive %d/%d",
            up.cipher.value,
            up.peer_id,
            up.key_derivation,
            up.keepalive_interval,
            up.keepalive_timeout,
        )
        log.info("Control Channel: %s", up.tls_summary)
        self.tunnel = up  # for `pyovpn show` and the status of this connection
        self.connected_since = time.time()
        await self.host.ensure_iface(up, self.remote)
        if self.transport is Transport.UDP and self.remote is None:
            raise BackendError("tunnel up but the peer address is unknown")
        if not self.handed_over:
            self._stop_reading()
            backlog = self.framer.take_backlog() if self.transport is Transport.TCP else b""
            # Known before NewPeer returns: the backend may deliver the peer's next control
            # packet (the engine does so on a direct path) before the reply reaches us, and a
            # packet for an unknown peer id is dropped (a lost ACK cost a 2 s retransmission).
            self.peer_id = up.peer_id
            dc = self.host.dc
            occ = self.session.remote_options if self.session is not None else ""
            framing = compression.session_framing(self.opts, up.pushed, dc.capabilities, dc.name, occ)
            try:
                await self.host.dc.request(
                    api.NewPeer(
                        peer_id=up.peer_id,
                        socket_fd=self.sock.fileno(),
                        transport=self.transport,
                        remote=self.remote if self.transport is Transport.UDP else None,
                        keepalive_interval=up.keepalive_interval,
                        keepalive_timeout=up.keepalive_timeout,
                        tcp_backlog=backlog,
                        framing=framing,
                        passtos=self.opts.passtos,
                        fragment=self.opts.fragment if self.transport is Transport.UDP else 0,
                        shaper=backendfit.session_shaper(
                            self.opts, up.pushed.shaper if up.pushed else None, dc.capabilities, dc.name
                        ),
                    )
                )
            except BaseException:
                self.peer_id = None
                raise
            self.handed_over = True
        log.info("Initialization Sequence Completed")
        if self.connlist is not None:
            self.connlist.connected()
        self.host.after_init()

    def on_notification(self, n: Notification) -> None:
        if isinstance(n, api.ControlPacket):
            if n.peer_id == self.peer_id:
                self._on_packet(n.packet, n.remote)
        elif isinstance(n, api.PeerDeleted):
            if n.peer_id != self.peer_id or n.reason is PeerDelReason.USERSPACE:
                return
            self.handed_over = False
            self.peer_id = None
            pushed = self.tunnel.pushed if self.tunnel is not None else None
            # a pushed ping-restart replaces the local ping-exit, as in OpenVPN
            if (
                n.reason is PeerDelReason.EXPIRED
                and self.opts.ping_exit
                and not (pushed and pushed.ping_restart)
            ):
                log.info("Inactivity timeout (--ping-exit), exiting")
                self.stop(Stop(StopReason.SIGNAL_EXIT, "inactivity timeout (--ping-exit)", signal="SIGTERM"))
                return
            why = _PEER_DELETED.get(
                n.reason, f"peer deleted by the data channel ({n.reason.name}), restarting"
            )
            self.stop(Stop.restart(why))
        elif isinstance(n, api.PeerFloated):
            if n.peer_id == self.peer_id:
                log.info("peer floated to %s", n.remote)
                self.remote = n.remote
        elif isinstance(n, api.KeyExhausted) and n.peer_id == self.peer_id and self.session is not None:
            log.info("data channel key_id=%d exhausted its packet ids; renegotiating", n.key_id)
            self.session.request_renegotiation(time.time())
            self._pump()
