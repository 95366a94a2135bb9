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
from signal import Signals

from pyovpn import __version__, logsinks, privdrop, scripts
from pyovpn.config import AEAD_CIPHERS, Options, no_effect_reason
from pyovpn.datachannel import choice
from pyovpn.datachannel.api import DataChannel, DelIface, IfaceMode, NewIface, Notification
from pyovpn.edge import iface
from pyovpn.edge.host import HostNetwork, SystemNetwork
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
        tls_cipher=opts.tls_cipher,
        tls_ciphersuites=opts.tls_ciphersuites,
        tls_version_max=opts.tls_version_max,
    )
    user, password = opts.auth_user_pass or (None, None)
    return SessionConfig(
        # the TLS handshake
        is_tls_server=is_server,
        tls_context=ctx,
        peer_check=PeerCheck(
            opts.remote_cert_tls,
            opts.verify_x509_name,
            peer_cert=peer_cert,
            crl=opts.crl_verify,
            remote_cert_ku=opts.remote_cert_ku,
            remote_cert_eku=opts.remote_cert_eku,
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
        username=user,
        password=password,
    )


class Daemon:
    """One pyovpn process: runs connections (or the server) until a signal or a fatal error.

    ``backend``: use this data channel instead of opening the one ``--dco`` picks.
    ``net``: where addresses and routes go (default: the host's, :class:`SystemNetwork`).
    ``handle_signals``: install OS signal handlers; without them, :meth:`signal` is the only way in.
    """

    def __init__(
        self,
        opts: Options,
        *,
        backend: DataChannel | None = None,
        net: HostNetwork | None = None,
        handle_signals: bool = True,
    ) -> None:
        self.opts = opts
        self.session_cfg = session_config(opts)
        self.net: HostNetwork = net if net is not None else SystemNetwork()
        self._backend = backend
        self._handle_signals = handle_signals
        self.iface: str | None = None
        self.current: Connection | MultiServer | None = None
        self._signal: asyncio.Future[str] | None = None
        self._pending_signal: str | None = None  # delivered before run() could take it
        self._iface_configured_for: object = None
        self._dropped = False
        self._tun_params: TunParams | None = None  # what the up script was told; down gets the same
        self._exit_signal: str | None = None
        privdrop.resolve(opts.user, opts.group)  # unknown names are a config error, before any setup
        scripts.set_config_env(opts.setenv)

    @property
    def dc(self) -> DataChannel:
        """The data channel; there is one from the start of :meth:`run` on."""
        if self._backend is None:
            raise BackendError("the data channel is not open yet")
        return self._backend

    # ------------------------------------------------------------------ what connections use

    def after_init(self) -> None:
        """Once the first tunnel is up: drop to user/group with CAP_NET_ADMIN only (like OpenVPN)."""
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
            self.net.flush_addresses(self.iface)
        self._iface_configured_for = key
        iface.configure_addresses(self.net, self.iface, opts, pushed)
        await self.run_up(iface.tun_params(self.iface, mtu, opts, pushed), "restart" if restart else "init")

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
        try:
            while True:
                stop = await self._run_one(signals)
                if stop.by_a_signal:
                    if stop.reason is StopReason.SIGNAL_RESTART:
                        log.info("%s[soft,restart] received, process restarting", stop.signal)
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
            await self._shutdown()
        return exit_code

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
        if self.current is not None:
            self.current.on_notification(n)

    async def _shutdown(self) -> None:
        if self.iface is not None:
            if self.opts.down_pre:
                await self.run_down()  # `down-pre`: the script still sees the open device
            with contextlib.suppress(PyovpnError, OSError):
                await self.dc.request(DelIface(self.iface))
            log.info("Closing TUN/TAP interface %s", self.iface)
            await self.run_down()
        if self._backend is not None:
            with contextlib.suppress(Exception):
                await self._backend.close()


def setup_logging(opts: Options) -> None:
    level = logging.WARNING if opts.verb <= 0 else logging.INFO if opts.verb <= 4 else logging.DEBUG
    target = opts.log or opts.log_append
    handler, syslog_problem = logsinks.destination_handler(
        log_file=target, append=bool(opts.log_append), syslog_ident=opts.syslog
    )
    if isinstance(handler, logging.handlers.SysLogHandler):
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        stamp = "" if opts.suppress_timestamps else "%(asctime)s "
        handler.setFormatter(logging.Formatter(stamp + "%(message)s", "%Y-%m-%d %H:%M:%S"))
    if opts.mute > 0:
        handler.addFilter(logsinks.MuteFilter(opts.mute))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if syslog_problem:
        log.warning("%s", syslog_problem)
    # pyroute2 logs every netlink message at DEBUG; that is never what a --verb user wants
    logging.getLogger("pyroute2").setLevel(logging.WARNING)
    # our format shows time and message only: skip the caller lookup (a stack walk per record)
    # and the thread/process fields, the logging HOWTO's "optimization" switches; a server logs
    # several lines per connecting client
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def run(opts: Options) -> int:
    if opts.cd:
        os.chdir(opts.cd)  # before anything opens a relative path (log, writepid, scripts)
    setup_logging(opts)
    log.info("pyovpn %s (OpenVPN-compatible, data channel offload)", __version__)
    for name, source, line in opts.ignored:
        why = no_effect_reason(name)
        log.warning(
            "%s:%d: option '%s' is accepted but has no effect in pyovpn%s",
            source,
            line,
            name,
            f": {why}" if why else "",
        )
    if opts.nice:
        try:
            os.nice(opts.nice)
            log.info("nice %d succeeded", opts.nice)
        except OSError as exc:  # a negative value needs CAP_SYS_NICE; OpenVPN warns and goes on
            log.warning("nice %d failed: %s", opts.nice, exc.strerror)
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
