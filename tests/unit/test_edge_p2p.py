"""The P2P edge without root: a tls-server and a tls-client Daemon in one event loop over loopback.

Both run on :mod:`tests.unit.edgefakes` (a recording data channel that relays control packets
on the handed-over socket, and an in-memory host network), so what the edge does to the host
and to the backend is asserted command by command: connect, restart after a keepalive expiry,
SIGUSR1, key exhaustion, and exit with SIGTERM telling the peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import replace

import pytest

from pyovpn import daemon as daemon_module
from pyovpn.config import parse_config_text
from pyovpn.datachannel import api
from pyovpn.errors import BackendError
from pyovpn.tools.pki import Pki, make_pki
from tests.unit.edgefakes import RecordingDataChannel, RecordingNetwork, RunningDaemon, free_port, wait_until

INIT = "Initialization Sequence Completed"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(autouse=True)
def quick_restarts(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # a restart waits RESTART_DELAY first; the tests wait for the reconnect, not for the clock
    monkeypatch.setattr(daemon_module, "RESTART_DELAY", 0.05)
    caplog.set_level(logging.INFO)


def p2p_configs(pki: Pki, port: int, proto: str = "udp") -> tuple[str, str]:
    crypto = ["data-ciphers AES-256-GCM", "verb 4", "tls-timeout 1"]
    server = [
        "tls-server",
        "dev tun",
        f"proto {'udp' if proto == 'udp' else 'tcp-server'}",
        "local 127.0.0.1",
        f"lport {port}",
        "ifconfig 10.77.0.1 10.77.0.2",
        "ifconfig-ipv6 fd00:77::1/64 fd00:77::2",
        "route 10.55.0.0 255.255.255.0",
        f"ca {pki.ca_crt}",
        f"cert {pki.server_crt}",
        f"key {pki.server_key}",
        "dh none",
        "remote-cert-tls client",
        *crypto,
    ]
    client = [
        "tls-client",
        "dev tun",
        f"proto {'udp' if proto == 'udp' else 'tcp-client'}",
        f"remote 127.0.0.1 {port}",
        "nobind",
        "ifconfig 10.77.0.2 10.77.0.1",
        "ifconfig-ipv6 fd00:77::2/64 fd00:77::1",
        f"ca {pki.ca_crt}",
        f"cert {pki.client_crt}",
        f"key {pki.client_key}",
        "remote-cert-tls server",
        *crypto,
    ]
    return "\n".join(server) + "\n", "\n".join(client) + "\n"


Body = Callable[[RunningDaemon, RunningDaemon], Awaitable[None]]


def run_pair(pki: Pki, body: Body, proto: str = "udp", *, new_peer_delay: float = 0.0) -> None:
    """Start server and client, wait until both tunnels are up, run ``body``, stop what still runs."""
    kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
    server_text, client_text = p2p_configs(pki, free_port(kind), proto)

    async def main() -> None:
        server = RunningDaemon(
            parse_config_text(server_text, source="server.conf"), new_peer_delay=new_peer_delay
        )
        # a client that starts first loses its first reset and waits tls-timeout to resend it
        await wait_until(lambda: port_bound(server, kind), 5, "the server listens")
        client = RunningDaemon(
            parse_config_text(client_text, source="client.conf"), new_peer_delay=new_peer_delay
        )
        try:
            await wait_until(lambda: server.up() and client.up(), 15, "both tunnels up")
            await body(server, client)
        finally:
            for d in (client, server):
                if not d.task.done():
                    d.daemon.signal("SIGTERM")
            await asyncio.wait({client.task, server.task}, timeout=10)

    asyncio.run(main())


def port_bound(server: RunningDaemon, kind: int) -> bool:
    """Whether the server holds its port (a bind without SO_REUSEADDR then fails)."""
    if server.task.done():
        server.task.result()
    with socket.socket(socket.AF_INET, kind) as probe:
        try:
            probe.bind(("127.0.0.1", server.daemon.opts.local_port))
        except OSError:
            return True
    return False


def primary_keys(d: RunningDaemon) -> list[api.NewKey]:
    return [k for k in d.dc.of(api.NewKey) if k.slot is api.KeySlot.PRIMARY]


def assert_keys_pair(server: RunningDaemon, client: RunningDaemon) -> None:
    """The latest primary keys of the two sides are each other's mirror image."""
    s, c = primary_keys(server)[-1], primary_keys(client)[-1]
    assert (s.key_id, s.cipher) == (c.key_id, c.cipher)
    assert c.encrypt == s.decrypt
    assert c.decrypt == s.encrypt
    assert c.encrypt != c.decrypt


def test_udp_connect(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    async def body(server: RunningDaemon, client: RunningDaemon) -> None:
        await wait_until(lambda: caplog.text.count(INIT) >= 2, 5, "two init lines")
        for d in (server, client):
            assert [c.name for c in d.dc.of(api.NewIface)] == ["tun0"]
            (peer,) = d.dc.of(api.NewPeer)
            assert peer.transport is api.Transport.UDP
            assert peer.vpn_ipv4 is None and peer.vpn_ipv6 is None  # P2P: no VPN IPs in NewPeer
            assert d.dc.iface is not None and d.dc.iface.name == "tun0"
            assert list(d.dc.peers) == [peer.peer_id]  # the fake holds the handed-over socket
        # each side hands over the socket that talks to the other: the remotes are each other
        (speer,) = server.dc.of(api.NewPeer)
        (cpeer,) = client.dc.of(api.NewPeer)
        assert speer.remote is not None and speer.remote[0] == "127.0.0.1"
        assert cpeer.remote == ("127.0.0.1", server.daemon.opts.lport)
        assert_keys_pair(server, client)
        # net30 addresses with the peer, the IPv6 address, and the configured route
        assert server.net.has_address("tun0", "10.77.0.1", 32)
        assert [a.peer for a in server.net.addresses if a.address == "10.77.0.1"] == ["10.77.0.2"]
        assert server.net.has_address("tun0", "fd00:77::1", 64)
        assert client.net.has_address("tun0", "10.77.0.2", 32)
        assert client.net.has_address("tun0", "fd00:77::2", 64)
        assert server.net.routes_to("10.55.0.0", 24)
        assert not client.net.routes_to("10.55.0.0", 24)

    run_pair(pki, body)


def test_control_packet_before_the_new_peer_reply_is_not_lost(pki: Pki) -> None:
    """The peer's ACK of our last handshake packet may reach us before NewPeer's reply.

    The engine delivers control packets on a path of their own, so the client's ACK of the
    server's last handshake message could arrive while the server still awaited NewPeer; the
    edge dropped it (unknown peer id) and retransmitted after tls-timeout, and a transfer
    started in that window ran slower (stock client <- pyovpn server, bench/throughput.py).
    """

    def settled(d: RunningDaemon) -> bool:
        conn = d.daemon.current
        session = getattr(conn, "session", None)
        return session is not None and session.primary is not None and session.primary.sender.idle

    async def body(server: RunningDaemon, client: RunningDaemon) -> None:
        # every handshake packet acknowledged well before tls-timeout (1 s) would resend it
        await wait_until(lambda: settled(server) and settled(client), 0.6, "all handshake packets acked")
        sent = [c.packet for c in server.dc.of(api.SendControl)] + [
            c.packet for c in client.dc.of(api.SendControl)
        ]
        assert len(sent) == len(set(sent)), "a control packet was sent twice"

    run_pair(pki, body, new_peer_delay=0.3)


def test_restarted_client_is_answered_at_once(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    """A client that crashed and came back from a new port is answered without the restart delay.

    The server's session sees the new hard reset (PeerRestarted); the next connection starts
    from that packet at once instead of sleeping RESTART_DELAY and then waiting for the
    client's retransmission (about 7 s against OpenVPN's 0.7 s before).
    """
    _, client_text = p2p_configs(pki, 0)

    async def body(server: RunningDaemon, client: RunningDaemon) -> None:
        client.task.cancel()  # a crash: no exit notification reaches the server
        with contextlib.suppress(asyncio.CancelledError):
            await client.task
        port = server.daemon.opts.local_port
        again = RunningDaemon(
            parse_config_text(client_text.replace(" 0\n", f" {port}\n", 1), source="c.conf")
        )
        try:
            await wait_until(lambda: server.up(2) and again.up(), 15, "the restarted client is up")
        finally:
            again.daemon.signal("SIGTERM")
            await asyncio.wait({again.task}, timeout=10)
        assert "peer restarted (new hard reset); restarting" in caplog.text
        assert "peer restarted (new hard reset); restarting in" not in caplog.text
        assert len(server.dc.of(api.NewPeer)) == 2

    run_pair(pki, body)


def test_tcp_connect_and_exit(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    async def body(server: RunningDaemon, client: RunningDaemon) -> None:
        for d in (server, client):
            (peer,) = d.dc.of(api.NewPeer)
            assert peer.transport is api.Transport.TCP and peer.remote is None
        assert_keys_pair(server, client)
        assert await server.stop() == 0
        # the peer is gone either way: DelPeer, or the backend saw the stream close first
        assert not server.dc.peers and server.dc.of(api.DelIface)
        # the client got EXIT over the stream (or its end): it restarts instead of exiting
        await wait_until(lambda: "restarting in" in caplog.text, 10, "the client restarts")
        assert not client.task.done()
        assert await client.stop() == 0
        assert not client.dc.peers and client.dc.of(api.DelIface)

    run_pair(pki, body, proto="tcp")


def test_sigterm_while_waiting_for_a_tcp_peer(pki: Pki) -> None:
    server_text, _ = p2p_configs(pki, free_port(socket.SOCK_STREAM), "tcp")

    async def main() -> None:
        server = RunningDaemon(parse_config_text(server_text))
        try:
            await wait_until(lambda: port_bound(server, socket.SOCK_STREAM), 5, "the server listens")
            assert await server.stop(timeout=2) == 0
        finally:
            server.task.cancel()

    asyncio.run(main())


def test_restart_after_keepalive_expiry(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    async def body(server: RunningDaemon, client: RunningDaemon) -> None:
        first = client.dc.of(api.NewPeer)[0]
        addresses = list(client.net.addresses)
        client.dc.expire(first.peer_id)
        await wait_until(lambda: client.up(2) and server.up(2), 15, "both sides reconnected")
        assert "Inactivity timeout (--ping-restart), restarting" in caplog.text
        assert len(client.dc.of(api.NewPeer)) == 2 and len(server.dc.of(api.NewPeer)) == 2
        # the same interface carries the new session: no second NewIface, no DelIface, no
        # address added again (persist-tun semantics for an unchanged configuration)
        for d in (client, server):
            assert len(d.dc.of(api.NewIface)) == 1 and not d.dc.of(api.DelIface)
        assert client.net.addresses == addresses
        assert not client.task.done() and not server.task.done()
        assert_keys_pair(server, client)
        assert primary_keys(client)[-1].encrypt != primary_keys(client)[0].encrypt

    run_pair(pki, body)


def test_sigusr1_restarts(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    async def body(server: RunningDaemon, client: RunningDaemon) -> None:
        client.daemon.signal("SIGUSR1")
        await wait_until(lambda: client.up(2) and server.up(2), 15, "reconnect after SIGUSR1")
        assert "SIGUSR1[soft,restart] received, process restarting" in caplog.text
        assert len(client.dc.of(api.NewIface)) == 1 and not client.dc.of(api.DelIface)
        assert not client.task.done()
        assert_keys_pair(server, client)

    run_pair(pki, body)


def test_key_exhaustion_renegotiates(pki: Pki) -> None:
    async def body(server: RunningDaemon, client: RunningDaemon) -> None:
        first = primary_keys(client)[0]
        client.dc.exhaust(first.peer_id)

        def renewed() -> bool:
            return all(any(k.key_id != first.key_id for k in d.dc.of(api.NewKey)) for d in (server, client))

        await wait_until(renewed, 10, "a new key on both sides")
        # the new key is the same on both sides, in whichever slot it is now
        s_new = next(k for k in server.dc.of(api.NewKey) if k.key_id != first.key_id)
        c_new = next(k for k in client.dc.of(api.NewKey) if k.key_id != first.key_id)
        assert c_new.encrypt == s_new.decrypt and c_new.decrypt == s_new.encrypt
        assert len(client.dc.of(api.NewPeer)) == 1  # a renegotiation, not a reconnect

    run_pair(pki, body)


def test_sigterm_tells_the_peer_and_cleans_up(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    async def body(server: RunningDaemon, client: RunningDaemon) -> None:
        mark = len(client.dc.commands)
        assert await client.stop() == 0
        after = client.dc.commands[mark:]
        kinds = [type(c) for c in after]
        # EXIT leaves through the data channel (it owns the socket), then the peer and the
        # interface go, in that order
        assert api.SendControl in kinds and api.DelPeer in kinds and api.DelIface in kinds
        assert kinds.index(api.SendControl) < kinds.index(api.DelPeer) < kinds.index(api.DelIface)
        assert "SIGTERM[hard,] received, process exiting" in caplog.text
        assert client.dc.closed
        # the server got the EXIT: it ends that session at once (no ping-restart wait) and restarts
        await wait_until(lambda: server.dc.of(api.DelPeer), 10, "the server drops its peer")
        assert "peer sent exit notification; restarting in" in caplog.text
        assert not server.task.done()
        assert await server.stop() == 0
        assert server.dc.of(api.DelIface) and not server.dc.peers

    run_pair(pki, body)


def test_recording_fakes_refuse_what_the_host_refuses() -> None:
    """The fakes are only worth their assertions if they say no where a real backend or host does."""

    async def main() -> None:
        dc = RecordingDataChannel()
        net = RecordingNetwork(dc)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            peer = api.NewPeer(5, sock.fileno(), api.Transport.UDP, ("127.0.0.1", 9))
            with pytest.raises(BackendError, match="no interface"):
                await dc.request(peer)
            with pytest.raises(BackendError, match="no interface named 'tun0'"):
                net.add_address("tun0", "10.0.0.1", 24)
            await dc.request(api.NewIface(net.free_tun_name()))
            assert net.free_tun_name() == "tun1"
            with pytest.raises(BackendError, match="VPN IPs are not allowed in P2P mode"):
                await dc.request(
                    api.NewPeer(5, sock.fileno(), api.Transport.UDP, ("127.0.0.1", 9), vpn_ipv4="10.0.0.2")
                )
            with pytest.raises(BackendError, match="a UDP peer needs a remote"):
                await dc.request(replace(peer, remote=None))
            await dc.request(peer)
            key = api.KeyDirection(bytes(32), bytes(8))
            with pytest.raises(BackendError, match="bad encrypt key length 16"):
                await dc.request(
                    api.NewKey(
                        5,
                        api.KeySlot.PRIMARY,
                        0,
                        api.Cipher.AES_256_GCM,
                        api.KeyDirection(bytes(16), bytes(8)),
                        key,
                    )
                )
            await dc.request(api.NewKey(5, api.KeySlot.PRIMARY, 3, api.Cipher.AES_256_GCM, key, key))
            assert await dc.request(api.GetKey(5, api.KeySlot.PRIMARY)) == api.KeyInfo(
                5, api.KeySlot.PRIMARY, 3, api.Cipher.AES_256_GCM
            )
            await dc.request(api.SwapKeys(5))
            with pytest.raises(BackendError, match="no key in the primary slot"):
                await dc.request(api.GetKey(5, api.KeySlot.PRIMARY))
            info = await dc.request(api.GetPeer(5))
            assert isinstance(info, api.PeerInfo) and info.remote == ("127.0.0.1", 9)
            net.add_route("tun0", "10.9.0.0", 16, "10.0.0.2", 100)
            with pytest.raises(BackendError, match="already exists"):
                net.add_route("tun0", "10.9.0.0", 16, "10.0.0.3", 100)
            net.del_route("tun0", "10.9.0.0", 16, "10.0.0.2", 100)
            net.del_route("tun0", "10.9.0.0", 16, "10.0.0.2", 100)  # already gone: not an error
            net.add_route("tun0", "10.9.0.0", 16, "10.0.0.3", 100)
            await dc.request(api.DelPeer(5))
            # notifications arrive from the loop, never from inside request()
            assert api.PeerDeleted(5, api.PeerDelReason.USERSPACE) not in dc.notified
            with pytest.raises(BackendError, match="unknown peer id 5"):
                await dc.request(api.SendControl(5, b"x"))
            await wait_until(
                lambda: api.PeerDeleted(5, api.PeerDelReason.USERSPACE) in dc.notified, 1, "notified"
            )
            assert sock.fileno() >= 0  # the caller's descriptor is still the caller's

    asyncio.run(main())
