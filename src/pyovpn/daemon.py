"""The asyncio edge: sockets, timers, signals and the TUN, around one sans-I/O :class:`Session`.

It owns the transport socket until the tunnel is up, then hands it to the data-channel
backend (``NewPeer``) exactly as OpenVPN hands it to the kernel; from then on control
packets arrive as ``ControlPacket`` notifications and leave through ``SendControl``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyovpn import __version__, privdrop
from pyovpn.config import Options
from pyovpn.datachannel import select
from pyovpn.datachannel.api import (
    ControlPacket,
    DataChannel,
    DelIface,
    DelKey,
    DelPeer,
    IfaceMode,
    KeyExhausted,
    NewIface,
    NewKey,
    NewPeer,
    Notification,
    PeerDeleted,
    PeerDelReason,
    PeerFloated,
    SendControl,
    SwapKeys,
    Transport,
)
from pyovpn.datachannel.api import normalize_address as _addr
from pyovpn.errors import BackendError, ConfigError, PyovpnError
from pyovpn.net import tun
from pyovpn.proto.packets import DATA_OPCODES, Opcode, StreamFramer, frame
from pyovpn.proto.push import PushedOptions
from pyovpn.proto.session import PeerRestarted, Session, SessionClosed, SessionConfig, TunnelUp
from pyovpn.proto.tls import PeerCheck, build_context
from pyovpn.scripts import ScriptFailed, ScriptRefused, TunParams, run_script, up_down_args, up_down_env

if TYPE_CHECKING:
    from pyovpn.server import MultiServer

log = logging.getLogger("pyovpn")

RESTART_DELAY = 2.0
EXIT_FLUSH_SECONDS = 1.0


class _Stop(Exception):
    """Raised inside a connection to end it; ``restart`` says what the process does next."""

    def __init__(self, reason: str, *, restart: bool, exit_code: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.restart = restart
        self.exit_code = exit_code


def session_config(opts: Options) -> SessionConfig:
    is_server = opts.tls_role == "server"
    if opts.ca is None:
        raise ConfigError("a CA certificate is required: add `ca FILE` or an inline <ca> block")
    peer_cert = getattr(opts, "verify_client_cert", "require") if is_server else "require"
    ctx = build_context(
        ca=opts.ca,
        cert=opts.cert,
        key=opts.key,
        is_server=is_server,
        tls_version_min=opts.tls_version_min,
        tls_groups=opts.tls_groups,
        peer_cert=peer_cert,
    )
    user, password = opts.auth_user_pass or (None, None)
    if opts.data_ciphers:
        ciphers = tuple(opts.data_ciphers)
    else:
        ciphers = ("AES-256-GCM", "AES-128-GCM", "CHACHA20-POLY1305")
    return SessionConfig(
        is_tls_server=is_server,
        pull=opts.pull,
        tls_context=ctx,
        peer_check=PeerCheck(
            opts.remote_cert_tls,
            opts.verify_x509_name,
            peer_cert=peer_cert,
            crl=getattr(opts, "crl_verify", None),
        ),
        tls_auth_key=opts.tls_auth,
        key_direction=opts.key_direction,
        auth_digest=opts.auth,
        tls_crypt_key=opts.tls_crypt,
        data_ciphers=ciphers,
        data_ciphers_fallback=opts.data_ciphers_fallback or opts.cipher,
        reneg_sec=opts.reneg_sec,
        tls_timeout=float(opts.tls_timeout),
        hand_window=opts.hand_window,
        tran_window=opts.tran_window,
        proto=opts.proto,
        tun_mtu=opts.tun_mtu,
        username=user,
        password=password,
        version=f"2.6.14-pyovpn{__version__}",
        replay_window=opts.replay_window[0],
        ping=opts.ping,
        ping_restart=opts.ping_restart,
    )


@dataclass
class _Remote:
    host: str
    port: int
    proto: str


def _remotes(opts: Options) -> list[_Remote]:
    out = []
    for r in opts.remotes:
        port = r.port or opts.rport or opts.port
        out.append(_Remote(r.host, port, r.proto or opts.proto))
    return out


def _resolve(host: str, port: int, family: int | None, stype: int) -> tuple[int, tuple[str, int]]:
    fam = {4: socket.AF_INET, 6: socket.AF_INET6}.get(family or 0, socket.AF_UNSPEC)
    try:
        infos = socket.getaddrinfo(host, port, fam, stype)
    except socket.gaierror as exc:
        raise _Stop(f"cannot resolve remote {host}: {exc}", restart=True) from None
    af, _, _, _, sa = infos[0]
    return af, (sa[0], sa[1])


def _listen_family(opts: Options) -> int:
    """AF_INET6 (dual-stack unless udp6/tcp6) by default; AF_INET for udp4/tcp4 or an IPv4 ``local``."""
    if opts.family == 4:
        return socket.AF_INET
    if opts.local:
        try:
            return socket.AF_INET if ipaddress.ip_address(opts.local).version == 4 else socket.AF_INET6
        except ValueError:
            return socket.getaddrinfo(opts.local, None)[0][0]
    return socket.AF_INET6


def _bind_address(opts: Options, af: int) -> tuple[str, int]:
    port = 0 if opts.nobind else (opts.lport if opts.lport is not None else opts.port)
    host = opts.local or ("::" if af == socket.AF_INET6 else "0.0.0.0")
    return host, port


class Connection:
    """One session attempt: socket, handshake, tunnel, until it ends."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.opts = daemon.opts
        self.loop = asyncio.get_running_loop()
        self.sock: socket.socket | None = None
        self.transport = Transport.TCP if self.opts.proto.startswith("tcp") else Transport.UDP
        self.remote: tuple[str, int] | None = None
        self.session: Session | None = None
        self.handed_over = False
        self.peer_id: int | None = None
        self.framer = StreamFramer()
        self._timer: asyncio.TimerHandle | None = None
        self._done: asyncio.Future[_Stop] = self.loop.create_future()
        self._cmds: asyncio.Queue[object] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._reading = False

    # ------------------------------------------------------------------ setup

    async def _open_socket(self) -> None:
        opts = self.opts
        remotes = _remotes(opts)
        if self.transport is Transport.UDP:
            if remotes:
                af, self.remote = _resolve(remotes[0].host, remotes[0].port, opts.family, socket.SOCK_DGRAM)
            else:
                af = _listen_family(opts)
            sock = socket.socket(af, socket.SOCK_DGRAM)
            if af == socket.AF_INET6 and opts.family != 6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if af == socket.AF_INET6 and self.remote and "." in self.remote[0]:
                self.remote = ("::ffff:" + self.remote[0], self.remote[1])
            try:
                sock.bind(_bind_address(opts, af))
            except OSError as exc:
                sock.close()
                raise _Stop(
                    f"cannot bind UDP {_bind_address(opts, af)}: {exc.strerror}", restart=False, exit_code=1
                ) from None
            sock.setblocking(False)
            self.sock = sock
            log.info(
                "UDP link local: %s, remote: %s",
                _addr(sock.getsockname()[:2]),
                self.remote or "[undef] (waiting for the peer)",
            )
        elif opts.proto == "tcp-client":
            if not remotes:
                raise _Stop("tcp-client needs a remote", restart=False, exit_code=1)
            af, self.remote = _resolve(remotes[0].host, remotes[0].port, opts.family, socket.SOCK_STREAM)
            sock = socket.socket(af, socket.SOCK_STREAM)
            sock.setblocking(False)
            if opts.local or (not opts.nobind and opts.lport):
                sock.bind(_bind_address(opts, af))
            log.info("Attempting to establish TCP connection with %s", self.remote)
            try:
                await asyncio.wait_for(self.loop.sock_connect(sock, self.remote), 10)
            except (OSError, TimeoutError) as exc:
                sock.close()
                raise _Stop(f"TCP connection to {self.remote} failed: {exc}", restart=True) from None
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock = sock
            log.info("TCP connection established with %s", self.remote)
        else:  # tcp-server: one peer, like OpenVPN's P2P TCP server
            af = _listen_family(opts)
            lsock = socket.socket(af, socket.SOCK_STREAM)
            if af == socket.AF_INET6 and opts.family != 6:
                lsock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                lsock.bind(_bind_address(opts, af))
            except OSError as exc:
                lsock.close()
                raise _Stop(
                    f"cannot bind TCP {_bind_address(opts, af)}: {exc.strerror}", restart=False, exit_code=1
                ) from None
            lsock.listen(1)
            lsock.setblocking(False)
            log.info("Listening for incoming TCP connection on %s", _addr(lsock.getsockname()[:2]))
            try:
                sock, sa = await self.loop.sock_accept(lsock)
            finally:
                lsock.close()
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.remote = _addr(sa[:2])
            self.sock = sock
            log.info("TCP connection established with %s", self.remote)

    # ------------------------------------------------------------------ run

    async def run(self) -> _Stop:
        try:
            await self._open_socket()
        except _Stop as stop:
            return stop
        assert self.sock is not None
        self.session = Session(self.d.session_cfg, rng=os.urandom, now=time.time())
        self.loop.add_reader(self.sock.fileno(), self._on_readable)
        self._reading = True
        self._worker = asyncio.create_task(self._command_worker())
        self.session.handle_timer(time.time())  # sends the client's hard reset
        self._pump()
        try:
            return await self._done
        finally:
            await self._teardown()

    def stop(self, stop: _Stop) -> None:
        if not self._done.done():
            self._done.set_result(stop)

    async def _teardown(self) -> None:
        if self._timer:
            self._timer.cancel()
        sess = self.session
        stop = self._done.result() if self._done.done() else None
        if sess is not None and stop is not None and stop.reason.startswith("signal"):
            sess.close(time.time())
            self._send_packets()
            if sess.cc_exit and self.opts.explicit_exit_notify:
                await asyncio.sleep(min(EXIT_FLUSH_SECONDS, self.opts.explicit_exit_notify))
        if self._worker:
            # let queued commands finish so the backend state stays consistent
            await self._cmds.put(None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._worker, 5)
        if self.sock is not None:
            if self._reading:
                self.loop.remove_reader(self.sock.fileno())
                self._reading = False
            if self.handed_over and self.peer_id is not None:
                with contextlib.suppress(PyovpnError):
                    await self.d.dc.request(DelPeer(self.peer_id))
            self.sock.close()

    # ------------------------------------------------------------------ packet I/O

    def _on_readable(self) -> None:
        assert self.sock is not None
        try:
            if self.transport is Transport.UDP:
                for _ in range(64):
                    try:
                        data, sa = self.sock.recvfrom(65535)
                    except BlockingIOError:
                        break
                    self._on_packet(data, (sa[0], sa[1]))
            else:
                for _ in range(64):
                    try:
                        data = self.sock.recv(self.framer.wanted())
                    except BlockingIOError:
                        return
                    if not data:
                        self.stop(_Stop("connection reset by peer (TCP EOF)", restart=True))
                        return
                    for pkt in self.framer.feed(data):
                        self._on_packet(pkt, self.remote)
                        if self.handed_over:
                            return  # the data channel reads the socket from here on
        except ConnectionError as exc:
            self.stop(_Stop(f"transport error: {exc}", restart=True))
        except PyovpnError as exc:
            self.stop(_Stop(f"transport error: {exc}", restart=True))

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
                    opcode == Opcode.CONTROL_HARD_RESET_CLIENT_V2 and sess.cfg.is_tls_server
                ):
                    return  # a stranger; the peer we talk to has not moved
                # before the handshake, or a (re)starting client: the session decides
                if sess.peer_session_id is None:
                    self.remote = source
        sess.receive(data, time.time())
        self._pump()

    def _send_packets(self) -> None:
        sess = self.session
        assert sess is not None and self.sock is not None
        for pkt in sess.packets_to_send():
            if self.handed_over and self.peer_id is not None:
                self._cmds.put_nowait(SendControl(self.peer_id, pkt))
                continue
            try:
                if self.transport is Transport.UDP:
                    if self.remote is None:
                        continue
                    self.sock.sendto(pkt, self.remote)
                else:
                    self.sock.sendall(frame(pkt))
            except BlockingIOError:
                log.debug("socket busy; control packet dropped (it will be retransmitted)")
            except OSError as exc:
                log.warning("send failed: %s", exc.strerror)

    def _pump(self) -> None:
        sess = self.session
        if sess is None:
            return
        self._send_packets()
        for ev in sess.events():
            if isinstance(ev, SessionClosed):
                self.stop(_Stop(ev.reason, restart=ev.restart, exit_code=0 if ev.restart else 1))
            elif isinstance(ev, PeerRestarted):
                self.stop(_Stop("peer restarted (new hard reset)", restart=True))
            else:
                if isinstance(ev, TunnelUp) and not self.handed_over and self._reading:
                    # Stop reading now, not when the worker gets to NewPeer: whatever arrives in
                    # between stays queued in the socket for the data channel instead of being lost.
                    self.loop.remove_reader(self.sock.fileno())
                    self._reading = False
                self._cmds.put_nowait(ev)
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
                elif isinstance(cmd, (NewKey, SwapKeys, DelKey, SendControl)):
                    await self.d.dc.request(cmd)
            except ScriptFailed as exc:
                self.stop(_Stop(str(exc), restart=False, exit_code=1))
                return
            except (BackendError, ConfigError) as exc:
                self.stop(_Stop(f"data channel: {exc}", restart=False, exit_code=1))
                return
            except OSError as exc:
                self.stop(_Stop(f"data channel: {exc}", restart=True))
                return

    async def _tunnel_up(self, up: TunnelUp) -> None:
        assert self.sock is not None
        opts = self.opts
        log.info(
            "Data Channel: cipher '%s', peer-id: %d, key derivation %s, keepalive %d/%d",
            up.cipher.value,
            up.peer_id,
            up.key_derivation,
            up.keepalive_interval,
            up.keepalive_timeout,
        )
        log.info("Control Channel: %s", up.tls_summary)
        await self.d.ensure_iface(up.pushed)
        if self.transport is Transport.UDP and self.remote is None:
            raise BackendError("tunnel up but the peer address is unknown")
        if not self.handed_over:
            if self._reading:
                self.loop.remove_reader(self.sock.fileno())
                self._reading = False
            backlog = self.framer.take_backlog() if self.transport is Transport.TCP else b""
            await self.d.dc.request(
                NewPeer(
                    peer_id=up.peer_id,
                    socket_fd=self.sock.fileno(),
                    transport=self.transport,
                    remote=self.remote if self.transport is Transport.UDP else None,
                    keepalive_interval=up.keepalive_interval,
                    keepalive_timeout=up.keepalive_timeout,
                    tcp_backlog=backlog,
                )
            )
            self.peer_id = up.peer_id
            self.handed_over = True
            self.d.current = self
        del opts
        log.info("Initialization Sequence Completed")
        self.d.after_init()

    def on_notification(self, n: Notification) -> None:
        if isinstance(n, ControlPacket):
            if n.peer_id == self.peer_id:
                self._on_packet(n.packet, n.remote)
        elif isinstance(n, PeerDeleted):
            if n.peer_id != self.peer_id or n.reason is PeerDelReason.USERSPACE:
                return
            self.handed_over = False
            self.peer_id = None
            why = {
                PeerDelReason.EXPIRED: "Inactivity timeout (--ping-restart), restarting",
                PeerDelReason.TRANSPORT_DISCONNECT: "connection reset by peer, restarting",
                PeerDelReason.TRANSPORT_ERROR: "transport error, restarting",
            }.get(n.reason, f"peer deleted by the data channel ({n.reason.name}), restarting")
            self.stop(_Stop(why, restart=True))
        elif isinstance(n, PeerFloated):
            if n.peer_id == self.peer_id:
                log.info("peer floated to %s", n.remote)
                self.remote = n.remote
        elif isinstance(n, KeyExhausted) and n.peer_id == self.peer_id and self.session is not None:
            log.info("data channel key_id=%d exhausted its packet ids; renegotiating", n.key_id)
            self.session.request_renegotiation(time.time())
            self._pump()


class Daemon:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.session_cfg = session_config(opts)
        self.dc: DataChannel
        self.iface: str | None = None
        self.current: Connection | MultiServer | None = None
        self._signal: asyncio.Future[str] | None = None
        self._iface_configured_for: object = None
        self._dropped = False
        self._tun_params: TunParams | None = None  # what the up script was told; down gets the same
        self._exit_signal: str | None = None
        privdrop.resolve(opts.user, opts.group)  # unknown names are a config error, before any setup

    def after_init(self) -> None:
        """Once the first tunnel is up: drop to user/group with CAP_NET_ADMIN only (like OpenVPN)."""
        if self._dropped or (self.opts.user is None and self.opts.group is None):
            return
        self._dropped = True
        try:
            privdrop.drop_privileges(self.opts.user, self.opts.group)
        except (PyovpnError, OSError) as exc:
            raise BackendError(f"cannot drop privileges to user/group: {exc}") from None

    async def ensure_iface(self, pushed: PushedOptions | None) -> None:
        opts = self.opts
        mtu = (pushed.tun_mtu if pushed and pushed.tun_mtu else None) or opts.tun_mtu
        if self.iface is None:
            name = opts.dev if opts.dev not in ("tun", "") else _free_tun_name()
            await clean_stale_link(self.dc, name)
            await self.dc.request(NewIface(name, IfaceMode.P2P, mtu))
            self.iface = name
            log.info("TUN/TAP device %s opened (%s data channel)", self.iface, self.dc.name)
        key = (
            (pushed.ifconfig, pushed.ifconfig_ipv6, tuple(pushed.routes), tuple(pushed.routes_ipv6))
            if pushed
            else 1
        )
        if self._iface_configured_for == key:
            return  # persist-tun semantics: same config, nothing to redo after a restart
        restart = self._iface_configured_for is not None
        if restart:
            # new pulled options on a restart: OpenVPN reopens the device, down + up again
            await self.run_down("restart")
            tun.flush_addresses(self.iface)
        self._iface_configured_for = key
        configure_addresses(self.iface, opts, pushed)
        await self.run_up(tun_params(self.iface, mtu, opts, pushed), "restart" if restart else "init")

    async def _run_up_down(
        self, kind: str, command: str, params: TunParams, context: str, *, exit_signal: str | None = None
    ) -> int:
        """Run `up` or `down` with OpenVPN's arguments and environment; its exit status."""
        args = up_down_args(params, context)
        log.info("%s %s", command, " ".join(args))
        return await run_script(
            command,
            kind,
            args=args,
            env=up_down_env(params, context, signal=exit_signal),
            script_security=self.opts.script_security,
        )

    async def run_up(self, params: TunParams, context: str) -> None:
        """The `up` script, once the device is open and configured; failing is fatal, as in OpenVPN."""
        self._tun_params = params
        command = self.opts.up
        if not command:
            return
        try:
            status = await self._run_up_down("up", command, params, context)
        except ScriptRefused as exc:
            raise ScriptFailed(str(exc)) from None
        if status != 0:
            raise ScriptFailed(f"up script {command} failed (exit status {status})")

    async def run_down(self, context: str = "init") -> None:
        """The `down` script, after the device closed, with what `up` was told."""
        params, self._tun_params = self._tun_params, None
        command = self.opts.down
        if not command or params is None:
            return
        try:
            status = await self._run_up_down("down", command, params, context, exit_signal=self._exit_signal)
        except ScriptRefused as exc:
            log.error("%s", exc)
            return
        if status != 0:
            log.warning("down script %s failed (exit status %d)", command, status)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._signal = loop.create_future()
        for sig, name in (
            (signal.SIGTERM, "SIGTERM"),
            (signal.SIGINT, "SIGINT"),
            (signal.SIGUSR1, "SIGUSR1"),
            (signal.SIGHUP, "SIGHUP"),
        ):
            loop.add_signal_handler(sig, self._on_signal, name)
        self.dc = await select.open_backend(
            self.opts.dco, mp=getattr(self.opts, "mode", "p2p") == "server", mssfix=self.opts.mssfix
        )
        self.dc.subscribe(self._notify)
        exit_code = 0
        try:
            while True:
                conn: Connection | MultiServer
                if getattr(self.opts, "mode", "p2p") == "server":
                    from pyovpn.server import MultiServer as _MultiServer

                    conn = _MultiServer(self)
                else:
                    conn = Connection(self)
                self.current = conn
                sig_wait = asyncio.ensure_future(asyncio.shield(self._signal))
                run = asyncio.create_task(conn.run())
                done, _ = await asyncio.wait({run, sig_wait}, return_when=asyncio.FIRST_COMPLETED)
                if sig_wait in done and run not in done:
                    name = self._signal.result()
                    conn.stop(_Stop(f"signal {name}", restart=name in ("SIGUSR1", "SIGHUP")))
                    stop = await run
                else:
                    sig_wait.cancel()
                    stop = run.result()
                if stop.reason.startswith("signal"):
                    name = stop.reason.split()[-1]
                    if name in ("SIGUSR1", "SIGHUP"):
                        log.info("%s[soft,restart] received, process restarting", name)
                        self._signal = loop.create_future()
                        continue
                    log.info("%s[hard,] received, process exiting", name)
                    self._exit_signal = name
                    exit_code = 0
                    break
                if not stop.restart:
                    log.error("Exiting due to fatal error: %s", stop.reason)
                    exit_code = stop.exit_code or 1
                    break
                log.warning("%s; restarting in %.0f s", stop.reason, RESTART_DELAY)
                try:
                    await asyncio.wait_for(asyncio.shield(self._signal), RESTART_DELAY)
                except TimeoutError:
                    pass
                if self._signal.done():
                    name = self._signal.result()
                    if name in ("SIGTERM", "SIGINT"):
                        log.info("%s[hard,] received, process exiting", name)
                        self._exit_signal = name
                        break
                    self._signal = loop.create_future()
        finally:
            await self._shutdown()
        return exit_code

    def _on_signal(self, name: str) -> None:
        if self._signal is not None and not self._signal.done():
            self._signal.set_result(name)

    def _notify(self, n: Notification) -> None:
        if self.current is not None:
            self.current.on_notification(n)

    async def _shutdown(self) -> None:
        if self.iface is not None:
            with contextlib.suppress(PyovpnError, OSError):
                await self.dc.request(DelIface(self.iface))
            log.info("Closing TUN/TAP interface %s", self.iface)
            await self.run_down()
        with contextlib.suppress(Exception):
            await self.dc.close()


async def clean_stale_link(dc: DataChannel, name: str) -> None:
    """Kernel backend: remove an idle `ovpn` link of this name left by a killed earlier run."""
    if dc.name != "kernel":
        return
    from pyovpn.datachannel.kernel.rtnl import cleanup_stale_iface

    if await asyncio.to_thread(cleanup_stale_iface, name):
        log.info("removed stale ovpn interface %s left by an earlier run", name)


def _free_tun_name() -> str:
    existing = set(os.listdir("/sys/class/net")) if os.path.isdir("/sys/class/net") else set()
    return next(f"tun{i}" for i in range(1024) if f"tun{i}" not in existing)


def tun_params(ifname: str, mtu: int, opts: Options, pushed: PushedOptions | None) -> TunParams:
    """The device as the up/down scripts see it: the same choices as configure_addresses()."""
    v6 = (
        pushed.ifconfig_ipv6
        if pushed and pushed.ifconfig_ipv6
        else (opts.ifconfig_ipv6 if not pushed else None)
    )
    return TunParams(
        dev=ifname,
        tun_mtu=mtu,
        topology=(pushed.topology if pushed else opts.topology) or "net30",
        ifconfig=pushed.ifconfig if pushed and pushed.ifconfig else opts.ifconfig,
        ifconfig_ipv6=v6[0] if v6 else None,
        ifconfig_ipv6_remote=v6[1] if v6 else None,
    )


def configure_addresses(ifname: str, opts: Options, pushed: PushedOptions | None) -> None:
    """Put the tunnel's addresses and routes on the interface (from config or from the push)."""
    topology = pushed.topology if pushed else opts.topology
    ifconfig = pushed.ifconfig if pushed and pushed.ifconfig else opts.ifconfig
    if ifconfig:
        local, other = ifconfig
        if topology == "subnet":
            prefix = ipaddress.IPv4Network(f"0.0.0.0/{other}").prefixlen
            tun.add_address(ifname, local, prefix)
        else:
            tun.add_address(ifname, local, 32, peer=other)
    v6 = (
        pushed.ifconfig_ipv6
        if pushed and pushed.ifconfig_ipv6
        else (opts.ifconfig_ipv6 if not pushed else None)
    )
    if v6:
        iface6 = ipaddress.IPv6Interface(v6[0])
        tun.add_address(ifname, str(iface6.ip), iface6.network.prefixlen)
    routes = [(r.network, r.netmask) for r in opts.routes]
    routes6 = [r.network for r in opts.routes_ipv6]
    if pushed:
        routes += [(net, mask) for net, mask, _gw in pushed.routes]
        routes6 += [net for net, _gw in pushed.routes_ipv6]
    for net, mask in routes:
        n = ipaddress.IPv4Network(f"{net}/{mask}", strict=False)
        tun.add_route(ifname, str(n.network_address), n.prefixlen)
    for net6 in routes6:
        n6 = ipaddress.IPv6Network(net6, strict=False)
        if v6 and n6 == ipaddress.IPv6Interface(v6[0]).network:
            continue
        tun.add_route(ifname, str(n6.network_address), n6.prefixlen)


def setup_logging(opts: Options) -> None:
    level = logging.WARNING if opts.verb <= 0 else logging.INFO if opts.verb <= 4 else logging.DEBUG
    handlers: list[logging.Handler] = []
    target = opts.log or opts.log_append
    if target:
        handlers.append(logging.FileHandler(target, mode="a" if opts.log_append else "w"))
    else:
        handlers.append(logging.StreamHandler())
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    for h in handlers:
        h.setFormatter(fmt)
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(level)
    # pyroute2 logs every netlink message at DEBUG; that is never what a --verb user wants
    logging.getLogger("pyroute2").setLevel(logging.WARNING)
    # our format shows time and message only: skip the caller lookup (a stack walk per record)
    # and the thread/process fields, the logging HOWTO's "optimization" switches; a server logs
    # several lines per connecting client
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def run(opts: Options) -> int:
    setup_logging(opts)
    log.info("pyovpn %s (OpenVPN-compatible, data channel offload)", __version__)
    for name, source, line in opts.ignored:
        log.warning("%s:%d: option '%s' is accepted but has no effect in pyovpn", source, line, name)
    if opts.writepid:
        with open(opts.writepid, "w") as fh:
            fh.write(f"{os.getpid()}\n")
    try:
        daemon = Daemon(opts)
        return asyncio.run(daemon.run())
    except ConfigError as exc:
        log.error("Options error: %s", exc)
        return 1
    except BackendError as exc:
        log.error("Data channel error: %s", exc)
        return 1
    finally:
        if opts.writepid:
            with contextlib.suppress(OSError):
                os.unlink(opts.writepid)
