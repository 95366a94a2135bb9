"""The P2MP server edge: one UDP socket, many clients, each a sans-I/O Session and a data-channel peer.

It owns what OpenVPN's ``multi.c``/``mudp.c`` own: the stateless cookie handshake for new
clients, demultiplexing control packets by source address, client authentication (scripts,
certificate policy), the address pool and client-config-dir, the push list, per-client routes
(VPN address and iroutes as system routes via the tunnel device, as with OpenVPN DCO), and
cleanup. One client's failure only ever ends that client's session.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import ipaddress
import logging
import os
import socket
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyovpn.datachannel.api import (
    ControlPacket,
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
    SwapKeys,
    Transport,
)
from pyovpn.datachannel.api import normalize_address as _norm
from pyovpn.errors import ConfigError, ProtocolError, PyovpnError
from pyovpn.net import tun
from pyovpn.net.sockbuf import grow_buffers
from pyovpn.proto.cookie import CookieJar
from pyovpn.proto.packets import DATA_OPCODES, Opcode
from pyovpn.proto.session import ClientAuthRequest, Session, SessionClosed, TunnelUp
from pyovpn.proto.tlswrap import NoWrap, TlsAuth, TlsCrypt, Wrap
from pyovpn.scripts import ScriptRefused, TunParams, run_script

if TYPE_CHECKING:
    from pyovpn.daemon import Daemon, _Stop

log = logging.getLogger("pyovpn.server")

Addr = tuple[str, int]
# OpenVPN DCO installs iroutes with this metric, so they coexist with a `route` for the same network
IROUTE_METRIC = 100
SERVER_ROUTE_METRIC = 200
SERVER_SOCKET_BUFFER = 4 << 20
# In the spirit of OpenVPN's connect-freq-initial, stateless replies are rate limited so a
# replayed or spoofed reset cannot turn the server into a reflector; per source IP (a bounded
# table) rather than globally, so a flood from some addresses does not lock out real clients.
CONNECT_FREQ_INITIAL = (100, 10.0)
RESET_LIMITER_ENTRIES = 16384


def _bind_server_socket(af: int, address: tuple[Any, ...], dual_stack: bool) -> socket.socket:
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


class ResetLimiter:
    """Per-source-IP token buckets in a bounded LRU table (memory stays flat under any flood)."""

    def __init__(self, capacity: int, period: float, entries: int = RESET_LIMITER_ENTRIES) -> None:
        self.capacity, self.period, self.entries = capacity, period, entries
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, ip: str, now: float) -> bool:
        bucket = self._buckets.pop(ip, None) or TokenBucket(self.capacity, self.period)
        self._buckets[ip] = bucket
        if len(self._buckets) > self.entries:
            self._buckets.popitem(last=False)
        return bucket.take(now)

    def refund(self, ip: str) -> None:
        bucket = self._buckets.get(ip)
        if bucket is not None:
            bucket.refund()


class TokenBucket:
    def __init__(self, capacity: int, period: float) -> None:
        self.capacity = capacity
        self.rate = capacity / period
        self.tokens = float(capacity)
        self.stamp: float | None = None

    def take(self, now: float) -> bool:
        if self.stamp is not None:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def refund(self) -> None:
        self.tokens = min(self.capacity, self.tokens + 1)


class AddressPool:
    """IPv4 (and optional IPv6) addresses for clients; sticky per common name like ifconfig-pool-persist."""

    def __init__(
        self, first: str, last: str, netmask: str, v6_base: str | None, persist_file: str | None = None
    ) -> None:
        self.netmask = netmask
        start, end = int(ipaddress.IPv4Address(first)), int(ipaddress.IPv4Address(last))
        if end < start:
            raise ConfigError(f"ifconfig-pool {first} {last}: the end is before the start")
        # a heap, lowest address first; may hold taken addresses (a sticky one taken out of
        # order, or one pushed twice): _used is the truth and acquire() skips those
        self._free = list(range(start, end + 1))
        self._start, self._end = start, end
        self._v6 = ipaddress.IPv6Interface(v6_base) if v6_base else None
        self._used: dict[int, str] = {}  # address -> common name
        self._sticky: dict[str, int] = {}
        self._persist = persist_file
        if persist_file and os.path.exists(persist_file):
            for line in Path(persist_file).read_text().splitlines():
                parts = line.split(",")
                if len(parts) >= 2:
                    with contextlib.suppress(ValueError):
                        self._sticky[parts[0]] = int(ipaddress.IPv4Address(parts[1]))

    @property
    def has_ipv6(self) -> bool:
        return self._v6 is not None

    def _v6_for(self, v4: int, start: int) -> str | None:
        if self._v6 is None:
            return None
        addr = self._v6.ip + (v4 - start)
        return f"{addr}/{self._v6.network.prefixlen}"

    def acquire(self, cn: str, *, exclusive_cn: bool) -> tuple[str, str | None]:
        want = self._sticky.get(cn) if exclusive_cn else None
        if want is not None and self._start <= want <= self._end and want not in self._used:
            addr = want
        else:
            while self._free and self._free[0] in self._used:
                heapq.heappop(self._free)
            if not self._free:
                raise PyovpnError("ifconfig pool exhausted")
            addr = heapq.heappop(self._free)
        self._used[addr] = cn
        self._sticky[cn] = addr
        self._save()
        return str(ipaddress.IPv4Address(addr)), self._v6_for(addr, self._start)

    def release(self, address: str) -> None:
        addr = int(ipaddress.IPv4Address(address))
        if self._used.pop(addr, None) is not None:
            heapq.heappush(self._free, addr)

    def _save(self) -> None:
        if not self._persist:
            return
        text = "".join(f"{cn},{ipaddress.IPv4Address(a)},\n" for cn, a in sorted(self._sticky.items()))
        with contextlib.suppress(OSError):
            Path(self._persist).write_text(text)


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


class MultiServer:
    """The P2MP server instance the daemon runs in place of a single-peer Connection."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.opts = daemon.opts
        self.loop = asyncio.get_running_loop()
        self.cfg = replace(daemon.session_cfg, mode_server=True)
        self.jar = CookieJar(os.urandom(32), hand_window=self.opts.hand_window)
        self.clients: dict[Addr, Client] = {}
        self.by_peer: dict[int, Client] = {}
        self.sock: socket.socket | None = None
        self._reading = False
        self._done: asyncio.Future[_Stop] = self.loop.create_future()
        self._cmds: asyncio.Queue[object] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Future[object]] = set()
        self._reset_budget = ResetLimiter(*CONNECT_FREQ_INITIAL)
        self._acks_owed: dict[Addr, Client] = {}  # clients with ACKs to send after this receive batch
        self._free_peer_ids: list[int] = []  # a heap of released peer ids below _next_peer_id
        self._next_peer_id = 0
        self.pool = self._make_pool()
        self.server_ip, self.netmask = self.opts.ifconfig or ("", "")
        self.server_ip6 = self.opts.ifconfig_ipv6[0].split("/")[0] if self.opts.ifconfig_ipv6 else None

    def _spawn(self, coro: object) -> None:
        # keep a reference: the event loop holds tasks only weakly
        task = asyncio.ensure_future(coro)  # type: ignore[call-overload]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ setup

    def _make_pool(self) -> AddressPool | None:
        o = self.opts
        pool = getattr(o, "ifconfig_pool", None)
        if not pool:
            return None
        first, last, mask = pool
        persist = getattr(o, "ifconfig_pool_persist", None)
        return AddressPool(
            first,
            last,
            mask or (o.ifconfig[1] if o.ifconfig else "255.255.255.0"),
            getattr(o, "ifconfig_ipv6_pool", None),
            persist[0] if persist else None,
        )

    def _fresh_wrap(self) -> Wrap:
        c = self.cfg
        if c.tls_crypt_key is not None:
            return TlsCrypt(c.tls_crypt_key, is_server=True, replay_window=c.replay_window)
        if c.tls_auth_key is not None:
            return TlsAuth(c.tls_auth_key, c.key_direction, c.auth_digest, c.replay_window)
        return NoWrap()

    async def _setup(self) -> None:
        from pyovpn.daemon import _bind_address, _listen_family, _Stop, clean_stale_link

        o = self.opts
        if o.proto != "udp":
            raise _Stop(
                "P2MP server over TCP is not implemented yet; use proto udp", restart=False, exit_code=1
            )
        af = _listen_family(o)
        address = _bind_address(o, af)
        try:
            sock = _bind_server_socket(af, address, dual_stack=af == socket.AF_INET6 and o.family != 6)
        except OSError as exc:
            raise _Stop(f"cannot bind UDP {address}: {exc.strerror}", restart=False, exit_code=1) from None
        # bursts of handshakes (and mass EXITs) overflow the default ~200 KiB receive buffer
        grow_buffers(sock, SERVER_SOCKET_BUFFER)
        sock.setblocking(False)
        self.sock = sock
        name = o.dev if o.dev not in ("tun", "") else "tun0"
        await clean_stale_link(self.d.dc, name)
        await self.d.dc.request(NewIface(name, IfaceMode.MP, o.tun_mtu))
        self.d.iface = name
        await asyncio.to_thread(self._configure_iface, name)
        v6 = o.ifconfig_ipv6
        await self.d.run_up(
            TunParams(
                dev=name,
                tun_mtu=o.tun_mtu,
                topology=o.topology,
                ifconfig=o.ifconfig,
                ifconfig_ipv6=v6[0] if v6 else None,
                ifconfig_ipv6_remote=v6[1] if v6 else None,
            ),
            "init",
        )
        log.info(
            "UDPv%s link local (bound): %s", "6" if af == socket.AF_INET6 else "4", sock.getsockname()[:2]
        )
        self.loop.add_reader(sock.fileno(), self._on_readable)
        self._reading = True

    def _configure_iface(self, name: str) -> None:
        o = self.opts
        if o.ifconfig:
            prefix = ipaddress.IPv4Network(f"0.0.0.0/{o.ifconfig[1]}").prefixlen
            tun.add_address(name, o.ifconfig[0], prefix)
        if o.ifconfig_ipv6:
            iface6 = ipaddress.IPv6Interface(o.ifconfig_ipv6[0])
            tun.add_address(name, str(iface6.ip), iface6.network.prefixlen)
        for r in o.routes:
            n = ipaddress.IPv4Network(f"{r.network}/{r.netmask}", strict=False)
            # above IROUTE_METRIC, so a connected client's iroute for the same network wins
            metric = r.metric if r.metric is not None else SERVER_ROUTE_METRIC
            tun.add_route(name, str(n.network_address), n.prefixlen, gateway=r.gateway, metric=metric)
        if getattr(o, "client_to_client", False):
            # client-to-client: the kernel forwards between clients on the tunnel device
            for path in (
                f"/proc/sys/net/ipv4/conf/{name}/forwarding",
                f"/proc/sys/net/ipv6/conf/{name}/forwarding",
            ):
                with contextlib.suppress(OSError):
                    Path(path).write_text("1\n")
        log.info("TUN/TAP device %s opened, MP mode (%s data channel)", name, self.d.dc.name)

    # ------------------------------------------------------------------ run / stop

    async def run(self) -> _Stop:
        from pyovpn.daemon import _Stop

        try:
            await self._setup()
        except _Stop as stop:
            return stop
        except PyovpnError as exc:
            return _Stop(str(exc), restart=False, exit_code=1)
        self._worker = asyncio.create_task(self._command_worker())
        log.info("Initialization Sequence Completed")
        try:
            self.d.after_init()
        except PyovpnError as exc:
            return _Stop(str(exc), restart=False, exit_code=1)
        try:
            return await self._done
        finally:
            await self._teardown()

    def stop(self, stop: _Stop) -> None:
        if not self._done.done():
            self._done.set_result(stop)

    async def _teardown(self) -> None:
        now = time.time()
        for client in list(self.clients.values()):
            client.session.close(now)
            self._send(client)
        await asyncio.sleep(0.2 if self.clients else 0)
        for client in list(self.clients.values()):
            await self._remove_client(client, "server shutdown", notify_backend=True)
        if self._worker:
            await self._cmds.put(None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._worker, 5)
        if self.sock is not None:
            if self._reading:
                self.loop.remove_reader(self.sock.fileno())
            self.sock.close()

    # ------------------------------------------------------------------ packets

    def _on_readable(self) -> None:
        assert self.sock is not None
        for _ in range(256):
            try:
                data, sa = self.sock.recvfrom(65535)
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
        try:
            if op == Opcode.CONTROL_HARD_RESET_CLIENT_V2:
                if not self._reset_budget.take(key[0], now):
                    log.debug("dropped reset from %s: connect-freq-initial budget exhausted", key)
                    return
                reply = self.jar.reply_to_reset(data, key, now, self._fresh_wrap())
                self._sendto(reply, source)
                return
            proof = self.jar.check_proof(data, key, now, self._fresh_wrap())
            self._reset_budget.refund(key[0])  # a reset that became a real client does not count
        except ProtocolError as exc:
            log.debug("dropped packet from %s: %s", key, exc)
            return
        if len(self.clients) >= getattr(self.opts, "max_clients", 1024):
            log.warning("MULTI: new client %s refused: max-clients reached", key)
            return
        session = Session.after_cookie(self.cfg, proof, rng=os.urandom, now=now)
        client = Client(key, session)
        self.clients[key] = client
        log.info("%s:%d new client session (cookie verified)", *key)
        session.receive(data, now)
        self._pump(client)

    def _sendto(self, packet: bytes, dest: Addr) -> None:
        assert self.sock is not None
        host = dest[0]
        if self.sock.family == socket.AF_INET6 and "." in host and not host.startswith("::ffff:"):
            host = "::ffff:" + host
        try:
            self.sock.sendto(packet, (host, dest[1]))
        except (BlockingIOError, OSError) as exc:
            log.debug("sendto %s: %s", dest, exc)

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
                elif isinstance(ev, (TunnelUp, NewKey, SwapKeys, DelKey)):
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

    def _auth_identity(self, client: Client, req: ClientAuthRequest) -> dict[str, str]:
        cn = req.common_name
        if getattr(self.opts, "username_as_common_name", False) and req.username:
            cn = req.username
        client.common_name, client.username = cn, req.username
        env = {
            "common_name": cn,
            "username": req.username,
            "untrusted_ip": client.addr[0],
            "untrusted_port": str(client.addr[1]),
            "script_type": "user-pass-verify",
            **{k: v for k, v in req.peer_info.items() if k.startswith(("IV_", "UV_"))},
        }
        client.env = env
        return env

    def _duplicates(self, client: Client) -> list[Client]:
        if getattr(self.opts, "duplicate_cn", False):
            return []
        cn = client.common_name
        return [
            other
            for other in self.clients.values()
            if other is not client and other.common_name == cn and other.peer_id is not None
        ]

    def _auth_needs_task(self, client: Client, req: ClientAuthRequest) -> bool:
        """Whether answering this client has to wait for something (a script, dropping a duplicate)."""
        o = self.opts
        if any(getattr(o, name, None) for name in ("auth_user_pass_verify", "tls_verify", "client_connect")):
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

    def _client_config(self, client: Client) -> list[str] | None:
        """The client's push list from the client-config-dir and the pool; None if ccd disables it."""
        ccd = self._read_ccd(client.common_name)
        if ccd is not None and getattr(ccd, "disable", False):
            client.session.reject_client(time.time(), "client disabled in client-config-dir")
            return None
        return self._push_list(client, ccd)

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

    async def _authenticate(self, client: Client, req: ClientAuthRequest) -> None:
        o = self.opts
        env = self._auth_identity(client, req)
        cn = client.common_name
        try:
            verify = getattr(o, "auth_user_pass_verify", None)
            if verify:
                ok = await self._user_pass_verify(verify, req, env)
                if not ok:
                    log.warning("%s TLS Auth Error: Auth Username/Password verification failed for peer", cn)
                    self._reject(client, "")
                    return
            for other in self._duplicates(client):
                log.info(
                    "MULTI: new connection by client '%s' will cause previous active sessions by "
                    "this client to be dropped",
                    cn,
                )
                await self._remove_client(other, "duplicate common name", notify_backend=True)
            tls_verify = getattr(o, "tls_verify", None)
            if tls_verify and await self._run_script(tls_verify, "tls-verify", client, "0", f"CN={cn}") != 0:
                self._reject(client, "tls-verify script refused the certificate")
                return
            push = self._client_config(client)
            if push is None:
                self._pump(client)
                return
        except PyovpnError as exc:
            log.warning("%s: client rejected: %s", cn, exc)
            self._reject(client, str(exc))
            return
        if self.clients.get(client.addr) is not client:
            return
        self._assign_peer_id(client)
        await self._run_script(getattr(o, "client_connect", None), "client-connect", client)
        self._accept(client, push)
        self._pump(client)

    def _reject(self, client: Client, reason: str) -> None:
        client.session.reject_client(time.time(), reason)
        self._pump(client)

    async def _user_pass_verify(
        self, verify: tuple[str, str], req: ClientAuthRequest, env: dict[str, str]
    ) -> bool:
        command, method = verify
        extra_env = dict(env)
        args = command.split()
        tmp = None
        if method == "via-file":
            fd, tmp = tempfile.mkstemp(prefix="pyovpn-auth-")
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{req.username}\n{req.password}\n")
            args.append(tmp)
        else:
            extra_env["password"] = req.password
        try:
            proc = await asyncio.create_subprocess_exec(
                *args,
                env={**os.environ, **extra_env},
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            return await asyncio.wait_for(proc.wait(), 30) == 0
        except (OSError, TimeoutError) as exc:
            log.warning("auth-user-pass-verify %s failed to run: %s", command, exc)
            return False
        finally:
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    async def _run_script(self, command: str | None, script_type: str, client: Client, *args: str) -> int:
        if not command:
            return 0
        env = dict(client.env)
        if client.vpn_ip:
            env["ifconfig_pool_remote_ip"] = client.vpn_ip
        try:
            return await run_script(
                command, script_type, args=args, env=env, script_security=self.opts.script_security
            )
        except ScriptRefused as exc:
            log.error("%s", exc)
            return 1

    def _read_ccd(self, cn: str) -> object | None:
        ccd_dir = getattr(self.opts, "client_config_dir", None)
        if not ccd_dir or not cn or "/" in cn or cn.startswith("."):
            return None
        path = Path(ccd_dir) / cn
        if not path.is_file():
            if getattr(self.opts, "ccd_exclusive", False):
                raise PyovpnError(f"no client-config-dir file for '{cn}' (ccd-exclusive)")
            return None
        from pyovpn.config import parse_ccd  # type: ignore[attr-defined]

        return parse_ccd(path.read_text(), source=str(path))

    def _push_list(self, client: Client, ccd: object | None) -> list[str]:
        o = self.opts
        push: list[str] = (
            [] if ccd is not None and getattr(ccd, "push_reset", False) else list(getattr(o, "push", ()))
        )
        for prefix in getattr(ccd, "push_remove", ()) if ccd is not None else ():
            push = [opt for opt in push if not opt.startswith(prefix)]
        fixed = getattr(ccd, "ifconfig_push", None) if ccd is not None else None
        fixed6 = getattr(ccd, "ifconfig_ipv6_push", None) if ccd is not None else None
        if self.pool is not None and (not fixed or (self.pool.has_ipv6 and not fixed6)):
            # like OpenVPN, a static IPv4 from the ccd still takes its IPv6 from the pool
            client.pool_ip, v6 = self.pool.acquire(
                client.common_name, exclusive_cn=not getattr(o, "duplicate_cn", False)
            )
            client.vpn_ip, mask, client.vpn_ip6 = client.pool_ip, self.pool.netmask, v6
        if fixed:
            client.vpn_ip, mask = fixed[0], fixed[1]
        if client.vpn_ip is None:
            raise PyovpnError("no ifconfig-pool and no ifconfig-push for this client")
        fixed6 = getattr(ccd, "ifconfig_ipv6_push", None) if ccd is not None else None
        if fixed6:
            client.vpn_ip6 = fixed6[0] if isinstance(fixed6, tuple) else fixed6
        base = []
        named = {opt.split()[0] for opt in push if opt.split()}
        if "topology" not in named:
            base.append("topology subnet")
        if self.server_ip and "route-gateway" not in named:
            base.append(f"route-gateway {self.server_ip}")
        base.append(f"ifconfig {client.vpn_ip} {mask}")
        if client.vpn_ip6 and self.server_ip6:
            base.append(f"ifconfig-ipv6 {client.vpn_ip6} {self.server_ip6}")
        if ccd is not None:
            push += list(getattr(ccd, "push", ()))
            for net, m in getattr(ccd, "iroutes", ()):
                client.iroutes.append((net, ipaddress.IPv4Network(f"0.0.0.0/{m}").prefixlen))
            for net6 in getattr(ccd, "iroutes_ipv6", ()):
                n6 = ipaddress.IPv6Network(net6, strict=False)
                client.iroutes6.append((str(n6.network_address), n6.prefixlen))
        return base + push

    # ------------------------------------------------------------------ data channel

    async def _command_worker(self) -> None:
        while True:
            item = await self._cmds.get()
            if item is None:
                return
            client, cmd = item  # type: ignore[misc]
            if self.clients.get(client.addr) is not client:
                continue
            try:
                if isinstance(cmd, TunnelUp):
                    await self._client_up(client, cmd)
                else:
                    await self.d.dc.request(cmd)
            except PyovpnError as exc:
                log.warning("%s: data channel error, dropping this client: %s", client.common_name, exc)
                await self._remove_client(client, f"data channel error: {exc}", notify_backend=True)

    async def _client_up(self, client: Client, up: TunnelUp) -> None:
        assert self.sock is not None
        vpn6 = client.vpn_ip6.split("/")[0] if client.vpn_ip6 else None
        o = self.opts
        await self.d.dc.request(
            NewPeer(
                peer_id=up.peer_id,
                socket_fd=self.sock.fileno(),
                transport=Transport.UDP,
                remote=client.addr,
                vpn_ipv4=client.vpn_ip,
                vpn_ipv6=vpn6,
                keepalive_interval=o.ping,
                keepalive_timeout=o.ping_restart,
            )
        )
        client.in_backend = True
        if self._reading:
            # the data channel reads the shared socket from now on and passes control packets up
            self.loop.remove_reader(self.sock.fileno())
            self._reading = False
        iface = self.d.iface or "tun0"
        for net, plen in client.iroutes:
            await asyncio.to_thread(tun.add_route, iface, net, plen, client.vpn_ip, IROUTE_METRIC)
        for net6, plen6 in client.iroutes6:
            await asyncio.to_thread(tun.add_route, iface, net6, plen6, vpn6, IROUTE_METRIC)
        await self._run_script(
            getattr(o, "learn_address", None),
            "learn-address",
            client,
            "add",
            client.vpn_ip or "",
            client.common_name,
        )
        log.info(
            "%s/%s:%d Data Channel: cipher '%s', peer-id %d",
            client.common_name,
            *client.addr,
            up.cipher.value,
            up.peer_id,
        )

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
        if client.in_backend and notify_backend and client.peer_id is not None:
            with contextlib.suppress(PyovpnError):
                await self.d.dc.request(DelPeer(client.peer_id))
        iface = self.d.iface or "tun0"
        for net, plen in client.iroutes:
            with contextlib.suppress(PyovpnError):
                await asyncio.to_thread(tun.del_route, iface, net, plen, client.vpn_ip, IROUTE_METRIC)
        if client.pool_ip and self.pool is not None:
            self.pool.release(client.pool_ip)
        if client.peer_id is not None:
            await self._run_script(getattr(self.opts, "client_disconnect", None), "client-disconnect", client)
            await self._run_script(
                getattr(self.opts, "learn_address", None),
                "learn-address",
                client,
                "delete",
                client.vpn_ip or "",
            )
        if (
            not any(c.in_backend for c in self.clients.values())
            and not self._reading
            and self.sock is not None
        ):
            self.loop.add_reader(self.sock.fileno(), self._on_readable)
            self._reading = True

    def on_notification(self, n: Notification) -> None:
        if isinstance(n, ControlPacket):
            if n.remote is not None:
                self._on_packet(n.packet, n.remote)
        elif isinstance(n, PeerDeleted):
            client = self.by_peer.get(n.peer_id)
            if client is None or n.reason is PeerDelReason.USERSPACE:
                return
            client.in_backend = False
            why = (
                "Inactivity timeout (--ping-restart)" if n.reason is PeerDelReason.EXPIRED else n.reason.name
            )
            self._spawn(self._remove_client(client, why, notify_backend=False))
        elif isinstance(n, PeerFloated):
            client = self.by_peer.get(n.peer_id)
            if client is not None and getattr(self.opts, "float_", False):
                self.clients.pop(client.addr, None)
                client.addr = _norm(n.remote)
                self.clients[client.addr] = client
        elif isinstance(n, KeyExhausted):
            client = self.by_peer.get(n.peer_id)
            if client is not None:
                client.session.request_renegotiation(time.time())
                self._pump(client)
