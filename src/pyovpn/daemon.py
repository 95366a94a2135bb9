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
import secrets
import sys
import time
from dataclasses import replace
from pathlib import Path
from signal import Signals
from typing import Any

from pyovpn import __version__, connlist, logsinks, privdrop, scripts
from pyovpn.config import AEAD_CIPHERS, Options, no_effect_reason
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
from pyovpn.edge import backendfit, compression, iface, memory
from pyovpn.edge import status as status_file
from pyovpn.edge.clientroutes import ClientRoutes
from pyovpn.edge.credentials import AnswerLater, Asker, Credentials, StaticChallenge, answer_later, ask_user
from pyovpn.edge.crl import revocation_check
from pyovpn.edge.host import ExternalAuth, HostNetwork, SystemNetwork
from pyovpn.edge.keymaterial import tls_material
from pyovpn.edge.metrics import EventStream, start_metrics
from pyovpn.edge.pushwarn import warn_unapplied
from pyovpn.edge.sdnotify import SystemdNotifier
from pyovpn.edge.stop import EXIT_SIGNALS, SIGNALS, Stop, StopReason
from pyovpn.edge.tlscryptv2check import metadata_check
from pyovpn.errors import BackendError, ConfigError, ProtocolError, PyovpnError
from pyovpn.mgmt import protocol as mgmt_protocol
from pyovpn.mgmt.protocol import CONTROL_DIR
from pyovpn.mgmt.server import ManagementLogHandler, ManagementServer
from pyovpn.p2p import Connection
from pyovpn.proto import dnsopts
from pyovpn.proto.push import PushedOptions
from pyovpn.proto.session import SessionConfig, TunnelUp
from pyovpn.proto.tls import PeerCheck, build_context
from pyovpn.resolver import ResolverSetup
from pyovpn.rundir import RUN_DIR, pid_alive
from pyovpn.script_env import peer_env
from pyovpn.scripts import ScriptFailed, ScriptRefused, TunParams, run_script, up_down_args, up_down_env
from pyovpn.server.multi import MultiServer

log = logging.getLogger("pyovpn")

RESTART_DELAY = 2.0


def session_config(opts: Options, ask: Asker = ask_user) -> SessionConfig:
    """The sans-I/O session's settings from the options (the TLS context built once, here);
    ``ask`` asks a private key's passphrase when no `askpass` file gives it."""
    is_server = opts.tls_role == "server"
    material = tls_material(opts, ask)
    if material.ca is None:
        raise ConfigError("a CA certificate is required: add `ca FILE` or an inline <ca> block")
    peer_cert = opts.verify_client_cert if is_server else "require"
    ctx = build_context(
        ca=material.ca,
        cert=material.cert,
        key=material.key,
        is_server=is_server,
        tls_version_min=opts.tls_version_min,
        tls_groups=opts.tls_groups,
        peer_cert=peer_cert,
        tls_cipher=opts.tls_cipher,
        tls_ciphersuites=opts.tls_ciphersuites,
        tls_version_max=opts.tls_version_max,
        cert_profile=opts.tls_cert_profile or "legacy",
    )
    user, password = None, None  # filled in per connection from Daemon.credentials
    for name in opts.unoffered_ciphers:
        why = "the kernel data channel has no AES-192" if "GCM" in name else "pyovpn runs AEAD ciphers only"
        log.warning(
            "data-ciphers: %s is not offered: %s; offering %s", name, why, ":".join(opts.data_ciphers)
        )
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
            is_revoked=revocation_check(opts.crl_verify_source),
            ns_cert_type=opts.ns_cert_type,
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
        tls_crypt_v2_client=opts.tls_crypt_v2_client,
        tls_crypt_v2_server=opts.tls_crypt_v2_server,
        tls_crypt_v2_check=metadata_check(opts),
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
        compression=opts.compression,
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
        # management-query-passwords: an encrypted key's passphrase is asked over the management
        # interface once it runs (_run_one); until then there is no session configuration
        self._key_from_management = False
        try:
            ask = answer_later if opts.management_query_passwords else ask_user
            self.session_cfg = session_config(opts, ask)
        except AnswerLater:
            self._key_from_management = True
        self.credentials = _credentials(opts)
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
        self.dns = ResolverSetup()
        self._exit_signal: str | None = None
        self.notifier = SystemdNotifier()
        self.mgmt: ManagementServer | None = None
        self._mgmt_log: logging.Handler = logging.NullHandler()
        self._verb: int | None = None
        self._auth_retry = opts.auth_retry  # the `auth-retry` command changes it
        self._control: ManagementServer | None = None
        self.events: EventStream | None = EventStream(opts.events_file) if opts.events_file else None
        self._metrics: Any = None
        self.backend_reason = ""  # why this data channel (kernel or userspace), for `pyovpn show`
        self._refs: dict[int, tuple[tuple[int, int], float]] = {}  # peer id: (counters, last ref)
        privdrop.resolve(opts.user, opts.group)  # unknown names are a config error, before any setup
        #: the client's servers to try in turn (None for a server, or a peer that waits to be contacted)
        self.connlist = connlist.from_options(opts, secrets.randbelow) if opts.mode == "p2p" else None
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
        self.notifier.ready("Initialization Sequence Completed")
        self._mgmt_connected()
        conn = self.current
        if self.events is not None and isinstance(conn, Connection):
            remote = f"{conn.remote[0]}:{conn.remote[1]}" if conn.remote else ""
            self.events.emit(
                "connect", real_address=remote, cipher=conn.tunnel.cipher.value if conn.tunnel else ""
            )
        if self._dropped or (self.opts.user is None and self.opts.group is None and self.opts.chroot is None):
            return
        self._dropped = True
        try:
            privdrop.drop_privileges(self.opts.user, self.opts.group, chroot_dir=self.opts.chroot)
        except (PyovpnError, OSError) as exc:
            raise BackendError(f"cannot chroot or drop privileges to user/group: {exc}") from None

    async def clean_stale_link(self, name: str) -> None:
        await iface.clean_stale_link(self.dc, name)

    async def ensure_iface(self, up: TunnelUp, peer: tuple[str, int] | None) -> None:
        """Open the P2P device once; configure it, and run `up`, whenever the pulled options change."""
        pushed = up.pushed
        if pushed is not None and self.credentials is not None:
            self.credentials.token_received(pushed.auth_token, pushed.auth_token_user)
        opts = self.opts
        mtu = (pushed.tun_mtu if pushed and pushed.tun_mtu else None) or opts.tun_mtu
        null = opts.dev_type == "null"
        if self.iface is None and null:
            await self.dc.request(NewIface(opts.dev, IfaceMode.P2P, mtu, null=True))
            self.iface = opts.dev
            log.info("null device opened: packets from the peer are discarded, none are read (dev null)")
        if self.iface is None:
            name = opts.dev if opts.dev not in ("tun", "") else self.net.free_tun_name()
            await self.clean_stale_link(name)
            self.routes.replay_stale(name)
            await self.dc.request(NewIface(name, IfaceMode.P2P, mtu))
            self.iface = name
            log.info("TUN/TAP device %s opened (%s data channel)", self.iface, self.dc.name)
        if null:
            if self._iface_configured_for is None:
                self._iface_configured_for = 1
                self._null_device_pushed(pushed)
                await self.run_up(iface.tun_params(self.iface, mtu, opts, pushed), "init")
            return
        key = (
            (
                pushed.ifconfig,
                pushed.ifconfig_ipv6,
                tuple(pushed.routes),
                tuple(pushed.routes_ipv6),
                tuple(pushed.dns_lines),
            )
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
        params = iface.tun_params(self.iface, mtu, opts, pushed)
        peer_vars = (*peer_env(peer, up.peer_common_name).items(), *up.peer_certificate_env)
        params = replace(params, session_env=(*params.session_env, *peer_vars))
        context = "restart" if restart else "init"
        await self.run_up(params, context, route_up=False)
        if pushed is not None:
            warn_unapplied(pushed)
        self._configure_routes(pushed, force=True)
        await self._run_route_up(params, context)
        self._apply_dns(pushed)

    def _null_device_pushed(self, pushed: PushedOptions | None) -> None:
        """`dev null` has no device: addresses, routes and DNS have nowhere to go; say which are skipped."""
        opts = self.opts
        unapplied = [
            name
            for name, given in (
                ("ifconfig", opts.ifconfig or (pushed is not None and pushed.ifconfig)),
                ("ifconfig-ipv6", opts.ifconfig_ipv6 or (pushed is not None and pushed.ifconfig_ipv6)),
                ("route", opts.routes or (pushed is not None and pushed.routes)),
                ("route-ipv6", opts.routes_ipv6 or (pushed is not None and pushed.routes_ipv6)),
                ("DNS", opts.dns_lines or (pushed is not None and pushed.dns_lines)),
            )
            if given
        ]
        if unapplied:
            log.warning("dev null: there is no device, so %s are not applied", ", ".join(unapplied))

    def _configure_routes(self, pushed: PushedOptions | None, *, force: bool) -> None:
        """Routes after `up`, as OpenVPN orders it; the server's address is the connection's."""
        assert self.iface is not None
        conn = self.current
        remote = conn.remote[0] if isinstance(conn, Connection) and conn.remote is not None else None
        self.routes.configure(self.opts, pushed, self.iface, remote, force=force)

    def _apply_dns(self, pushed: PushedOptions | None) -> None:
        """Configured and pushed DNS to the system resolver (`pyovpn-dns auto`), or say why not."""
        lines = [*self.opts.dns_lines, *(pushed.dns_lines if pushed else [])]
        if not lines or self.iface is None:
            self.dns.restore()  # a reconnect whose push has no DNS any more
            return
        try:
            settings = dnsopts.parse_dns_lines(lines)
        except ProtocolError as exc:
            log.error("DNS settings not applied: %s", exc)
            return
        for line in settings.windows_only:
            log.info("%r has no effect on Linux (a Windows DHCP setting); ignored", line)
        if self.opts.pyovpn_dns == "off" or self.opts.route_noexec:
            # route-noexec: whoever configures the routes (NetworkManager through its up helper, a
            # script) configures DNS too, as with OpenVPN, which never touches the resolver itself
            if not settings.is_empty():
                log.info(
                    "DNS %s not applied: `%s`; up/down scripts get it as foreign_option_N",
                    ", ".join(settings.servers + settings.domains),
                    "pyovpn-dns off" if self.opts.pyovpn_dns == "off" else "route-noexec",
                )
            return
        self.dns.apply(self.iface, settings)

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

    async def run_up(self, params: TunParams, context: str, *, route_up: bool = True) -> None:
        """The `up` script, once the device is open and configured; failing is fatal, as in OpenVPN.

        Then `route-up`, unless the caller runs it itself once it has added the routes.
        """
        self._tun_params = params
        command = self.opts.up
        if command:
            try:
                status = await self._run_up_down("up", command, params, context)
            except ScriptRefused as exc:
                raise ScriptFailed(str(exc)) from None
            if status != 0:
                raise ScriptFailed(f"up script {command} failed (exit status {status})")
        if route_up:
            await self._run_route_up(params, context)

    async def _run_route_up(self, params: TunParams, context: str) -> None:
        """`route-up`: once the routes are in place; OpenVPN only warns when it fails."""
        command = self.opts.route_up
        if not command:
            return
        env = up_down_env(params, context, signal="")
        env.pop("signal")  # route-up sees redirect_gateway (routes are done) but no signal
        try:
            status = await run_script(command, "route-up", env=env, script_security=self.opts.script_security)
        except ScriptRefused as exc:
            log.error("%s", exc)
            return
        if status != 0:
            log.warning("route-up script %s failed (exit status %d)", command, status)

    def _down_signal(self) -> str | None:
        """The `signal` of the down script: OpenVPN names a notified exit `exit-with-notification`."""
        o = self.opts
        notified = o.mode == "p2p" and o.proto == "udp" and o.explicit_exit_notify > 0
        if notified and self._exit_signal in ("SIGTERM", "SIGINT"):
            return "exit-with-notification"
        return self._exit_signal

    async def run_down(self, context: str = "init") -> None:
        """The `down` script, after the device closed, with what `up` was told."""
        params, self._tun_params = self._tun_params, None
        command = self.opts.down
        if not command or params is None:
            return
        try:
            status = await self._run_up_down(
                "down", command, params, context, exit_signal=self._down_signal()
            )
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
        self.dns.restore_stale()  # what a killed earlier run in this namespace left in the resolver
        loop = asyncio.get_running_loop()
        signals = self._next_signal(loop)
        if self._pending_signal is not None:
            signals.set_result(self._pending_signal)
        if self._handle_signals:
            for name in sorted(SIGNALS):
                loop.add_signal_handler(Signals[name], self.signal, name)
        if self._backend is None:
            compression.log_configured(self.opts)
            self._backend = await choice.open_backend(
                self.opts.dco,
                kernel_refusal=backendfit.kernel_refusal(self.opts),
                mssfix=self.opts.mssfix,
                engine=backendfit.userspace_engine(self.opts),
                workers=self.opts.engine_workers,
            )
        self.dc.subscribe(self._notify)
        self.backend_reason = await _backend_reason(self.opts.dco, self.dc.name)
        exit_code = 0
        first_packet: tuple[bytes, tuple[str, int] | None] | None = None
        status_task = asyncio.create_task(self._write_status()) if self.opts.status_file else None
        trim_task = asyncio.create_task(memory.give_back_periodically())
        try:
            await self._start_control()
            await self._start_management()
            if self.opts.metrics is not None:
                try:
                    self._metrics = start_metrics(self.opts.metrics, self.info, asyncio.get_running_loop())
                except (RuntimeError, OSError) as exc:
                    raise ConfigError(
                        f"pyovpn-metrics {self.opts.metrics[0]}:{self.opts.metrics[1]}: {exc}"
                    ) from None
            advanced = False
            while True:
                if self.connlist is not None and first_packet is None and not advanced:
                    try:
                        self.connlist.advance()
                    except connlist.GiveUp as exc:
                        log.error("Exiting: %s", exc)
                        exit_code = 1
                        break
                advanced = False
                stop = await self._run_one(signals, first_packet)
                first_packet = None
                if stop.by_a_signal:
                    if stop.reason is StopReason.SIGNAL_RESTART:
                        log.info("%s[soft,restart] received, process restarting", stop.signal)
                        self._mgmt_state("RECONNECTING", stop.signal or "")
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
                if stop.auth_failed and self.mgmt is not None:
                    self.mgmt.auth_failure(mgmt_protocol.AUTH, _auth_failed_reason(stop.message))
                if stop.auth_failed and self.credentials is not None and self.credentials.auth_failed():
                    log.warning("%s; auth-retry %s: trying again", stop.message, self.credentials.retry)
                    stop = Stop.restart(stop.message)
                elif stop.reason is StopReason.FATAL:
                    log.error("Exiting due to fatal error: %s", stop.message)
                    exit_code = stop.exit_code or 1
                    break
                if stop.first_packet is not None:
                    # the peer is already knocking again: answer it now (OpenVPN does too)
                    log.info("%s; restarting", stop.message)
                    self._mgmt_state("RECONNECTING", "connection-reset")
                    first_packet = stop.first_packet
                    continue
                delay = RESTART_DELAY
                if self.connlist is not None:
                    # the next server and OpenVPN's connect-retry backoff before trying it
                    try:
                        self.connlist.advance()
                    except connlist.GiveUp as exc:
                        log.error("%s; exiting: %s", stop.message, exc)
                        exit_code = 1
                        break
                    advanced = True
                    delay = self.connlist.delay()
                log.warning("%s; restarting in %.0f s", stop.message, delay)
                self.notifier.status(f"{stop.message}; reconnecting")
                self._mgmt_state("RECONNECTING", _restart_detail(stop.message))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(signals), delay)
                if signals.done():
                    name = signals.result()
                    if name in EXIT_SIGNALS:
                        log.info("%s[hard,] received, process exiting", name)
                        self._exit_signal = name
                        break
                    signals = self._next_signal(loop)
        finally:
            self._mgmt_state("EXITING", self._exit_signal or ("fatal-error" if exit_code else ""))
            self.notifier.stopping()
            for task in (status_task, trim_task):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await self._shutdown()
            if self.mgmt is not None:
                logging.getLogger().removeHandler(self._mgmt_log)
                await self.mgmt.close()
            if self._control is not None:
                await self._control.close()
            if self._metrics is not None:
                self._metrics.shutdown()
            if self.events is not None:
                self.events.close()
        return exit_code

    # ------------------------------------------------------------------ the management interface

    async def _start_control(self) -> None:
        """The control socket `pyovpn show` reads: /run/pyovpn/PID.sock, root only, always on."""
        try:
            os.makedirs(CONTROL_DIR, mode=0o700, exist_ok=True)
            _sweep_dead_sockets(CONTROL_DIR)
            server = ManagementServer(self, unix_path=os.path.join(CONTROL_DIR, f"{os.getpid()}.sock"))
            await server.start()
        except OSError as exc:
            log.info("no control socket for `pyovpn show` in %s: %s", CONTROL_DIR, exc)
            return
        self._control = server

    async def info(self) -> dict[str, object]:
        """This instance for `pyovpn show`: role, device, backend and why, peers with counters."""
        conn = self.current
        now = time.time()
        role = (
            "server"
            if self.opts.mode == "server"
            else "client"
            if self.opts.pull
            else f"p2p-{'server' if self.opts.tls_role == 'server' else 'client'}"
        )
        peers: list[dict[str, object]] = []
        if isinstance(conn, MultiServer):
            for client in list(conn.clients.values()):
                if not client.in_backend or client.peer_id is None:
                    continue
                pinfo = await self._peer_info(client.peer_id)
                ks = client.session.primary
                peers.append(
                    _peer_json(
                        pinfo,
                        now,
                        common_name=client.common_name,
                        username=client.username,
                        real_address=f"{client.addr[0]}:{client.addr[1]}",
                        vpn_ipv4=client.vpn_ip,
                        vpn_ipv6=client.vpn_ip6_address,
                        cipher=client.cipher,
                        connected_since=client.connected_since,
                        key_established=ks.established if ks is not None else 0.0,
                        keepalive=(self.opts.ping, self.opts.ping_restart),
                        rekeys=client.rekeys,
                        iv_ver=client.env.get("IV_VER", ""),
                        iv_plat=client.env.get("IV_PLAT", ""),
                    )
                )
        elif isinstance(conn, Connection) and conn.tunnel is not None and conn.peer_id is not None:
            pinfo = await self._peer_info(conn.peer_id)
            session = conn.session
            ks = session.primary if session is not None else None
            up = conn.tunnel
            remote = f"{conn.remote[0]}:{conn.remote[1]}" if conn.remote is not None else None
            peers.append(
                _peer_json(
                    pinfo,
                    now,
                    common_name=ks.tls.peer_common_name() if ks is not None else "",
                    username="",
                    real_address=remote,
                    # with net30/p2p addressing the second ifconfig word is the peer's address
                    vpn_ipv4=self._tun_params.ifconfig[1]
                    if self._tun_params
                    and self._tun_params.ifconfig
                    and self._tun_params.topology != "subnet"
                    else None,
                    vpn_ipv6=self._tun_params.ifconfig_ipv6_remote if self._tun_params else None,
                    cipher=up.cipher.value,
                    connected_since=conn.connected_since,
                    key_established=ks.established if ks is not None else 0.0,
                    keepalive=(up.keepalive_interval, up.keepalive_timeout),
                    rekeys=conn.rekeys,
                )
            )
        return {
            "schema": 1,
            "pid": os.getpid(),
            "config": list(self.opts.config_sources),
            "role": role,
            "interface": self.iface,
            "backend": self.dc.name if self._backend is not None else None,
            "backend_reason": self.backend_reason,
            "peers": peers,
            "auth_failures": conn.auth_failures if isinstance(conn, MultiServer) else 0,
            "time": now,
        }

    async def _start_management(self) -> None:
        o = self.opts
        if o.management is None and o.management_unix is None:
            return
        password = None
        if o.management_password_file:
            with open(o.management_password_file) as fh:
                password = fh.readline().rstrip("\r\n")
        self.mgmt = ManagementServer(
            self,
            address=o.management,
            unix_path=o.management_unix,
            password=password,
            hold=o.management_hold,
            log_cache=o.management_log_cache,
            forget_on_disconnect=o.management_forget_disconnect,
        )
        await self.mgmt.start()
        if o.management_unix and (o.management_client_user or o.management_client_group):
            uid, gid = privdrop.resolve(o.management_client_user, o.management_client_group)
            os.chown(o.management_unix, -1 if uid is None else uid, -1 if gid is None else gid)
        self._mgmt_log = ManagementLogHandler(self.mgmt)
        logging.getLogger().addHandler(self._mgmt_log)
        await self.mgmt.wait_hold_release()

    def _mgmt_state(self, name: str, detail: str = "", **where: str) -> None:
        if self.mgmt is not None:
            self.mgmt.state(mgmt_protocol.StateEntry(mgmt_protocol.now(), name, detail, **where))

    def _mgmt_connected(self) -> None:
        if self.mgmt is None:
            return
        conn = self.current
        tun4 = tun6 = remote_ip = remote_port = local_ip = local_port = ""
        if isinstance(conn, MultiServer):
            tun4, tun6 = conn.server_ip, conn.server_ip6 or ""
        else:
            params = self._tun_params
            tun4 = params.ifconfig[0] if params is not None and params.ifconfig else ""
            if isinstance(conn, Connection) and conn.remote is not None:
                remote_ip, remote_port = str(conn.remote[0]), str(conn.remote[1])
        sock = getattr(conn, "sock", None) if conn is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                name = sock.getsockname()
                local_ip, local_port = ("" if name[0] in ("0.0.0.0", "::") else str(name[0])), str(name[1])
        self._mgmt_state(
            "CONNECTED",
            "SUCCESS",
            tun4=tun4,
            remote_ip=remote_ip,
            remote_port=remote_port,
            local_ip=local_ip,
            local_port=local_port,
            tun6=tun6,
        )

    # management-query-passwords and the password commands (username/password go to the query)

    async def _ask_management(
        self, query: mgmt_protocol.PasswordQuery, signals: asyncio.Future[str]
    ) -> mgmt_protocol.PasswordQuery | Stop:
        """The management client's answers to ``query``; the Stop of a signal that came first."""
        assert self.mgmt is not None
        asking = asyncio.ensure_future(self.mgmt.query_password(query))
        await asyncio.wait((asking, signals), return_when=asyncio.FIRST_COMPLETED)
        if not asking.done():
            asking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asking
            return Stop.by_signal(signals.result())
        return asking.result()

    async def _key_passphrase_from_management(self, signals: asyncio.Future[str]) -> Stop | None:
        """`>PASSWORD:Need 'Private Key' password`; a wrong one is reported and, as OpenVPN does,
        asked again after a restart unless `auth-retry none` makes it fatal."""
        if self.mgmt is None:
            return Stop.fatal("the private key's passphrase was to come from the management interface")
        kind = mgmt_protocol.PRIVATE_KEY
        answered = await self._ask_management(mgmt_protocol.PasswordQuery(kind, password_only=True), signals)
        if isinstance(answered, Stop):
            return answered
        passphrase = answered.password or ""
        try:
            self.session_cfg = session_config(self.opts, lambda prompt, echo: passphrase)
        except ConfigError as exc:
            self.mgmt.auth_failure(kind)
            if self.auth_retry == "none":
                return Stop.fatal(f"private key password verification failed: {exc}")
            if self.auth_retry == "interact" and self.credentials is not None:
                self.credentials.forget()  # OpenVPN asks everything again
            return Stop.restart(f"private-key-password-failure: {exc}")
        self._key_from_management = False
        return None

    def auth_token_pushed(self, token: str) -> None:
        """Reconnects use it at once (not only from the next connection on); management clients
        hear of it each time, as from OpenVPN."""
        if self.credentials is not None:
            self.credentials.token_received(token)
        if self.mgmt is not None:
            self.mgmt.auth_token(token)

    @property
    def auth_retry(self) -> str:
        return self.credentials.retry if self.credentials is not None else self._auth_retry

    def set_auth_retry(self, mode: str) -> None:
        self._auth_retry = mode
        if self.credentials is not None:
            self.credentials.retry = mode

    def forget_passwords(self) -> None:
        if self.credentials is not None:
            self.credentials.forget()
        log.info("MANAGEMENT: passwords forgotten")

    @property
    def status_version(self) -> int:
        return self.opts.status_version

    @property
    def verb(self) -> int:
        return self._verb if self._verb is not None else self.opts.verb

    def set_verb(self, level: int) -> None:
        self._verb = level
        logging.getLogger().setLevel(_log_level(level))

    async def load_stats(self) -> tuple[int, int, int]:
        rows = await self.bytecounts()
        clients = sum(1 for cid, _, _ in rows if cid is not None)
        return clients, sum(r[1] for r in rows), sum(r[2] for r in rows)

    async def bytecounts(self) -> list[tuple[int | None, int, int]]:
        conn = self.current
        out: list[tuple[int | None, int, int]] = []
        if isinstance(conn, MultiServer):
            for client in list(conn.clients.values()):
                if client.in_backend and client.peer_id is not None:
                    info = await self._peer_info(client.peer_id)
                    if info is not None:
                        out.append((client.client_id, info.link_rx_bytes, info.link_tx_bytes))
        elif isinstance(conn, Connection) and conn.handed_over and conn.peer_id is not None:
            info = await self._peer_info(conn.peer_id)
            if info is not None:
                out.append((None, info.link_rx_bytes, info.link_tx_bytes))
        return out

    async def kill(self, target: str) -> str:
        conn = self.current
        if not isinstance(conn, MultiServer):
            return _NOT_IN_THIS_MODE.format("kill")
        if ":" in target and target.rsplit(":", 1)[1].isdigit():
            host, port = target.rsplit(":", 1)
            found = [c for c in conn.clients.values() if c.addr[0] == host and c.addr[1] == int(port)]
            if not found:
                return f"ERROR: client at address {host}:{port} not found"
            for c in found:
                await conn.kill_client(c, "killed by the management interface")
            return f"SUCCESS: {len(found)} client(s) at address {host}:{port} killed"
        found = [c for c in conn.clients.values() if c.common_name == target]
        if not found:
            return f"ERROR: common name '{target}' not found"
        for c in found:
            await conn.kill_client(c, "killed by the management interface")
        return f"SUCCESS: common name '{target}' found, {len(found)} client(s) killed"

    async def external_auth(self, cid: int, kid: int, env: dict[str, str]) -> ExternalAuth:
        if self.mgmt is None:
            return ExternalAuth(False, reason="management-client-auth without a management interface")
        return await self.mgmt.client_auth(cid, kid, env, timeout=float(self.opts.hand_window))

    def client_event(self, event: str, cid: int, env: dict[str, str] | None = None) -> None:
        if self.mgmt is not None and event in ("ESTABLISHED", "DISCONNECT"):
            self.mgmt.client_event(event, cid, env)
        if self.events is not None:
            e = env or {}
            name = {"ESTABLISHED": "connect", "DISCONNECT": "disconnect", "REKEY": "rekey"}.get(event, event)
            self.events.emit(
                name,
                client_id=cid,
                common_name=e.get("common_name", ""),
                real_address=f"{e.get('untrusted_ip', '')}:{e.get('untrusted_port', '')}",
            )

    async def client_kill(self, cid: int, message: str) -> str:
        conn = self.current
        if not isinstance(conn, MultiServer):
            return _NOT_IN_THIS_MODE.format("client-kill")
        found = [c for c in conn.clients.values() if c.in_backend and c.client_id == cid]
        if not found:
            return f"ERROR: client-kill command failed: client {cid} not found"
        for c in found:
            # OpenVPN sends the message as given (HALT,... makes the client exit), RESTART by default
            text = message or "RESTART"
            await conn.kill_client(c, f"killed by the management interface ({text})", text)
        return "SUCCESS: client-kill command succeeded"

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

    async def status_text(self, version: int | None = None) -> str:
        """The status file's text for the current connection or server, now."""
        version = version if version is not None else self.opts.status_version
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
            # a client that left must not hand its counters to the next client given its peer id
            live = {row.peer_id for row in rows}
            for gone in [pid for pid in self._refs if pid not in live]:
                del self._refs[gone]
            return status_file.render_server(rows, now, version, dco=self.dc.name == "kernel")
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

    async def _run_one(
        self, signals: asyncio.Future[str], first_packet: tuple[bytes, tuple[str, int] | None] | None = None
    ) -> Stop:
        """One connection (or server instance) until it ends or a signal ends it."""
        # as OpenVPN orders them: the 'Auth' credentials, then the 'Private Key' passphrase
        if self.credentials is not None and self.opts.mode != "server":
            asked = self.mgmt is not None and self.opts.management_query_passwords
            if asked and self.credentials.needs_answers():
                sc = self.credentials.challenge
                query = mgmt_protocol.PasswordQuery(challenge=(sc.text, sc.echo) if sc is not None else None)
                answered = await self._ask_management(query, signals)
                if isinstance(answered, Stop):
                    return answered
                self.credentials.supply(answered.username, answered.password or "")
        if self._key_from_management:
            stopped = await self._key_passphrase_from_management(signals)
            if stopped is not None:
                return stopped
        if self.credentials is not None and self.opts.mode != "server":
            try:
                user, password = await asyncio.to_thread(self.credentials.for_connection)
            except ConfigError as exc:
                return Stop.fatal(str(exc))
            self.session_cfg = replace(self.session_cfg, username=user, password=password)
        conn: Connection | MultiServer = (
            MultiServer(self) if self.opts.mode == "server" else Connection(self, first_packet, self.connlist)
        )
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
            if self.credentials is not None and isinstance(conn, Connection) and conn.session is not None:
                self.credentials.token_received(conn.session.auth_token)  # renewed during the session

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
        self.dns.restore()
        self.routes.undo()  # before the device goes, as OpenVPN deletes its routes first
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


# OpenVPN's reply to a server-only management command, then what would make it work
_NOT_IN_THIS_MODE = "ERROR: The '{}' command is not supported by the current daemon mode (a server's only)"


def _sweep_dead_sockets(directory: str) -> None:
    """Remove control sockets left by pyovpn processes that are gone (killed, or exited unprivileged)."""
    for entry in os.scandir(directory):
        pid = entry.name.removesuffix(".sock")
        if entry.name.endswith(".sock") and pid.isdigit() and not pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


async def _backend_reason(dco: str, name: str) -> str:
    """Why this backend, in the words of the `DCO:` log line."""
    if dco == "kernel":
        return "--dco kernel"
    if dco == "userspace":
        return "--dco userspace"
    if name == "kernel":
        return "auto: the kernel ovpn driver is present"
    ok, why = await asyncio.to_thread(choice.kernel_ovpn_status)
    return f"auto: {why}" if not ok else "auto"


def _peer_json(
    info: PeerInfo | None,
    now: float,
    *,
    connected_since: float,
    key_established: float,
    keepalive: tuple[int, int],
    **fields: object,
) -> dict[str, object]:
    return {
        **fields,
        "connected_since": connected_since or None,
        "last_handshake": key_established or None,
        "key_age_s": round(now - key_established, 1) if key_established else None,
        "rx_bytes": info.link_rx_bytes if info else None,
        "tx_bytes": info.link_tx_bytes if info else None,
        "vpn_rx_bytes": info.vpn_rx_bytes if info else None,
        "vpn_tx_bytes": info.vpn_tx_bytes if info else None,
        "keepalive": {"interval": keepalive[0], "timeout": keepalive[1]},
    }


def _log_level(verb: int) -> int:
    return logging.WARNING if verb <= 0 else logging.INFO if verb <= 4 else logging.DEBUG


def _credentials(opts: Options) -> Credentials | None:
    if opts.auth_user_pass is None:
        return None
    user, password = opts.auth_user_pass
    challenge = StaticChallenge(*opts.static_challenge) if opts.static_challenge else None
    return Credentials(user, password, nocache=opts.auth_nocache, retry=opts.auth_retry, challenge=challenge)


def _auth_failed_reason(message: str) -> str | None:
    """The reason of a server's `AUTH_FAILED,reason` (None for a bare AUTH_FAILED), from a Stop's text."""
    _, found, rest = message.partition("AUTH_FAILED,")
    if not found:
        return None
    return rest.split(": check auth-user-pass", 1)[0] or None


def _restart_detail(message: str) -> str:
    """The RECONNECTING state's detail word, as OpenVPN names the cause."""
    m = message.lower()
    if "inactivity" in m or "ping-restart" in m:
        return "ping-restart"
    if "auth" in m:
        return "auth-failure"
    return "connection-reset" if "reset" in m else "error"


def setup_logging(opts: Options) -> None:
    level = _log_level(opts.verb)
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
        if opts.mute > 0:
            h.addFilter(logsinks.MuteFilter(opts.mute))
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
        # SysLogHandler does not fail on a missing socket (it retries at each record and drops
        # it): look first, so the fallback to stderr really happens
        if not os.path.exists("/dev/log"):
            raise FileNotFoundError("no such socket")
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
    if opts.mode == "server" and opts.dns_lines:
        log.warning(
            "local dhcp-option/dns lines have no effect in server mode (the server's own resolver is "
            'not changed); to give clients DNS, push them: push "dhcp-option DNS ADDR"'
        )
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
