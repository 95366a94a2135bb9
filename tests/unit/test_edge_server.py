"""The P2MP server edge without root: a server Daemon on the fakes, clients as sans-I/O Sessions.

The server runs on :mod:`tests.unit.edgefakes` (recording data channel, in-memory host
network) and listens on loopback; each client is a pull-mode :class:`Session` on its own UDP
socket, pumped by :class:`PullClient`. Covered: the address pool running out and being
reused, auth-user-pass-verify accepting, refusing and deferring (a slow script must not hold
up other clients), client-config-dir (fixed address, disable, push-reset, iroutes as host
routes that go when the client goes), and the stateless cookie handshake's per-source budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from pyovpn.config import parse_config_text
from pyovpn.daemon import session_config
from pyovpn.datachannel import api
from pyovpn.proto.packets import Opcode
from pyovpn.proto.session import Session, SessionClosed, SessionConfig, TunnelUp
from pyovpn.server.multi import MultiServer
from pyovpn.server.ratelimit import CONNECT_FREQ_INITIAL
from pyovpn.tools.pki import Pki, issue_client, make_pki
from tests.unit.edgefakes import RunningDaemon, free_port, wait_until

Addr = tuple[str, int]
IROUTE_METRIC = 100  # what OpenVPN DCO installs iroutes with


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    for cn in ("alice", "bob", "carol", "dave"):
        issue_client(pki, cn)
    return pki


@pytest.fixture(autouse=True)
def info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


# ---------------------------------------------------------------------------- clients


class PullClient:
    """One pull client: a Session on a UDP socket connected to the server, driven by the loop."""

    def __init__(self, cfg: SessionConfig, server: Addr) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.connect(server)
        self.sock.setblocking(False)
        self.addr: Addr = self.sock.getsockname()
        self.up: asyncio.Future[TunnelUp] = self.loop.create_future()
        self.closed: asyncio.Future[str] = self.loop.create_future()
        self.keys: list[api.NewKey] = []
        self.session = Session(cfg, rng=os.urandom, now=time.time())
        self._timer: asyncio.TimerHandle | None = None
        self.loop.add_reader(self.sock.fileno(), self._on_readable)
        self.session.handle_timer(time.time())  # the hard reset
        self._pump()

    def is_up(self) -> bool:
        return self.up.done()

    def close(self) -> None:
        """Leave as a real client does: EXIT (cc-exit), then the socket goes."""
        if not self.session.closed:
            self.session.close(time.time())
            self._send()
        self.stop()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()

    def _on_readable(self) -> None:
        while True:
            try:
                data = self.sock.recv(65535)
            except (BlockingIOError, ConnectionRefusedError):
                break
            if data and data[0] >> 3 not in (Opcode.DATA_V1, Opcode.DATA_V2):
                self.session.receive(data, time.time())
        self._pump()

    def _send(self) -> None:
        for pkt in self.session.packets_to_send():
            try:
                self.sock.send(pkt)
            except OSError:
                pass  # lost; the reliability layer retransmits

    def _pump(self) -> None:
        self._send()
        for ev in self.session.events():
            if isinstance(ev, TunnelUp) and not self.up.done():
                self.up.set_result(ev)
            elif isinstance(ev, api.NewKey):
                self.keys.append(ev)
            elif isinstance(ev, SessionClosed) and not self.closed.done():
                self.closed.set_result(ev.reason)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.session.next_timer()
        if deadline is not None and not self.session.closed:
            self._timer = self.loop.call_later(max(0.0, deadline - time.time()) + 0.001, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.session.handle_timer(time.time())
        self._pump()


# ---------------------------------------------------------------------------- the server


def server_text(pki: Pki, port: int, *extra: str) -> str:
    lines = [
        "dev tun",
        "proto udp",
        "local 127.0.0.1",
        f"lport {port}",
        "topology subnet",
        f"ca {pki.ca_crt}",
        f"cert {pki.server_crt}",
        f"key {pki.server_key}",
        "dh none",
        "remote-cert-tls client",
        "keepalive 10 60",
        "data-ciphers AES-256-GCM",
        "tls-timeout 1",
        "verb 4",
        *extra,
    ]
    return "\n".join(lines) + "\n"


def client_cfg(pki: Pki, port: int, cn: str = "client", user: str | None = None) -> SessionConfig:
    cert, key = (
        (pki.client_crt, pki.client_key) if cn == "client" else (pki.dir / f"{cn}.crt", pki.dir / f"{cn}.key")
    )
    text = "\n".join(
        [
            "client",
            "dev tun",
            "proto udp",
            f"remote 127.0.0.1 {port}",
            "nobind",
            f"ca {pki.ca_crt}",
            f"cert {cert}",
            f"key {key}",
            "remote-cert-tls server",
            "tls-timeout 1",
        ]
    )
    cfg = session_config(parse_config_text(text + "\n", source=f"{cn}.conf"))
    if user is not None:
        name, _, password = user.partition(":")
        cfg = replace(cfg, username=name, password=password)
    return cfg


Body = Callable[[RunningDaemon, int], Awaitable[None]]


def serve(text_for_port: Callable[[int], str], body: Body) -> None:
    """Run a server Daemon on the fakes, wait until it listens, run ``body``, stop it (exit code 0)."""
    port = free_port()

    async def main() -> None:
        server = RunningDaemon(parse_config_text(text_for_port(port), source="server.conf"))
        try:
            await wait_until(lambda: server.task.done() or server.dc.iface is not None, 5, "server up")
            if server.task.done():
                server.task.result()
            await body(server, port)
        finally:
            rc = await server.stop()
        assert rc == 0
        assert not server.dc.peers  # every client's peer was deleted at shutdown

    asyncio.run(main())


async def connect(server: RunningDaemon, cfg: SessionConfig, port: int) -> PullClient:
    """A new client, once it is up and the server has installed its key (or once it was refused)."""
    client = PullClient(cfg, ("127.0.0.1", port))
    await wait_until(lambda: client.up.done() or client.closed.done(), 15, "client settles")
    if client.up.done():
        await wait_until(lambda: installed(server, client), 5, "the server installs the client's key")
    return client


def installed(server: RunningDaemon, client: PullClient) -> bool:
    """Whether the server's data channel has this client's peer and its primary key."""
    peers = [p for p in server.dc.of(api.NewPeer) if p.remote == client.addr]
    return bool(peers) and server.dc.key(peers[-1].peer_id) is not None


def peer_of(server: RunningDaemon, client: PullClient) -> api.NewPeer:
    """The server's NewPeer for this client (its remote is the client's address)."""
    (peer,) = [p for p in server.dc.of(api.NewPeer) if p.remote == client.addr]
    return peer


def refused(server: RunningDaemon, client: PullClient) -> bool:
    reason = client.closed.result() if client.closed.done() else ""
    return (
        "AUTH_FAILED" in reason
        and not client.up.done()
        and not any(p.remote == client.addr for p in server.dc.of(api.NewPeer))
    )


# ---------------------------------------------------------------------------- pool


def test_pool_exhaustion_and_reuse(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    def text(port: int) -> str:
        return server_text(
            pki,
            port,
            "server 10.8.0.0 255.255.255.0 nopool",
            "ifconfig-pool 10.8.0.2 10.8.0.3",
            "duplicate-cn",
        )

    async def body(server: RunningDaemon, port: int) -> None:
        cfg = client_cfg(pki, port)
        first, second = await connect(server, cfg, port), await connect(server, cfg, port)
        assert first.is_up() and second.is_up()
        assert {peer_of(server, c).vpn_ipv4 for c in (first, second)} == {"10.8.0.2", "10.8.0.3"}
        third = await connect(server, cfg, port)
        assert refused(server, third)
        assert "ifconfig pool exhausted" in caplog.text
        # the first client leaves; its address and its peer id go to the next one
        gone = peer_of(server, first)
        first.close()
        await wait_until(
            lambda: api.DelPeer(gone.peer_id) in server.dc.commands, 10, "the server drops client 1"
        )
        fourth = await connect(server, cfg, port)
        assert fourth.is_up()
        again = peer_of(server, fourth)
        assert again.vpn_ipv4 == gone.vpn_ipv4
        assert again.peer_id == gone.peer_id
        pushed = fourth.up.result().pushed
        assert pushed is not None and pushed.ifconfig == (gone.vpn_ipv4, "255.255.255.0")
        for c in (second, third, fourth):
            c.stop()

    serve(text, body)


def test_key_exhaustion_and_expiry_per_client(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    """Notifications reach the client they name: a renegotiation for one, removal for another."""

    def text(port: int) -> str:
        return server_text(pki, port, "server 10.8.0.0 255.255.255.0", "duplicate-cn")

    async def body(server: RunningDaemon, port: int) -> None:
        cfg = client_cfg(pki, port)
        one, two = await connect(server, cfg, port), await connect(server, cfg, port)
        p1, p2 = peer_of(server, one), peer_of(server, two)
        first = server.dc.key(p1.peer_id)
        assert first is not None and [(k.encrypt, k.decrypt) for k in one.keys] == [
            (first.decrypt, first.encrypt)
        ]
        server.dc.exhaust(p1.peer_id)
        await wait_until(lambda: len(one.keys) == 2, 10, "client 1 renegotiated")
        new = one.keys[1]
        assert new.key_id != first.key_id
        (mine,) = [k for k in server.dc.of(api.NewKey) if k.peer_id == p1.peer_id and k.key_id == new.key_id]
        assert (mine.encrypt, mine.decrypt) == (new.decrypt, new.encrypt)
        assert len(two.keys) == 1  # the other client was left alone
        server.dc.expire(p2.peer_id)
        await wait_until(lambda: "Inactivity timeout" in caplog.text, 5, "client 2 removed")
        assert api.DelPeer(p2.peer_id) not in server.dc.commands  # the backend had deleted it already
        # its address is free again: the next client gets it
        three = await connect(server, cfg, port)
        assert peer_of(server, three).vpn_ipv4 == p2.vpn_ipv4
        assert peer_of(server, three).peer_id == p2.peer_id
        for c in (one, two, three):
            c.stop()

    serve(text, body)


def test_sigterm_tells_every_client(pki: Pki) -> None:
    def text(port: int) -> str:
        return server_text(pki, port, "server 10.8.0.0 255.255.255.0", "duplicate-cn")

    async def body(server: RunningDaemon, port: int) -> None:
        cfg = client_cfg(pki, port)
        clients = [await connect(server, cfg, port), await connect(server, cfg, port)]
        peers = [peer_of(server, c) for c in clients]
        assert server.net.has_address("tun0", "10.8.0.1", 24)
        assert await server.stop() == 0
        for c in clients:
            await wait_until(c.closed.done, 5, "the client hears EXIT")
            assert "exit notification" in c.closed.result()
        kinds = [type(c).__name__ for c in server.dc.commands]
        assert kinds[-1] == "DelIface"
        assert all(api.DelPeer(p.peer_id) in server.dc.commands for p in peers)
        for c in clients:
            c.stop()

    serve(text, body)


# ---------------------------------------------------------------------------- auth


def script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


VERIFY = {
    "via-env": '[ "$username" = alice ] && [ "$password" = secret ]\n',
    "via-file": '{ read -r u; read -r p; } < "$1"\n[ "$u" = alice ] && [ "$p" = secret ]\n',
}


@pytest.mark.parametrize("method", ["via-env", "via-file"])
def test_auth_user_pass_verify_accepts_and_denies(
    pki: Pki, tmp_path: Path, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    verify = script(tmp_path, "verify.sh", VERIFY[method])

    def text(port: int) -> str:
        return server_text(
            pki,
            port,
            "server 10.8.0.0 255.255.255.0",
            # OpenVPN puts the password in a script's environment only at script-security 3
            f"script-security {3 if method == 'via-env' else 2}",
            f"auth-user-pass-verify {verify} {method}",
            "duplicate-cn",
        )

    async def body(server: RunningDaemon, port: int) -> None:
        good = await connect(server, client_cfg(pki, port, user="alice:secret"), port)
        assert good.is_up()
        assert peer_of(server, good).vpn_ipv4 == "10.8.0.2"
        bad = await connect(server, client_cfg(pki, port, user="alice:wrong"), port)
        assert refused(server, bad)
        assert "Auth Username/Password verification failed" in caplog.text
        good.stop()
        bad.stop()

    serve(text, body)


def test_auth_deferred_does_not_block_other_clients(pki: Pki, tmp_path: Path) -> None:
    started, release = tmp_path / "started", tmp_path / "release"
    verify = script(
        tmp_path,
        "verify.sh",
        f'read -r u < "$1"\nif [ "$u" = slow ]; then\n  touch {started}\n'
        f"  while [ ! -e {release} ]; do sleep 0.02; done\nfi\nexit 0\n",
    )

    def text(port: int) -> str:
        return server_text(
            pki,
            port,
            "server 10.8.0.0 255.255.255.0",
            "script-security 2",
            f"auth-user-pass-verify {verify} via-file",
            "duplicate-cn",
        )

    async def body(server: RunningDaemon, port: int) -> None:
        slow = PullClient(client_cfg(pki, port, user="slow:x"), ("127.0.0.1", port))
        await wait_until(started.exists, 10, "the slow script to start")
        fast = await connect(server, client_cfg(pki, port, user="fast:x"), port)
        # served while the slow client's script still runs
        assert fast.is_up() and not slow.up.done() and not slow.closed.done()
        assert [p.remote for p in server.dc.of(api.NewPeer)] == [fast.addr]
        release.touch()
        await wait_until(lambda: slow.is_up() and installed(server, slow), 10, "the slow client answered")
        assert peer_of(server, slow).vpn_ipv4 != peer_of(server, fast).vpn_ipv4
        fast.stop()
        slow.stop()

    serve(text, body)


# ---------------------------------------------------------------------------- client-config-dir


def ccd_server(pki: Pki, ccd: Path, files: dict[str, str]) -> Callable[[int], str]:
    ccd.mkdir()
    for cn, content in files.items():
        (ccd / cn).write_text(content)

    def text(port: int) -> str:
        return server_text(
            pki,
            port,
            "server 10.8.0.0 255.255.255.0",
            "server-ipv6 fd00:88::/64",
            f"client-config-dir {ccd}",
            'push "route 10.99.0.0 255.255.0.0"',
            "route 192.168.77.0 255.255.255.0",
        )

    return text


def test_ccd_fixed_address_disable_and_push_reset(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = {
        "alice": "ifconfig-push 10.8.0.50 255.255.255.0\n",
        "bob": "disable\n",
        "carol": 'push-reset\npush "route 10.98.0.0 255.255.0.0"\n',
    }

    async def body(server: RunningDaemon, port: int) -> None:
        alice = await connect(server, client_cfg(pki, port, "alice"), port)
        assert alice.is_up()
        assert peer_of(server, alice).vpn_ipv4 == "10.8.0.50"
        pushed = alice.up.result().pushed
        assert pushed is not None and pushed.ifconfig == ("10.8.0.50", "255.255.255.0")
        assert [r[:2] for r in pushed.routes] == [("10.99.0.0", "255.255.0.0")]

        bob = await connect(server, client_cfg(pki, port, "bob"), port)
        assert refused(server, bob)
        assert "client disabled in client-config-dir" in caplog.text

        carol = await connect(server, client_cfg(pki, port, "carol"), port)
        assert carol.is_up()
        pushed = carol.up.result().pushed
        # push-reset dropped the server's push list; the ccd's own push and the address remain
        assert pushed is not None and [r[:2] for r in pushed.routes] == [("10.98.0.0", "255.255.0.0")]
        assert pushed.ifconfig is not None and pushed.ifconfig[0] == peer_of(server, carol).vpn_ipv4
        for c in (alice, bob, carol):
            c.stop()

    serve(ccd_server(pki, tmp_path / "ccd", files), body)


def test_ccd_iroutes_follow_the_client(pki: Pki, tmp_path: Path) -> None:
    files = {"dave": "iroute 192.168.77.0 255.255.255.0\niroute-ipv6 fd00:99::/64\n"}

    async def connect_and_leave(server: RunningDaemon, port: int, attempt: int) -> None:
        dave = await connect(server, client_cfg(pki, port, "dave"), port)
        assert dave.is_up(), f"attempt {attempt}: {dave.closed.result() if dave.closed.done() else ''}"
        peer = peer_of(server, dave)
        assert peer.vpn_ipv4 is not None and peer.vpn_ipv6 is not None
        iroutes = {
            ("tun0", "192.168.77.0", 24, peer.vpn_ipv4, IROUTE_METRIC),
            ("tun0", "fd00:99::", 64, peer.vpn_ipv6, IROUTE_METRIC),
        }
        await wait_until(lambda: iroutes <= server.net.routes, 5, "both iroutes installed")
        dave.close()
        await wait_until(lambda: api.DelPeer(peer.peer_id) in server.dc.commands, 10, "dave leaves")
        await wait_until(lambda: not iroutes & server.net.routes, 5, "both iroutes removed")
        server.dc.commands.clear()

    async def body(server: RunningDaemon, port: int) -> None:
        # the server's own `route` (metric 200) stays underneath the iroutes all along
        own = ("tun0", "192.168.77.0", 24, None, 200)
        assert own in server.net.routes
        for attempt in range(2):  # a reconnect must find no leftover route (EEXIST)
            await connect_and_leave(server, port, attempt)
            assert own in server.net.routes

    serve(ccd_server(pki, tmp_path / "ccd", files), body)


def test_ccd_iroute_removed_when_keepalive_expires(pki: Pki, tmp_path: Path) -> None:
    files = {"dave": "iroute 192.168.77.0 255.255.255.0\n"}

    async def body(server: RunningDaemon, port: int) -> None:
        dave = await connect(server, client_cfg(pki, port, "dave"), port)
        peer = peer_of(server, dave)
        route = ("tun0", "192.168.77.0", 24, peer.vpn_ipv4, IROUTE_METRIC)
        await wait_until(lambda: route in server.net.routes, 5, "iroute installed")
        server.dc.expire(peer.peer_id)
        await wait_until(lambda: route not in server.net.routes, 5, "iroute removed after expiry")
        assert api.DelPeer(peer.peer_id) not in server.dc.commands  # the backend already deleted it
        dave.stop()

    serve(ccd_server(pki, tmp_path / "ccd", files), body)


# ---------------------------------------------------------------------------- cookie budget


def hard_reset(pki: Pki, port: int) -> bytes:
    session = Session(client_cfg(pki, port), rng=os.urandom, now=time.time())
    session.handle_timer(time.time())
    (pkt,) = session.packets_to_send()
    assert pkt[0] >> 3 == Opcode.CONTROL_HARD_RESET_CLIENT_V2
    return bytes(pkt)


def drain(sock: socket.socket) -> list[bytes]:
    """Every datagram queued on a non-blocking socket."""
    out: list[bytes] = []
    with contextlib.suppress(BlockingIOError):
        while True:
            out.append(sock.recv(65535))
    return out


def test_cookie_budget_per_source(pki: Pki) -> None:
    budget, period = CONNECT_FREQ_INITIAL
    chunk = 20

    async def body(server: RunningDaemon, port: int) -> None:
        reset = hard_reset(pki, port)
        socks = []
        for ip in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((ip, 0))
            s.connect(("127.0.0.1", port))
            s.setblocking(False)
            socks.append(s)
        flood, other, forger = socks
        replies: list[bytes] = []

        async def probe() -> None:
            # the server reads its socket in order: once `other` is answered, everything sent
            # before has been handled and its reply, if any, is queued on our sockets
            other.send(reset)
            answer: list[bytes] = []

            def answered() -> bool:
                answer.extend(drain(other))
                return bool(answer)

            await wait_until(answered, 5, "the second source answered")
            assert [a[0] >> 3 for a in answer] == [Opcode.CONTROL_HARD_RESET_SERVER_V2]
            replies.extend(drain(flood))

        try:
            t0 = time.monotonic()
            sent = 0
            while sent < budget + 2 * chunk:
                for _ in range(chunk):
                    flood.send(reset)
                sent += chunk
                await probe()
            elapsed = time.monotonic() - t0
            # a packet that claims to answer a cookie this source never got
            forger.send(bytes([Opcode.CONTROL_V1 << 3]) + os.urandom(40))
            await probe()
            refill = math.ceil(elapsed * budget / period) + 1
            assert budget <= len(replies) <= budget + refill < sent, (len(replies), sent)
            assert all(r[0] >> 3 == Opcode.CONTROL_HARD_RESET_SERVER_V2 for r in replies)
            assert drain(forger) == []
            # stateless until a client proves its address: no client, no peer, nothing on the host
            multi = server.daemon.current
            assert isinstance(multi, MultiServer) and not multi.clients
            assert not server.dc.of(api.NewPeer)
        finally:
            for s in socks:
                s.close()

    serve(lambda port: server_text(pki, port, "server 10.8.0.0 255.255.255.0"), body)


# ---------------------------------------------------------------------------- metrics and events


def test_prometheus_metrics_and_event_stream(pki: Pki, tmp_path: Path) -> None:
    """`pyovpn-metrics` serves per-client metrics at scrape time; `pyovpn-events` logs connect/disconnect."""
    pytest.importorskip("prometheus_client", reason="prometheus-client is installed by scripts/setup.sh")
    import urllib.request

    mport = free_port(socket.SOCK_STREAM)
    events = tmp_path / "events.jsonl"

    def text(port: int) -> str:
        return server_text(
            pki,
            port,
            "server 10.91.0.0 255.255.255.0",
            f"pyovpn-metrics 127.0.0.1:{mport}",
            f"pyovpn-events {events}",
        )

    async def body(server: RunningDaemon, port: int) -> None:
        client = await connect(server, client_cfg(pki, port), port)
        assert client.up.done()

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as r:
                return str(r.read().decode())

        page = await asyncio.to_thread(scrape)
        assert "pyovpn_peers 1.0" in page
        assert 'pyovpn_info{backend="recording",interface="tun0",role="server"} 1.0' in page
        (line,) = [x for x in page.splitlines() if x.startswith("pyovpn_peer_connected_since_seconds{")]
        assert 'common_name="client"' in line and f'real_address="127.0.0.1:{client.addr[1]}"' in line
        assert 'cipher="AES-256-GCM"' in line and float(line.rsplit(" ", 1)[1]) > 1e9
        assert "pyovpn_auth_failures_total 0.0" in page
        client.close()

    serve(text, body)
    records = [json.loads(x) for x in events.read_text().splitlines()]
    assert [r["event"] for r in records][:1] == ["connect"]
    assert records[0]["common_name"] == "client" and records[0]["client_id"] == 0
    assert records[-1]["event"] == "disconnect"  # the server's shutdown dropped the client
    assert stat.S_IMODE(events.stat().st_mode) == 0o600


# ---------------------------------------------------------------------------- status


def test_status_keeps_no_state_for_clients_that_left(pki: Pki) -> None:
    """The status writer remembers each client's traffic counters (for "Last Ref"), by peer id.
    A client that left must leave that table: peer ids are reused, and the next client with
    the id must not inherit the old one's counters."""

    def text(port: int) -> str:
        return server_text(pki, port, "server 10.8.0.0 255.255.255.0", "duplicate-cn")

    async def body(server: RunningDaemon, port: int) -> None:
        cfg = client_cfg(pki, port)
        first, second = await connect(server, cfg, port), await connect(server, cfg, port)
        ids = [peer_of(server, c).peer_id for c in (first, second)]
        status = await server.daemon.status_text(version=2)
        rows = [line.split(",") for line in status.splitlines() if line.startswith("CLIENT_LIST,")]
        assert sorted(int(r[11]) for r in rows) == sorted(ids)  # the peer id column
        assert set(server.daemon._refs) == set(ids)
        first.close()
        await wait_until(lambda: api.DelPeer(ids[0]) in server.dc.commands, 10, "the first client leaves")
        await wait_until(lambda: len(server.daemon.current.clients) == 1, 10, "the server forgets it")  # type: ignore[union-attr]
        await server.daemon.status_text()
        assert set(server.daemon._refs) == {ids[1]}
        second.close()

    serve(text, body)
