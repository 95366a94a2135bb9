"""The P2MP server instance: one UDP socket, many clients, each a sans-I/O Session and a data-channel peer.

It owns what OpenVPN's ``multi.c``/``mudp.c`` own: the stateless cookie handshake for new
clients, demultiplexing control packets by source address, the order of a client's checks
(:mod:`.auth`), its configuration (:mod:`.ccd`, :mod:`.pool`), per-client routes (VPN address
and iroutes as system routes via the tunnel device, as with OpenVPN DCO), and cleanup. One
client's failure only ever ends that client's session. Everything it needs from the daemon
comes through :class:`pyovpn.edge.host.ServerHost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

from pyovpn.datachannel import api
from pyovpn.datachannel.api import IfaceMode, Notification, PeerDelReason, Transport
from pyovpn.datachannel.api import normalize_address as _norm
from pyovpn.edge import compression, iface, sockets
from pyovpn.edge.host import ServerHost
from pyovpn.edge.iface import IROUTE_METRIC
from pyovpn.edge.instance import Instance
from pyovpn.edge.stop import Stop
from pyovpn.errors import AuthenticationError, BackendError, ProtocolError, PyovpnError
from pyovpn.net import rxbuf
from pyovpn.net.sockbuf import grow_buffers
from pyovpn.proto.cookie import CookieJar
from pyovpn.proto.packets import DATA_OPCODES, Opcode
from pyovpn.proto.session import ClientAuthRequest, Session, SessionClosed, TunnelUp
from pyovpn.proto.tlscryptv2 import RESEND_WKC_TLV, TlsCryptV2Server, offers_early_negotiation
from pyovpn.proto.tlswrap import NoWrap, TlsAuth, TlsCrypt, Wrap
from pyovpn.server import auth, authtoken
from pyovpn.server.ccd import place_client, read_ccd
from pyovpn.server.pool import AddressPool
from pyovpn.server.ratelimit import CONNECT_FREQ_INITIAL, ResetLimiter
from pyovpn.server.tcplinks import TcpLinks

log = logging.getLogger("pyovpn.server")

Addr = tuple[str, int]
SERVER_SOCKET_BUFFER = 4 << 20
RECV_BATCH = 256
SHUTDOWN_FLUSH_SECONDS = 0.2  # lets the EXIT notifications leave before the socket closes

ClientCommand = TunnelUp | api.NewKey | api.SwapKeys | api.DelKey | api.SendControl


@dataclass
class Client:
    addr: Addr
    session: Session
    peer_id: int | None = None
    common_name: str = ""
    username: str = ""
    vpn_ip: str | None = None
    vpn_ip6: str | None = None
    pool_ip: str | None = None
    iroutes: list[tuple[str, int]] = field(default_factory=list)
    iroutes6: list[tuple[str, int]] = field(default_factory=list)
    in_backend: bool = False
    timer: asyncio.TimerHandle | None = None
    timer_at: float = 0.0  # when ``timer`` fires
    env: dict[str, str] = field(default_factory=dict)
    # for the status file and management: set when the data channel takes the client
    connected_since: float = 0.0
    client_id: int = -1  # -1 until the management interface or the data channel needs it
    cipher: str = ""
    rekeys: int = 0

    @property
    def vpn_ip6_address(self) -> str | None:
        """The IPv6 address without its prefix length, as routes and the data channel want it."""
        return self.vpn_ip6.split("/")[0] if self.vpn_ip6 else None


class MultiServer(Instance[tuple[Client, ClientCommand]]):
    """The P2MP server instance the daemon runs in place of a single-peer Connection."""

    def __init__(self, host: ServerHost) -> None:
        super().__init__()
        self.host = host
        self.opts = host.opts
        self.opened: str | None = None  # the device this instance opened
        self.cfg = replace(host.session_cfg, mode_server=True)
        # OpenVPN's server frames every client's packets as its own comp-lzo/compress says
        self.framing = compression.session_framing(host.opts, None, host.dc.capabilities, host.dc.name)
        self.jar = CookieJar(os.urandom(32), hand_window=self.opts.hand_window)
        o = self.opts
        self.tokens = authtoken.authority(o.auth_gen_token, o.auth_gen_token_secret, o.reneg_sec, os.urandom)
        self.clients: dict[Addr, Client] = {}
        self.by_peer: dict[int, Client] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._reset_budget = ResetLimiter(*CONNECT_FREQ_INITIAL)
        self._acks_owed: dict[Addr, Client] = {}  # clients with ACKs to send after this receive batch
        self._free_peer_ids: list[int] = []  # a heap of released peer ids below _next_peer_id
        self._next_peer_id = 0
        self._next_client_id = 0  # OpenVPN's CID: one per connection, never reused
        self.auth_failures = 0  # clients refused at authentication (metrics)
        self.pool = AddressPool.from_options(self.opts)
        self.server_ip, self.netmask = self.opts.ifconfig or ("", "")
        self.server_ip6 = self.opts.ifconfig_ipv6[0].split("/")[0] if self.opts.ifconfig_ipv6 else None
        self.tcp: TcpLinks | None = None  # proto tcp-server: the client streams (else the UDP socket)

    @property
    def ifname(self) -> str:
        return self.host.iface or "tun0"

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        # keep a reference: the event loop holds tasks only weakly
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ setup

    def _fresh_wrap(self, *, check: bool = True) -> Wrap:
        c = self.cfg
        if c.tls_crypt_v2_server is not None:
            # the metadata check (maybe a script) runs once per client, when its session starts
            verify = c.tls_crypt_v2_check if check else None
            return TlsCryptV2Server(c.tls_crypt_v2_server, check=verify, replay_window=c.replay_window)
        if c.tls_crypt_key is not None:
            return TlsCrypt(c.tls_crypt_key, is_server=True, replay_window=c.replay_window)
        if c.tls_auth_key is not None:
            return TlsAuth(c.tls_auth_key, c.key_direction, c.auth_digest, c.replay_window)
        return NoWrap()

    async def _setup(self) -> None:
        o = self.opts
        if o.proto == "tcp-server":
            self.tcp = TcpLinks(
                self.loop,
                self._on_packet,
                self._on_tcp_closed,
                hand_window=o.hand_window,
                is_up=lambda addr: (c := self.clients.get(addr)) is not None and c.in_backend,
            )
            self.tcp.listen(o)  # bound at once, like the UDP socket: a port in use fails here
        else:
            sock = sockets.open_server_udp(o)
            # bursts of handshakes (and mass EXITs) overflow the default ~200 KiB receive buffer
            grow_buffers(sock, SERVER_SOCKET_BUFFER)
            sock.setblocking(False)
            self.sock = sock
        name = o.dev if o.dev not in ("tun", "") else "tun0"
        if self.host.iface is not None:
            # a restart (SIGUSR1/SIGHUP): like OpenVPN without persist-tun, the device the last
            # instance opened is closed and opened again (the backend drives one at a time)
            with contextlib.suppress(PyovpnError):
                await self.host.dc.request(api.DelIface(self.host.iface))
            log.info("Closing TUN/TAP interface %s", self.host.iface)
            self.host.iface = None
        await self.host.clean_stale_link(name)
        await self.host.dc.request(api.NewIface(name, IfaceMode.MP, o.tun_mtu))
        self.host.iface = self.opened = name
        await asyncio.to_thread(iface.configure_server, self.host.net, name, o)
        log.info("TUN/TAP device %s opened, MP mode (%s data channel)", name, self.host.dc.name)
        if o.topology == "net30":
            log.warning(
                "topology net30 on a server: each client takes a /30 of the pool; OpenVPN 2.6 "
                "deprecates it for servers, use `topology subnet` when the clients allow"
            )
        await self.host.run_up(iface.server_tun_params(name, o), "init")
        if self.tcp is not None:
            self.tcp.accept()  # connections made meanwhile waited in the listen backlog
            return
        assert self.sock is not None
        log.info(
            "UDPv%s link local (bound): %s",
            "6" if self.sock.family == socket.AF_INET6 else "4",
            self.sock.getsockname()[:2],
        )
        self._start_reading()

    # ------------------------------------------------------------------ run / stop

    async def run(self) -> Stop:
        try:
            await self._setup()
        except Stop as stop:
            return stop
        except PyovpnError as exc:
            return Stop.fatal(str(exc))
        self._start_worker()
        log.info("Initialization Sequence Completed")
        try:
            self.host.after_init()
        except PyovpnError as exc:
            return Stop.fatal(str(exc))
        return await self._until_stopped()

    async def _teardown(self) -> None:
        now = time.time()
        for client in list(self.clients.values()):
            client.session.close(now)
            self._send(client)
        await asyncio.sleep(SHUTDOWN_FLUSH_SECONDS if self.clients else 0)
        for client in list(self.clients.values()):
            await self._remove_client(client, "server shutdown", notify_backend=True)
        await self._drain_worker()
        if self.tcp is not None:
            self.tcp.close_all()
        if self.sock is not None:
            self._stop_reading()
            self.sock.close()

    # ------------------------------------------------------------------ packets

    def _on_readable(self) -> None:
        assert self.sock is not None
        for _ in range(RECV_BATCH):
            try:
                data, sa = rxbuf.recvfrom(self.sock, 65535)
            except BlockingIOError:
                return
            except OSError as exc:
                log.debug("recvfrom: %s", exc)
                return
            self._on_packet(data, (sa[0], sa[1]))

    def _on_packet(self, data: bytes, source: Addr) -> None:
        if not data or data[0] >> 3 in DATA_OPCODES:
            return
        key = _norm(source)
        client = self.clients.get(key)
        now = time.time()
        if client is None:
            self._new_client_packet(data, source, key, now)
            return
        client.session.receive(data, now)
        self._pump(client)

    def _new_client_packet(self, data: bytes, source: Addr, key: Addr, now: float) -> None:
        op = data[0] >> 3
        if self.tcp is not None and op == Opcode.CONTROL_HARD_RESET_CLIENT_V2:
            # the TCP connection proved the address: no cookie round trip (as in OpenVPN)
            cfg, wrap = self.cfg, self._fresh_wrap()
            self._admit(key, data, now, "TCP", lambda: Session(cfg, rng=os.urandom, now=now, wrap=wrap))
            return
        if op == Opcode.CONTROL_HARD_RESET_CLIENT_V3 and not offers_early_negotiation(data):
            self._new_tls_crypt_v2_client(data, source, key, now)
            return
        if op == Opcode.CONTROL_WKC_V1:
            self._tls_crypt_v2_proof(data, source, key, now)
            return
        try:
            if op in (Opcode.CONTROL_HARD_RESET_CLIENT_V2, Opcode.CONTROL_HARD_RESET_CLIENT_V3):
                if not self._reset_budget.take(key[0], now):
                    log.debug("dropped reset from %s: connect-freq-initial budget exhausted", key)
                    return
                # a 2.6 tls-crypt-v2 client: answer statelessly and have it resend WKc (as 2.6 does)
                tlv = RESEND_WKC_TLV if op == Opcode.CONTROL_HARD_RESET_CLIENT_V3 else b""
                reply = self.jar.reply_to_reset(data, key, now, self._fresh_wrap(check=False), tlv)
                self._sendto(reply, source)
                return
            proof = self.jar.check_proof(data, key, now, self._fresh_wrap())
            self._reset_budget.refund(key[0])  # a reset that became a real client does not count
        except AuthenticationError as exc:
            if op == Opcode.CONTROL_HARD_RESET_CLIENT_V3:
                log.warning("%s:%d tls-crypt-v2 client key refused: %s", key[0], key[1], exc)
            else:
                log.debug("dropped packet from %s: %s", key, exc)
            return
        except ProtocolError as exc:
            log.debug("dropped packet from %s: %s", key, exc)
            return
        self._admit(
            key,
            data,
            now,
            "cookie verified",
            lambda: Session.after_cookie(self.cfg, proof, rng=os.urandom, now=now),
        )

    def _admit(
        self, key: Addr, data: bytes, now: float, how: str, new_session: Callable[[], Session]
    ) -> None:
        """Start a client session with its first accepted packet, unless max-clients is reached."""
        if len(self.clients) >= self.opts.max_clients:
            log.warning("MULTI: new client %s refused: max-clients reached", key)
            return
        session = new_session()
        client = Client(key, session)
        self.clients[key] = client
        log.info("%s:%d new client session (%s)", *key, how)
        session.receive(data, now)
        self._pump(client)

    def _admit_with_client_key(
        self, key: Addr, data: bytes, now: float, how: str, new_session: Callable[[TlsCryptV2Server], Session]
    ) -> None:
        """:meth:`_admit` a tls-crypt-v2 client whose key (WKc at the end of ``data``) we accept."""
        c = self.cfg
        assert c.tls_crypt_v2_server is not None
        wrap = TlsCryptV2Server(
            c.tls_crypt_v2_server, check=c.tls_crypt_v2_check, replay_window=c.replay_window
        )
        try:
            wrap.accept_client_key(data)
        except ProtocolError as exc:
            log.warning("%s:%d tls-crypt-v2 client key refused: %s", key[0], key[1], exc)
            return
        self._reset_budget.refund(key[0])
        self._admit(key, data, now, how, lambda: new_session(wrap))

    def _new_tls_crypt_v2_client(self, data: bytes, source: Addr, key: Addr, now: float) -> None:
        """A tls-crypt-v2 client's V3 reset: unwrap its key and keep state from the first packet.

        Without the client's key the server cannot build a stateless reply, so (like OpenVPN for
        clients that do not resend WKc) the session starts here; the connect-freq budget bounds it.
        We never ask the client to resend WKc, so it continues with plain CONTROL_V1 packets.
        """
        c = self.cfg
        if c.tls_crypt_v2_server is None:
            log.warning(
                "%s:%d sent a tls-crypt-v2 reset, but this server has no `tls-crypt-v2` key; dropped", *key
            )
            return
        if not self._reset_budget.take(key[0], now):
            log.debug("dropped reset from %s: connect-freq-initial budget exhausted", key)
            return
        self._admit_with_client_key(
            key,
            data,
            now,
            "tls-crypt-v2 client key accepted",
            lambda w: Session(c, rng=os.urandom, now=now, wrap=w),
        )

    def _tls_crypt_v2_proof(self, data: bytes, source: Addr, key: Addr, now: float) -> None:
        """A tls-crypt-v2 client's WKC_V1 after our stateless reset: cookie, then its key."""
        c = self.cfg
        if c.tls_crypt_v2_server is None:
            log.debug("dropped P_CONTROL_WKC_V1 from %s: no tls-crypt-v2 key configured", key)
            return
        try:
            proof = self.jar.check_proof(data, key, now, self._fresh_wrap(check=False))
        except ProtocolError as exc:
            log.debug("dropped packet from %s: %s", key, exc)
            return
        how = "cookie verified, tls-crypt-v2 client key accepted"
        self._admit_with_client_key(
            key, data, now, how, lambda w: Session.after_cookie(c, proof, rng=os.urandom, now=now, wrap=w)
        )

    def _sendto(self, packet: bytes, dest: Addr) -> None:
        if self.tcp is not None:
            self._send_tcp(packet, dest)
            return
        assert self.sock is not None
        host = dest[0]
        if self.sock.family == socket.AF_INET6 and "." in host and not host.startswith("::ffff:"):
            host = "::ffff:" + host
        try:
            self.sock.sendto(packet, (host, dest[1]))
        except OSError as exc:
            log.debug("sendto %s: %s", dest, exc)

    def _send_tcp(self, packet: bytes, dest: Addr) -> None:
        """On the stream while we own it; after the hand-over through the data channel, in order."""
        assert self.tcp is not None
        if self.tcp.send(dest, packet):
            return
        client = self.clients.get(dest)
        if client is not None and client.peer_id is not None and dest in self.tcp.links:
            # handed over (or being handed over: the queue keeps it behind NewPeer)
            self._cmds.put_nowait((client, api.SendControl(client.peer_id, packet)))

    def _on_tcp_closed(self, addr: Addr, reason: str) -> None:
        client = self.clients.get(addr)
        if client is not None:
            self._spawn(self._remove_client(client, reason, notify_backend=True))

    def _send(self, client: Client, *, ack_only: bool = True) -> None:
        for pkt in client.session.packets_to_send(ack_only=ack_only):
            self._sendto(pkt, client.addr)

    def _pump(self, client: Client) -> None:
        """Send what the session has to send now, act on its events and keep its timer current.

        Replies go out at once; ACKs that no reply carried wait until the end of the current
        batch of received packets (:meth:`_send_owed_acks`), so a message that arrives in
        several packets (a ClientHello, a certificate) costs one ACK, or none when the
        answer carries it.
        """
        sess = client.session
        while True:
            events = sess.events()
            if not events:
                break
            for ev in events:
                if isinstance(ev, ClientAuthRequest):
                    if self._auth_needs_task(client, ev):
                        self._spawn(self._authenticate(client, ev))
                    else:
                        self._authenticate_now(client, ev)
                elif isinstance(ev, SessionClosed):
                    self._send(client)
                    self._spawn(self._remove_client(client, ev.reason, notify_backend=True))
                    return
                elif isinstance(ev, (TunnelUp, api.NewKey, api.SwapKeys, api.DelKey)):
                    if isinstance(ev, api.NewKey) and ev.key_id != 0 and client.client_id >= 0:
                        client.rekeys += 1
                        self.host.client_event("REKEY", client.client_id, client.env)
                    self._cmds.put_nowait((client, ev))
        # after the events: an accepted client's PUSH_REPLY shares the key-method-2 reply's packet
        self._send(client, ack_only=False)
        if sess.acks_owed:
            if not self._acks_owed:
                self.loop.call_soon(self._send_owed_acks)
            self._acks_owed[client.addr] = client
        deadline = sess.next_timer()
        if deadline is None:
            if client.timer:
                client.timer.cancel()
                client.timer = None
        elif client.timer is None or deadline < client.timer_at:
            # a timer that fires early costs one handle_timer() that finds nothing due, and
            # saves a cancel + call_later for nearly every packet
            if client.timer:
                client.timer.cancel()
            client.timer_at = deadline
            client.timer = self.loop.call_later(
                max(0.0, deadline - time.time()) + 0.001, self._on_timer, client
            )

    def _send_owed_acks(self) -> None:
        owed, self._acks_owed = self._acks_owed, {}
        for addr, client in owed.items():
            if self.clients.get(addr) is client:
                self._send(client)

    def _on_timer(self, client: Client) -> None:
        client.timer = None
        if self.clients.get(client.addr) is client:
            client.session.handle_timer(time.time())
            self._pump(client)

    # ------------------------------------------------------------------ authentication and config

    def _cid(self, client: Client) -> int:
        """The client's management id (CID), given once per connection."""
        if client.client_id < 0:
            client.client_id = self._next_client_id
            self._next_client_id += 1
        return client.client_id

    def _auth_identity(self, client: Client, req: ClientAuthRequest) -> dict[str, str]:
        cn = auth.common_name(self.opts, req)
        client.common_name, client.username = cn, req.username
        client.env = auth.auth_env(cn, req, client.addr)
        return client.env

    def _duplicates(self, client: Client) -> list[Client]:
        if self.opts.duplicate_cn:
            return []
        cn = client.common_name
        return [
            other
            for other in self.clients.values()
            if other is not client and other.common_name == cn and other.peer_id is not None
        ]

    def _auth_needs_task(self, client: Client, req: ClientAuthRequest) -> bool:
        """Whether answering this client has to wait for something (a script, dropping a duplicate)."""
        if auth.must_wait(self.opts):
            return True
        self._auth_identity(client, req)
        return bool(self._duplicates(client))

    def _authenticate_now(self, client: Client, req: ClientAuthRequest) -> None:
        """No scripts to run: accept or reject the client within the packet that completed its handshake.

        The session then sends its key-method-2 reply and the PUSH_REPLY together, without a
        trip through the event loop; the caller (:meth:`_pump`) sends them.
        """
        self._auth_identity(client, req)
        try:
            push = self._client_config(client)
        except PyovpnError as exc:
            log.warning("%s: client rejected: %s", client.common_name, exc)
            client.session.reject_client(time.time(), str(exc))
            return
        if push is not None:
            self._accept(client, push)

    def _client_config(self, client: Client, extra: tuple[str, ...] = ()) -> list[str] | None:
        """The client's push list from the client-config-dir and the pool; None if ccd disables it.

        ``extra``: config lines a management client gave with `client-auth`, read like a
        client-config-dir file after the client's own file.
        """
        ccd = read_ccd(self.opts, client.common_name, extra)
        if ccd is not None and ccd.disable:
            client.session.reject_client(time.time(), "client disabled in client-config-dir")
            return None
        placed = place_client(self.opts, ccd, self.pool, client.common_name, self.server_ip, self.server_ip6)
        client.vpn_ip, client.vpn_ip6, client.pool_ip = placed.vpn_ip, placed.vpn_ip6, placed.pool_ip
        client.iroutes += placed.iroutes
        client.iroutes6 += placed.iroutes6
        return placed.push

    def _new_peer_id(self) -> int:
        if self._free_peer_ids:
            return heapq.heappop(self._free_peer_ids)
        peer_id = self._next_peer_id
        self._next_peer_id += 1
        return peer_id

    def _release_peer_id(self, peer_id: int) -> None:
        heapq.heappush(self._free_peer_ids, peer_id)

    def _assign_peer_id(self, client: Client) -> int:
        peer_id = self._new_peer_id()
        client.peer_id = peer_id
        self.by_peer[peer_id] = client
        return peer_id

    def _accept(self, client: Client, push: list[str]) -> None:
        peer_id = client.peer_id if client.peer_id is not None else self._assign_peer_id(client)
        client.session.accept_client(time.time(), peer_id=peer_id, push=push)
        log.info(
            "%s/%s:%d MULTI: primary virtual IP %s, peer-id %d",
            client.common_name,
            *client.addr,
            client.vpn_ip,
            peer_id,
        )

    async def _script(self, command: str | None, script_type: str, client: Client, *args: str) -> int:
        return await auth.run_client_script(self.opts, command, script_type, client.env, client.vpn_ip, *args)

    async def _authenticate(self, client: Client, req: ClientAuthRequest) -> None:
        o = self.opts
        env = self._auth_identity(client, req)
        cn = client.common_name
        renewing: authtoken.Token | None = None
        if self.tokens is not None and req.password.startswith(authtoken.TOKEN_PREFIX):
            checked = self.tokens.check(req.username, req.password, int(time.time()))
            if isinstance(checked, str):
                log.warning("%s: %s", cn, checked)
                self._reject(client, "SESSION: auth-token rejected")
                return
            renewing = checked
        # a valid token stands for the password; with external-auth the script still decides
        token_login = renewing is not None and not (o.auth_gen_token and o.auth_gen_token[2])
        try:
            if (
                o.auth_user_pass_verify
                and not token_login
                and not await auth.user_pass_verify(o.auth_user_pass_verify, req, env)
            ):
                log.warning("%s TLS Auth Error: Auth Username/Password verification failed for peer", cn)
                self._reject(client, "")
                return
            extra_config: tuple[str, ...] = ()
            if o.management_client_auth:
                verdict = await self.host.external_auth(self._cid(client), 0, env)
                if not verdict.accept:
                    log.warning("%s: client denied by the management interface: %s", cn, verdict.reason)
                    self._reject(client, verdict.client_reason)
                    return
                extra_config = verdict.config
            for other in self._duplicates(client):
                log.info(
                    "MULTI: new connection by client '%s' will cause previous active sessions by "
                    "this client to be dropped",
                    cn,
                )
                await self._remove_client(other, "duplicate common name", notify_backend=True)
            if await self._script(o.tls_verify, "tls-verify", client, "0", f"CN={cn}") != 0:
                self._reject(client, "tls-verify script refused the certificate")
                return
            push = self._client_config(client, extra_config)
            if push is None:
                self._pump(client)
                return
            if self.tokens is not None:
                push.append(f"auth-token {self.tokens.mint(req.username, int(time.time()), renewing)}")
        except PyovpnError as exc:
            log.warning("%s: client rejected: %s", cn, exc)
            self._reject(client, str(exc))
            return
        if self.clients.get(client.addr) is not client:
            return
        self._assign_peer_id(client)
        await self._script(o.client_connect, "client-connect", client)
        self._accept(client, push)
        self._pump(client)

    def _reject(self, client: Client, reason: str) -> None:
        self.auth_failures += 1
        client.session.reject_client(time.time(), reason)
        self._pump(client)

    # ------------------------------------------------------------------ data channel

    async def _command_worker(self) -> None:
        while True:
            item = await self._cmds.get()
            if item is None:
                return
            client, cmd = item
            if self.clients.get(client.addr) is not client:
                continue
            try:
                if isinstance(cmd, TunnelUp):
                    await self._client_up(client, cmd)
                else:
                    await self.host.dc.request(cmd)
            except PyovpnError as exc:
                log.warning("%s: data channel error, dropping this client: %s", client.common_name, exc)
                await self._remove_client(client, f"data channel error: {exc}", notify_backend=True)

    async def _client_up(self, client: Client, up: TunnelUp) -> None:
        vpn6 = client.vpn_ip6_address
        o = self.opts
        if self.tcp is not None:
            if not self.tcp.owns(client.addr):
                raise BackendError("the client's TCP connection is gone")
            # its own connection, positioned at a frame boundary; unframed bytes go along
            fd, backlog = self.tcp.hand_over(client.addr)
            transport, remote = Transport.TCP, None
        else:
            assert self.sock is not None
            # the shared server socket: the data channel demultiplexes by peer address
            fd, backlog, transport, remote = self.sock.fileno(), b"", Transport.UDP, client.addr
        await self.host.dc.request(
            api.NewPeer(
                peer_id=up.peer_id,
                transport=transport,
                remote=remote,
                socket_fd=fd,
                tcp_backlog=backlog,
                vpn_ipv4=client.vpn_ip,
                vpn_ipv6=vpn6,
                keepalive_interval=o.ping,
                keepalive_timeout=o.ping_restart,
                framing=self.framing,
                passtos=o.passtos,
            )
        )
        client.in_backend = True
        client.connected_since = time.time()
        client.cipher = up.cipher.value
        self._cid(client)
        self.host.client_event("ESTABLISHED", client.client_id, client.env)
        # the data channel reads the shared socket from now on and passes control packets up
        self._stop_reading()
        for net, plen, gateway in self._iroutes(client):
            await asyncio.to_thread(self.host.net.add_route, self.ifname, net, plen, gateway, IROUTE_METRIC)
        await self._script(
            o.learn_address, "learn-address", client, "add", client.vpn_ip or "", client.common_name
        )
        log.info(
            "%s/%s:%d Data Channel: cipher '%s', peer-id %d",
            client.common_name,
            *client.addr,
            up.cipher.value,
            up.peer_id,
        )

    @staticmethod
    def _iroutes(client: Client) -> list[tuple[str, int, str | None]]:
        """The client's iroutes (IPv4 and IPv6) as (network, prefix length, gateway) routes."""
        v4 = [(net, plen, client.vpn_ip) for net, plen in client.iroutes]
        return v4 + [(net, plen, client.vpn_ip6_address) for net, plen in client.iroutes6]

    async def kill_client(self, client: Client, reason: str, message: str | None = None) -> None:
        """Management `kill`/`client-kill`: drop the client, first sending it ``message``.

        As in OpenVPN 2.6, `client-kill` sends a message (RESTART: reconnect, HALT: exit) and
        `kill` sends none: that client finds out at its ping-restart.
        """
        if message is not None:
            client.session.send_text(message)
            self._pump(client)
            await asyncio.sleep(0.2)  # the message leaves before the peer is deleted
        await self._remove_client(client, reason, notify_backend=True)

    async def _remove_client(self, client: Client, reason: str, *, notify_backend: bool) -> None:
        if self.clients.get(client.addr) is not client:
            return
        del self.clients[client.addr]
        if client.timer:
            client.timer.cancel()
        if client.peer_id is not None and self.by_peer.get(client.peer_id) is client:
            del self.by_peer[client.peer_id]
            self._release_peer_id(client.peer_id)
        log.info("%s/%s:%d client disconnected: %s", client.common_name or "?", *client.addr, reason)
        if client.client_id >= 0:
            self.host.client_event("DISCONNECT", client.client_id, client.env)
        if client.in_backend and notify_backend and client.peer_id is not None:
            with contextlib.suppress(PyovpnError):
                await self.host.dc.request(api.DelPeer(client.peer_id))
        if self.tcp is not None:
            self.tcp.close(client.addr)  # the data channel has given the connection back
        # both families: an iroute-ipv6 left behind would make the client's next connect fail (EEXIST)
        for net, plen, gateway in self._iroutes(client):
            with contextlib.suppress(PyovpnError):
                await asyncio.to_thread(
                    self.host.net.del_route, self.ifname, net, plen, gateway, IROUTE_METRIC
                )
        if client.pool_ip and self.pool is not None:
            self.pool.release(client.pool_ip)
        if client.peer_id is not None:
            await self._script(self.opts.client_disconnect, "client-disconnect", client)
            await self._script(
                self.opts.learn_address, "learn-address", client, "delete", client.vpn_ip or ""
            )
        if not any(c.in_backend for c in self.clients.values()):
            self._start_reading()

    def on_notification(self, n: Notification) -> None:
        if isinstance(n, api.IfaceDeleted):
            if n.name == self.opened:
                # every client went with the device (e.g. a userspace engine process died): a
                # soft restart opens it again, and the clients reconnect at their ping-restart
                self.opened = None
                self.stop(Stop.restart(f"TUN/TAP device {n.name} is gone ({n.reason})"))
        elif isinstance(n, api.ControlPacket):
            if n.remote is not None:
                self._on_packet(n.packet, n.remote)
            elif (client := self.by_peer.get(n.peer_id)) is not None:  # TCP: the stream is the client
                self._on_packet(n.packet, client.addr)
        elif isinstance(n, api.PeerDeleted):
            client = self.by_peer.get(n.peer_id)
            if client is None or n.reason is PeerDelReason.USERSPACE:
                return
            client.in_backend = False
            why = (
                "Inactivity timeout (--ping-restart)" if n.reason is PeerDelReason.EXPIRED else n.reason.name
            )
            self._spawn(self._remove_client(client, why, notify_backend=False))
        elif isinstance(n, api.PeerFloated):
            client = self.by_peer.get(n.peer_id)
            if client is not None and self.opts.float_:
                self.clients.pop(client.addr, None)
                client.addr = _norm(n.remote)
                self.clients[client.addr] = client
        elif isinstance(n, api.KeyExhausted):
            client = self.by_peer.get(n.peer_id)
            if client is not None:
                client.session.request_renegotiation(time.time())
                self._pump(client)
