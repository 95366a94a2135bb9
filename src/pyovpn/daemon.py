"""The daemon's lifecycle: logging, signals, the restart loop, the data-channel backend,
the tunnel device across restarts, the up/down scripts and dropping privileges.

Each round it runs one :class:`pyovpn.p2p.Connection` (one peer) or one
:class:`pyovpn.server.multi.MultiServer` (P2MP) until that returns a
:class:`pyovpn.edge.stop.Stop`, and acts on its :class:`~pyovpn.edge.stop.StopReason`.
Tests build a ``Daemon`` with a fake backend and :class:`pyovpn.edge.host.HostNetwork`,
without OS signal handlers, and deliver signals through :meth:`Daemon.signal`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import logging.handlers
import os
import sys
import time
from pathlib import Path
from signal import Signals

from pyovpn import __version__, privdrop
from pyovpn.config import AEAD_CIPHERS, Options
from pyovpn.datachannel import choice
from pyovpn.datachannel.api import (
    DataChannel,
    DelIface,
    GetPeer,
    IfaceDeleted,
    IfaceMode,
    NewIface,
    Notification,
    PeerInfo,
)
from pyovpn.edge import iface
from pyovpn.edge import status as status_file
from pyovpn.edge.clientroutes import ClientRoutes
from pyovpn.edge.host import HostNetwork, SystemNetwork
from pyovpn.edge.pushwarn import warn_unapplied
from pyovpn.edge.routejournal import RUN_DIR
from pyovpn.edge.sdnotify import SystemdNotifier
from pyovpn.edge.stop import EXIT_SIGNALS, SIGNALS, Stop, StopReason
from pyovpn.errors import BackendError, ConfigError, PyovpnError
from pyovpn.p2p import Connection
from pyovpn.proto.push import PushedOptions
from pyovpn.proto.session import SessionConfig
from pyovpn.proto.tls import PeerCheck, build_context
from pyovpn.scripts import ScriptFailed, ScriptRefused, TunParams, run_script, up_down_args, up_down_env
from pyovpn.server.multi import MultiServer

log = logging.getLogger("pyovpn")

RESTART_DELAY = 2.0


def session_config(opts: Options) -> SessionConfig:
    """The sans-I/O session's settings from the options (the TLS context built once, here)."""
    is_server = opts.tls_role == "server"
    if opts.ca is None:
        raise ConfigError("a CA certificate is required: add `ca FILE` or an inline <ca> block")
    peer_cert = opts.verify_client_cert if is_server else "require"
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
    return SessionConfig(
        # the TLS handshake
        is_tls_server=is_server,
        tls_context=ctx,
        peer_check=PeerCheck(
            opts.remote_cert_tls, opts.verify_x509_name, peer_cert=peer_cert, crl=opts.crl_verify
        ),
        tls_timeout=float(opts.tls_timeout),
        hand_window=opts.hand_window,
        tran_window=opts.tran_window,
        reneg_sec=opts.reneg_sec,
        # the control channel's wrapping
        tls_auth_key=opts.tls_auth,
        key_direction=opts.key_direction,
        auth_digest=opts.auth,
        tls_crypt_key=opts.tls_crypt,
        replay_window=opts.replay_window[0],
        # the data channel and what we tell the peer
        data_ciphers=tuple(opts.data_ciphers) or AEAD_CIPHERS,
        data_ciphers_fallback=opts.data_ciphers_fallback or opts.cipher,
        proto=opts.proto,
        tun_mtu=opts.tun_mtu,
        ping=opts.ping,
        ping_restart=opts.ping_restart,
        version=f"2.6.14-pyovpn{__version__}",
        # a client's credentials and whether it pulls its options
        pull=opts.pull,
        pull_filters=opts.pull_filters,
        route_nopull=opts.route_nopull,
        username=user,
        password=password,
    )


class Daemon:
    """One pyovpn process: runs connections (or the server) until a signal or a fatal error.

    ``backend``: use this data channel instead of opening the one ``--dco`` picks.
    ``net``: where addresses and routes go (default: the host's, :class:`SystemNetwork`).
    ``handle_signals``: install OS signal handlers; without them, :meth:`signal` is the only way in.
    ``route_journal_dir``: where route changes are journaled (default: /run/pyovpn on the real host,
    none with a fake ``net``).
    """

    def __init__(
        self,
        opts: Options,
        *,
        backend: DataChannel | None = None,
        net: HostNetwork | None = None,
        handle_signals: bool = True,
        route_journal_dir: Path | None = None,
    ) -> None:
        self.opts = opts
        self.session_cfg = session_config(opts)
        self.net: HostNetwork = net if net is not None else SystemNetwork()
        self._backend = backend
        self.routes = ClientRoutes(self.net, route_journal_dir or (RUN_DIR if net is None else None))
        self._handle_signals = handle_signals
        self.iface: str | None = None
        self.current: Connection | MultiServer | None = None
        self._signal: asyncio.Future[str] | None = None
        self._pending_signal: str | None = None  # delivered before run() could take it
        self._iface_configured_for: object = None
        self._dropped = False
        self._tun_params: TunParams | None = None  # what the up script was told; down gets the same
        self._exit_signal: str | None = None
        self.notifier = SystemdNotifier()
        self._refs: dict[int, tuple[tuple[int, int], float]] = {}  # peer id: (counters, last ref)
        privdrop.resolve(opts.user, opts.group)  # unknown names are a config error, before any setup

    @property
    def dc(self) -> DataChannel:
        """The data channel; there is one from the start of :meth:`run` on."""
        if self._backend is None:
            raise BackendError("the data channel is not open yet")
        return self._backend

    # ------------------------------------------------------------------ what connections use

    def after_init(self) -> None:
        """Once the first tunnel is up: drop to user/group with CAP_NET_ADMIN only (like OpenVPN)."""
        self.notifier.ready("Initialization Sequence Completed")
        if self._dropped or (self.opts.user is None and self.opts.group is None):
            return
        self._dropped = True
        try:
            privdrop.drop_privileges(self.opts.user, self.opts.group)
        except (PyovpnError, OSError) as exc:
            raise BackendError(f"cannot drop privileges to user/group: {exc}") from None

    async def clean_stale_link(self, name: str) -> None:
        await iface.clean_stale_link(self.dc, name)

    async def ensure_iface(self, pushed: PushedOptions | None) -> None:
        """Open the P2P device once; configure it, and run `up`, whenever the pulled options change."""
        opts = self.opts
        mtu = (pushed.tun_mtu if pushed and pushed.tun_mtu else None) or opts.tun_mtu
        if self.iface is None:
            name = opts.dev if opts.dev not in ("tun", "") else self.net.free_tun_name()
            await self.clean_stale_link(name)
            self.routes.replay_stale(name)
            await self.dc.request(NewIface(name, IfaceMode.P2P, mtu))
            self.iface = name
            log.info("TUN/TAP device %s opened (%s data channel)", self.iface, self.dc.name)
        key = (
            (pushed.ifconfig, pushed.ifconfig_ipv6, tuple(pushed.routes), tuple(pushed.routes_ipv6))
            if pushed
            else 1
        )
        if self._iface_configured_for == key:
            if opts.up_restart and self._tun_params is not None:
                # `up-restart`: the scripts run on every restart, the device stays as it is
                await self.run_down("restart")
                await self.run_up(self._tun_params, "restart")
            self._configure_routes(pushed, force=False)  # the server's address may have changed
            return  # persist-tun semantics: same config, nothing to redo after a restart
        restart = self._iface_configured_for is not None
        if restart:
            # new pulled options on a restart: OpenVPN reopens the device, down + up again
            await self.run_down("restart")
            self.net.flush_addresses(self.iface)
        self._iface_configured_for = key
        iface.configure_addresses(self.net, self.iface, opts, pushed)
        await self.run_up(iface.tun_params(self.iface, mtu, opts, pushed), "restart" if restart else "init")
        if pushed is not None:
            warn_unapplied(pushed)
        self._configure_routes(pushed, force=True)

    def _configure_routes(self, pushed: PushedOptions | None, *, force: bool) -> None:
        """Routes after `up`, as OpenVPN orders it; the server's address is the connection's."""
        assert self.iface is not None
        conn = self.current
        remote = conn.remote[0] if isinstance(conn, Connection) and conn.remote is not None else None
        self.routes.configure(self.opts, pushed, self.iface, remote, force=force)

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

    # ------------------------------------------------------------------ lifecycle

    def signal(self, name: str) -> None:
        """Deliver SIGTERM, SIGINT, SIGUSR1 or SIGHUP by name, as the OS signal handler does."""
        if name not in SIGNALS:
            raise ValueError(f"not a signal the daemon handles: {name!r}")
        if self._signal is None:
            self._pending_signal = self._pending_signal or name
        elif not self._signal.done():
            self._signal.set_result(name)

    def _next_signal(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[str]:
        self._signal = loop.create_future()
        return self._signal

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        signals = self._next_signal(loop)
        if self._pending_signal is not None:
            signals.set_result(self._pending_signal)
        if self._handle_signals:
            for name in sorted(SIGNALS):
                loop.add_signal_handler(Signals[name], self.signal, name)
        if self._backend is None:
            self._backend = await choice.open_backend(
                self.opts.dco,
                mp=self.opts.mode == "server",
                mssfix=self.opts.mssfix,
                engine=self.opts.userspace_engine,
                workers=self.opts.engine_workers,
            )
        self.dc.subscribe(self._notify)
        exit_code = 0
        status_task = asyncio.create_task(self._write_status()) if self.opts.status_file else None
        try:
            while True:
                stop = await self._run_one(signals)
                if stop.by_a_signal:
                    if stop.reason is StopReason.SIGNAL_RESTART:
                        log.info("%s[soft,restart] received, process restarting", stop.signal)
                        if stop.signal == "SIGHUP":
                            self.notifier.reloading()
                        else:
                            self.notifier.status(f"{stop.signal} received, reconnecting")
                        signals = self._next_signal(loop)
                        continue
                    log.info("%s[hard,] received, process exiting", stop.signal)
                    self._exit_signal = stop.signal
                    exit_code = 0
                    break
                if stop.reason is StopReason.FATAL:
                    log.error("Exiting due to fatal error: %s", stop.message)
                    exit_code = stop.exit_code or 1
                    break
                log.warning("%s; restarting in %.0f s", stop.message, RESTART_DELAY)
                self.notifier.status(f"{stop.message}; reconnecting")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(signals), RESTART_DELAY)
                if signals.done():
                    name = signals.result()
                    if name in EXIT_SIGNALS:
                        log.info("%s[hard,] received, process exiting", name)
                        self._exit_signal = name
                        break
                    signals = self._next_signal(loop)
        finally:
            self.notifier.stopping()
            if status_task is not None:
                status_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await status_task
            await self._shutdown()
        return exit_code

    # ------------------------------------------------------------------ the status file

    async def _write_status(self) -> None:
        """Rewrite the status file every `status` interval, as OpenVPN does (first at start)."""
        path = self.opts.status_file
        assert path is not None
        while True:
            try:
                text = await self.status_text()
                await asyncio.to_thread(status_file.write_atomic, path, text)
            except OSError as exc:
                log.warning("cannot write the status file %s: %s", path, exc)
            await asyncio.sleep(self.opts.status_interval)

    async def status_text(self) -> str:
        """The status file's text for the current connection or server, now."""
        now = time.time()
        conn = self.current
        if isinstance(conn, MultiServer):
            rows = []
            for client in list(conn.clients.values()):
                if not client.in_backend or client.peer_id is None:
                    continue
                info = await self._peer_info(client.peer_id)
                rows.append(
                    status_file.ClientRow(
                        common_name=client.common_name or "UNDEF",
                        real_address=f"{client.addr[0]}:{client.addr[1]}",
                        virtual_address=client.vpn_ip or "",
                        virtual_ipv6=client.vpn_ip6_address or "",
                        bytes_received=info.link_rx_bytes if info else 0,
                        bytes_sent=info.link_tx_bytes if info else 0,
                        connected_since=client.connected_since,
                        username=client.username or "UNDEF",
                        client_id=client.client_id,
                        peer_id=client.peer_id,
                        cipher=client.cipher,
                        last_ref=self._last_ref(client.peer_id, info, client.connected_since, now),
                        iroutes=tuple(f"{net}/{plen}" for net, plen in client.iroutes),
                    )
                )
            return status_file.render_server(
                rows, now, self.opts.status_version, dco=self.dc.name == "kernel"
            )
        counters = status_file.LinkCounters()
        if isinstance(conn, Connection) and conn.handed_over and conn.peer_id is not None:
            info = await self._peer_info(conn.peer_id)
            if info is not None:
                counters = status_file.LinkCounters(
                    tun_read=info.vpn_tx_bytes,
                    tun_write=info.vpn_rx_bytes,
                    link_read=info.link_rx_bytes,
                    link_write=info.link_tx_bytes,
                    auth_read=info.link_rx_bytes,
                )
        return status_file.render_client(counters, now)

    async def _peer_info(self, peer_id: int) -> PeerInfo | None:
        try:
            info = await self.dc.request(GetPeer(peer_id))
        except (PyovpnError, OSError):
            return None  # gone meanwhile: the next write leaves it out
        return info if isinstance(info, PeerInfo) else None

    def _last_ref(self, peer_id: int, info: PeerInfo | None, since: float, now: float) -> float:
        """When the client's traffic last moved: its counters changed since the previous write."""
        seen = (info.link_rx_bytes, info.link_tx_bytes) if info else (0, 0)
        last = self._refs.get(peer_id)
        if last is None or last[0] != seen:
            self._refs[peer_id] = (seen, now if last is not None else since)
        return self._refs[peer_id][1]

    async def _run_one(self, signals: asyncio.Future[str]) -> Stop:
        """One connection (or server instance) until it ends or a signal ends it."""
        conn: Connection | MultiServer = MultiServer(self) if self.opts.mode == "server" else Connection(self)
        self.current = conn
        run: asyncio.Task[Stop] = asyncio.create_task(conn.run())

        def on_signal(fut: asyncio.Future[str]) -> None:
            if not fut.cancelled():
                conn.stop(Stop.by_signal(fut.result()))  # no effect once the connection has ended

        sig_wait = asyncio.ensure_future(asyncio.shield(signals))
        sig_wait.add_done_callback(on_signal)
        try:
            return await run
        finally:
            sig_wait.cancel()

    def _notify(self, n: Notification) -> None:
        if isinstance(n, IfaceDeleted) and n.name == self.iface:
            # the device went with the backend process; the restart that follows opens and
            # configures it again (as OpenVPN without persist-tun does on a restart)
            log.warning("TUN/TAP device %s is gone (%s); it is opened again on reconnect", n.name, n.reason)
            self.iface = None
            self._iface_configured_for = None
        if self.current is not None:
            self.current.on_notification(n)

    async def _shutdown(self) -> None:
        self.routes.undo()  # before the device goes, as OpenVPN deletes its routes first
        if self.iface is not None:
            with contextlib.suppress(PyovpnError, OSError):
                await self.dc.request(DelIface(self.iface))
            log.info("Closing TUN/TAP interface %s", self.iface)
            await self.run_down()
        if self._backend is not None:
            with contextlib.suppress(Exception):
                await self._backend.close()


def setup_logging(opts: Options) -> None:
    level = logging.WARNING if opts.verb <= 0 else logging.INFO if opts.verb <= 4 else logging.DEBUG
    handlers: list[logging.Handler] = []
    target = opts.log or opts.log_append
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    if target:  # as in OpenVPN, a log file wins over syslog
        handlers.append(logging.FileHandler(target, mode="a" if opts.log_append else "w"))
    elif opts.syslog:
        syslog = _syslog_handler(opts.syslog)
        if syslog is not None:
            handlers.append(syslog)
            fmt = logging.Formatter(f"{opts.syslog}[%(process)d]: %(message)s")
    if not handlers:
        handlers.append(logging.StreamHandler())
    if opts.suppress_timestamps and not isinstance(handlers[0], logging.handlers.SysLogHandler):
        fmt = logging.Formatter("%(message)s")
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
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = isinstance(handlers[0], logging.handlers.SysLogHandler)
    logging.logMultiprocessing = False


def _syslog_handler(name: str) -> logging.Handler | None:
    """A handler for the local syslog socket, or None (said on stderr) when there is none."""
    try:
        return logging.handlers.SysLogHandler(
            address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON
        )
    except OSError as exc:
        print(
            f"pyovpn: syslog {name}: no syslog socket at /dev/log ({exc}); logging to stderr instead "
            "(start a syslog daemon or systemd-journald, or use `log FILE`)",
            file=sys.stderr,
        )
        return None


def _detach() -> None:
    """`daemon`: run on in the background, without a terminal (the classic double fork)."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def run(opts: Options) -> int:
    if opts.cd:
        os.chdir(opts.cd)  # scripts and the status file see the directory OpenVPN would be in
    if opts.daemon:
        _detach()
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
