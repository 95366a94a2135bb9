"""Tests for the userspace data planes in multipoint (MP) mode: a P2MP server and its clients.

The scenarios run on both userspace planes, the offload engine (``engine``) and the in-process
backend (``inprocess``); what a test reads of a plane's inner state goes through the small
adapters below (:func:`_mp_info`). A "server" namespace runs an MP backend on one TUN and one
UDP socket shared by all UDP peers; each client namespace runs a P2P userspace backend,
joined to the server by its own veth pair. The server forwards between clients (forwarding
is enabled in the server namespace only) and routes an "iroute" to a client through an
ordinary system route via that client's VPN IP. Sites (threads inside the namespaces, each
with an asyncio loop) come from tests/nslab.py. Namespaces are always deleted, even on
failure.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pyovpn.datachannel.api import (
    Cipher,
    ControlPacket,
    DelIface,
    DelPeer,
    GetPeer,
    IfaceMode,
    KeySlot,
    NewIface,
    NewKey,
    NewPeer,
    PeerDeleted,
    PeerDelReason,
    PeerFloated,
    SendControl,
    SetPeer,
    Transport,
)
from pyovpn.datachannel.crypto import PING_MAGIC, KeyState
from pyovpn.datachannel.engine.proxy import EngineDataChannel
from pyovpn.datachannel.lane import PING_DATAGRAM_SIZE
from pyovpn.datachannel.userspace import UserspaceDataChannel
from pyovpn.edge.sockets import bind_server_socket as _bind_server_socket
from pyovpn.errors import BackendError
from pyovpn.net import tun
from pyovpn.proto.keys import split_key2
from pyovpn.proto.packets import UNDEF_PEER_ID
from tests.nslab import Lab, Site, ip, ping, require_root, tcp_listener

PORT = 1194
SERVER_VPN, SERVER_VPN6 = "10.88.0.1", "fd88::1"
IROUTE_NET, IROUTE_HOST = "10.55.0.0/24", "10.55.0.1"  # behind client B
IROUTE6_NET, IROUTE6_HOST = "fd55::/64", "fd55::1"


class Client:
    """What the test knows about one client: its namespace, addresses and keys."""

    def __init__(self, name: str, index: int, peer_id: int, cipher: Cipher) -> None:
        self.name = name
        self.veth_server = f"198.18.{index}.1"  # the server's end of this client's link
        self.veth = f"198.18.{index}.2"
        self.vpn = f"10.88.0.{index + 1}"
        self.vpn6 = f"fd88::{index + 1}"
        self.peer_id = peer_id
        self.cipher = cipher
        self.key2 = os.urandom(256)
        self.site: Site | None = None
        self.sock: socket.socket | None = None

    @property
    def s(self) -> Site:
        assert self.site is not None
        return self.site


class MpLab(Lab):
    """A server namespace and client namespaces, each client on its own veth pair."""

    def __init__(self) -> None:
        super().__init__("mp", "pm")
        self.ns_server = self.ns("s")

    def client_ns(self, name: str) -> str:
        return self.ns(name)

    def setup(self, clients: list[Client]) -> None:
        self.add_ns(self.ns_server)
        for i, c in enumerate(clients):
            ns = self.client_ns(c.name)
            self.add_ns(ns)
            self.veth(f"pm{self.tag}s{i}", self.ns_server, c.veth_server, f"pm{self.tag}c{i}", ns, c.veth)
        for key in ("net.ipv4.conf.all.forwarding", "net.ipv6.conf.all.forwarding"):
            subprocess.run(
                ["ip", "netns", "exec", self.ns_server, "sysctl", "-qw", f"{key}=1"],
                check=True,
                capture_output=True,
                timeout=20,
            )


@pytest.fixture
def mplab() -> Iterator[MpLab]:
    require_root()
    if subprocess.run(["sh", "-c", "command -v sysctl"], capture_output=True).returncode != 0:
        print("skipping: needs the sysctl command to enable forwarding in the server namespace")
        pytest.skip("needs sysctl")
    lab = MpLab()
    try:
        yield lab
    finally:
        lab.close()


# ---------------------------------------------------------------------------- helpers


def _wait(pred: Callable[[], bool], timeout: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


PLANES = ["engine", "inprocess"]


def _mp_backend(plane: str, *, recvmmsg: bool = True) -> EngineDataChannel | UserspaceDataChannel:
    if plane == "engine":
        return EngineDataChannel(workers=2, recvmmsg=recvmmsg)
    return UserspaceDataChannel()


def _mp_info(server: Site, *, resync: bool = False) -> dict[str, Any]:
    """The server plane's MP state: ``shared_sockets``, ``routes``, ``resyncs``, ``synced``, ``stats``."""
    b = server.backend
    if isinstance(b, EngineDataChannel):
        return server.run(b.mp_info(resync=resync))
    assert isinstance(b, UserspaceDataChannel)

    def inprocess() -> dict[str, Any]:
        monitor = b._iface.monitor if b._iface else None
        if resync and monitor is not None:
            monitor.resync()
        return {
            "shared_sockets": len(b._shared),
            "routes": b.mp_routes(),
            "resyncs": monitor.resyncs if monitor else 0,
            "synced": monitor.synced if monitor else False,
            "stats": b.iface_stats,
        }

    return server.call(inprocess)


def _mp_routes(server: Site) -> list[tuple[str, str | None]]:
    return [tuple(r) for r in _mp_info(server)["routes"]]  # type: ignore[misc]


def _start_server(lab: MpLab, plane: str = "inprocess", *, recvmmsg: bool = True) -> tuple[Site, str]:
    server = lab.site(lab.ns_server)
    backend = _mp_backend(plane, recvmmsg=recvmmsg)
    server.backend = backend
    backend.subscribe(server.notes.append)
    server.request(NewIface("tun", IfaceMode.MP, 1400))
    ifname = backend.ifname
    assert ifname

    def addresses() -> None:
        tun.add_address(ifname, SERVER_VPN, 24)  # topology subnet
        tun.add_address(ifname, SERVER_VPN6, 64)

    server.call(addresses)
    return server, ifname


def _start_client(lab: MpLab, c: Client, transport: Transport = Transport.UDP) -> None:
    c.site = lab.site(lab.client_ns(c.name))
    backend = UserspaceDataChannel()
    c.site.backend = backend
    backend.subscribe(c.site.notes.append)
    c.site.request(NewIface("tun", IfaceMode.P2P, 1400))
    ifname = backend.ifname
    assert ifname

    def addresses() -> None:
        tun.add_address(ifname, c.vpn, 24)
        tun.add_address(ifname, c.vpn6, 64)

    c.site.call(addresses)


def _client_peer(c: Client, *, remote: tuple[str, int] | None, transport: Transport = Transport.UDP) -> None:
    assert c.sock is not None
    c.s.request(NewPeer(c.peer_id, c.sock.fileno(), transport, remote))
    enc, dec = split_key2(c.key2, c.cipher, tls_client=True)
    c.s.request(NewKey(c.peer_id, KeySlot.PRIMARY, 0, c.cipher, enc, dec))


def _server_key(server: Site, c: Client, key_id: int = 0) -> None:
    enc, dec = split_key2(c.key2, c.cipher, tls_client=False)
    server.request(NewKey(c.peer_id, KeySlot.PRIMARY, key_id, c.cipher, enc, dec))


async def _udp_echo_once(family: int, bind: tuple[str, int], timeout: float = 10) -> tuple[bytes, Any]:
    loop = asyncio.get_running_loop()
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        s.bind(bind)
        data, addr = await asyncio.wait_for(loop.sock_recvfrom(s, 2048), timeout)
        await loop.sock_sendto(s, data[::-1], addr)
        return data, addr


async def _udp_request(family: int, dst: tuple[str, int], payload: bytes, tries: int = 10) -> bytes | None:
    loop = asyncio.get_running_loop()
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        for _ in range(tries):
            await loop.sock_sendto(s, payload, dst)
            try:
                return await asyncio.wait_for(loop.sock_recv(s, 2048), 0.5)
            except TimeoutError:
                continue
    return None


async def _send_from(src: str, dst: tuple[str, int], payload: bytes, count: int = 3) -> None:
    family = socket.AF_INET6 if ":" in src else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((src, 0))
        for _ in range(count):
            s.sendto(payload, dst)


def _server_stats(server: Site, peer_id: int) -> dict[str, int]:
    b = server.backend
    st = server.run(b.peer_stats(peer_id)) if isinstance(b, EngineDataChannel) else b.peer_stats(peer_id)
    return dict(st.extra) | {"dropped_other": st.dropped_other}


def _iface_drops(server: Site, name: str) -> int:
    extra: dict[str, int] = _mp_info(server)["stats"].extra
    return extra.get(name, 0)


# ---------------------------------------------------------------------------- UDP


def _start_all(
    mplab: MpLab, *clients: Client, plane: str = "inprocess", recvmmsg: bool = True
) -> tuple[Site, str, Any]:
    """The namespaces, the server's backend and each client's; returns the server's site, TUN, backend."""
    mplab.setup(list(clients))
    server, ifname = _start_server(mplab, plane, recvmmsg=recvmmsg)
    for c in clients:
        _start_client(mplab, c)
    return server, ifname, server.backend


def _two_clients(mplab: MpLab, plane: str, recvmmsg: bool) -> tuple[Client, Client, Site, str, Any]:
    """Clients A (AES-256-GCM) and B (ChaCha20-Poly1305) with their backends, and the server's."""
    a = Client("a", 1, 5, Cipher.AES_256_GCM)
    b = Client("b", 2, 6, Cipher.CHACHA20_POLY1305)
    return a, b, *_start_all(mplab, a, b, plane=plane, recvmmsg=recvmmsg)


@pytest.mark.netns
@pytest.mark.parametrize("plane", PLANES)
@pytest.mark.parametrize("receive", ["recvmmsg", "recvmsg"])
def test_mp_server_two_udp_clients(
    mplab: MpLab, plane: str, receive: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``receive``: how the server reads its shared socket (recvmsg: the fallback without recvmmsg)."""
    from pyovpn.datachannel.userspace import multipoint

    if receive == "recvmsg" and plane == "inprocess":
        monkeypatch.setattr(multipoint.mmsg, "available", lambda: False)
    elif receive == "recvmmsg" and not multipoint.mmsg.available():
        print("skipping: recvmmsg with the LP64 Linux layout is missing")
        pytest.skip("recvmmsg with the LP64 Linux layout is missing")
    a, b, server, ifname, _ = _two_clients(mplab, plane, receive == "recvmmsg")
    ssock = server.call(lambda: _bind_udp(("0.0.0.0", PORT)))
    dup = os.dup(ssock.fileno())  # the same socket under another descriptor is still shared
    for c in (a, b):
        c.sock = c.s.call(lambda c=c: _bind_udp((c.veth, PORT)))
    try:
        _check_mp_peer_errors(server, ssock, a)
        server.request(
            NewPeer(a.peer_id, ssock.fileno(), Transport.UDP, (a.veth, PORT), vpn_ipv4=a.vpn, vpn_ipv6=a.vpn6)
        )
        server.request(
            NewPeer(b.peer_id, dup, Transport.UDP, (b.veth, PORT), vpn_ipv4=b.vpn, vpn_ipv6=b.vpn6)
        )
        assert _mp_info(server)["shared_sockets"] == 1  # internal: one reader for both peers
        with pytest.raises(BackendError, match=r"10\.88\.0\.2 is already in use by peer 5"):
            server.request(NewPeer(9, ssock.fileno(), Transport.UDP, ("198.18.9.9", PORT), vpn_ipv4=a.vpn))
        with pytest.raises(BackendError, match="peer id 5 already exists"):
            server.request(
                NewPeer(5, ssock.fileno(), Transport.UDP, ("198.18.9.9", PORT), vpn_ipv4="10.88.0.50")
            )
        for c in (a, b):
            _server_key(server, c)
            _client_peer(c, remote=(c.veth_server, PORT))

        # server <-> each client, both directions, each with its own cipher
        for c in (a, b):
            assert c.s.run(ping(SERVER_VPN, 3)) == 3, f"client {c.name} -> server"
            assert server.run(ping(c.vpn, 3)) == 3, f"server -> client {c.name}"
        # client A -> client B through the server's forwarding
        assert a.s.run(ping(b.vpn, 3)) == 3
        info_a = server.request(GetPeer(a.peer_id))
        info_b = server.request(GetPeer(b.peer_id))
        assert info_a.vpn_rx_packets >= 9 and info_b.vpn_tx_packets >= 9 and info_a.remote == (a.veth, PORT)

        _check_iroutes(server, ifname, a, b)
        _check_control_packets(server, a, b)
        _check_float(server, a)
        _check_reverse_path(server, a, b)

        # DelPeer B: its addresses and the routes via it lead nowhere; A keeps working
        before = _iface_drops(server, "tx_dropped_no_peer")
        server.request(DelPeer(b.peer_id))
        server.wait_note(lambda n: n == PeerDeleted(b.peer_id, PeerDelReason.USERSPACE))
        assert a.s.run(ping(b.vpn, 3, timeout=0.5)) == 0
        assert a.s.run(ping(IROUTE_HOST, 2, timeout=0.5)) == 0
        assert _iface_drops(server, "tx_dropped_no_peer") - before >= 5
        assert a.s.run(ping(SERVER_VPN, 2)) == 2  # the shared socket is still read
        assert _mp_info(server)["shared_sockets"] == 1

        # B comes back under the same id and VPN IP (a fresh key on both ends)
        b.key2 = os.urandom(256)
        server.request(
            NewPeer(b.peer_id, dup, Transport.UDP, (b.veth, PORT), vpn_ipv4=b.vpn, vpn_ipv6=b.vpn6)
        )
        _server_key(server, b, key_id=1)
        enc, dec = split_key2(b.key2, b.cipher, tls_client=True)
        b.s.request(NewKey(b.peer_id, KeySlot.PRIMARY, 1, b.cipher, enc, dec))
        assert a.s.run(ping(b.vpn, 3)) == 3

        _check_keepalive_expiry_is_per_peer(server, a, b)

        # the last peer leaves: our duplicate closes, the caller's socket is whole again
        server.request(DelPeer(a.peer_id))
        server.wait_note(lambda n: n == PeerDeleted(a.peer_id, PeerDelReason.USERSPACE))
        assert _mp_info(server)["shared_sockets"] == 0
        assert ssock.getblocking() and os.get_blocking(dup)
        a.s.call(
            lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"\x38hi", (a.veth_server, PORT))
        )
        ssock.settimeout(3)
        assert ssock.recvfrom(100)[0] == b"\x38hi"  # the server edge reads it again itself

        # address removal flushes IPv4 routes without RTM_DELROUTE: the mirror must follow
        assert _mp_routes(server)
        server.call(lambda: tun.flush_addresses(ifname))
        # (IPv6 keeps a gateway route whose gateway is no longer on-link, and so do we)
        _wait(
            lambda: _mp_routes(server) == [(IROUTE6_NET, b.vpn6)],
            what="the IPv4 routes to disappear from the mirror",
        )
        server.request(DelIface(ifname))
        assert _mp_info(server)["routes"] == []  # the monitor is gone with the interface
    finally:
        ssock.close()
        os.close(dup)
        for c in (a, b):
            if c.sock is not None:
                c.sock.close()


@pytest.mark.netns
@pytest.mark.parametrize("plane", PLANES)
def test_mp_many_clients_at_once(mplab: MpLab, plane: str) -> None:
    """Commands for many clients in flight together, as a server's connect storm sends them.

    The engine runs the commands of different peers at once (its controller orders them by
    peer); each must still land whole on both workers. A client leaving and a new one taking
    its VPN address in the same breath must not collide: the removal goes first.
    """
    a, b = Client("a", 1, 5, Cipher.AES_256_GCM), Client("b", 2, 6, Cipher.CHACHA20_POLY1305)
    server, _ifname, backend = _start_all(mplab, a, b, plane=plane)
    ssock = server.call(lambda: _bind_udp(("0.0.0.0", PORT)))
    for c in (a, b):
        c.sock = c.s.call(lambda c=c: _bind_udp((c.veth, PORT)))
    others = range(100, 140)
    stand_in = 139  # holds B's VPN address until B takes it over

    def vpn_of(peer_id: int) -> str:
        return b.vpn if peer_id == stand_in else f"10.88.0.{peer_id}"

    async def connect(peer_id: int, remote: tuple[str, int], vpn: str, key2: bytes, cipher: Cipher) -> None:
        await backend.request(
            NewPeer(
                peer_id,
                ssock.fileno(),
                Transport.UDP,
                remote,
                vpn_ipv4=vpn,
                keepalive_interval=10,
                keepalive_timeout=60,
            )
        )
        enc, dec = split_key2(key2, cipher, tls_client=False)
        await backend.request(NewKey(peer_id, KeySlot.PRIMARY, 0, cipher, enc, dec))

    async def storm() -> list[Any]:
        jobs = [connect(a.peer_id, (a.veth, PORT), a.vpn, a.key2, a.cipher)]
        jobs += [
            connect(i, ("198.18.1.200", 40000 + i), vpn_of(i), os.urandom(256), Cipher.AES_128_GCM)
            for i in others
        ]
        return await asyncio.gather(*jobs, return_exceptions=True)

    async def handover() -> list[Any]:
        return await asyncio.gather(
            backend.request(DelPeer(stand_in)),
            connect(b.peer_id, (b.veth, PORT), b.vpn, b.key2, b.cipher),
            *(backend.request(GetPeer(i)) for i in others if i != stand_in),
            return_exceptions=True,
        )

    try:
        assert server.run(storm()) == [None] * (1 + len(others))
        for c in (a, b):
            _client_peer(c, remote=(c.veth_server, PORT))
        assert a.s.run(ping(SERVER_VPN, 3)) == 3
        assert a.s.run(ping(b.vpn, 1, timeout=0.5)) == 0  # the stand-in has no such client
        done = server.run(handover())
        assert done[:2] == [None, None], done[:2]
        asked = [i for i in others if i != stand_in]
        assert [info.peer_id for info in done[2:]] == asked
        server.wait_note(lambda n: n == PeerDeleted(stand_in, PeerDelReason.USERSPACE))
        for c in (a, b):
            assert c.s.run(ping(SERVER_VPN, 3)) == 3, f"client {c.name} -> server"
        assert a.s.run(ping(b.vpn, 3)) == 3  # A -> B through the server
        assert _mp_info(server)["shared_sockets"] == 1
    finally:
        ssock.close()
        for c in (a, b):
            if c.sock is not None:
                c.sock.close()


def _bind_dual_stack() -> socket.socket:
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", PORT))
    return s


def _bind_udp(addr: tuple[str, int]) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(addr)
    return s


def _check_mp_peer_errors(server: Site, ssock: socket.socket, a: Client) -> None:
    fd = ssock.fileno()
    with pytest.raises(BackendError, match="needs vpn_ipv4 or vpn_ipv6"):
        server.request(NewPeer(1, fd, Transport.UDP, (a.veth, PORT)))
    with pytest.raises(BackendError, match="not an IPv4 address"):
        server.request(NewPeer(1, fd, Transport.UDP, (a.veth, PORT), vpn_ipv4="fd88::9"))
    with pytest.raises(BackendError, match="not an IP address"):
        server.request(NewPeer(1, fd, Transport.UDP, (a.veth, PORT), vpn_ipv6="nope"))
    with pytest.raises(BackendError, match="needs a remote"):
        server.request(NewPeer(1, fd, Transport.UDP, vpn_ipv4="10.88.0.9"))
    assert _mp_info(server)["shared_sockets"] == 0  # nothing half-made stays behind


def _check_iroutes(server: Site, ifname: str, a: Client, b: Client) -> None:
    """An iroute is a system route via the client's VPN IP; the backend follows it."""
    ip("-n", b.s.netns, "addr", "add", f"{IROUTE_HOST}/32", "dev", "lo")
    ip("-n", b.s.netns, "addr", "add", f"{IROUTE6_HOST}/128", "dev", "lo", "nodad")
    a_tun = a.s.backend.ifname if a.s.backend else None
    assert a_tun
    ip("-n", a.s.netns, "route", "add", IROUTE_NET, "dev", a_tun)
    ip("-n", a.s.netns, "-6", "route", "add", IROUTE6_NET, "dev", a_tun)
    assert a.s.run(ping(IROUTE_HOST, 1, timeout=0.5)) == 0  # no route on the server yet: dropped
    ip("-n", server.netns, "route", "add", IROUTE_NET, "via", b.vpn, "dev", ifname)
    ip("-n", server.netns, "-6", "route", "add", IROUTE6_NET, "via", b.vpn6, "dev", ifname)
    _wait(
        lambda: {(IROUTE_NET, b.vpn), (IROUTE6_NET, b.vpn6)} <= set(_mp_routes(server)),
        what="the backend to see the iroutes",
    )
    assert ("10.88.0.0/24", None) in _mp_routes(server)  # the connected subnet, no gateway
    # a full dump (what a resync does) finds the same routes as the notifications did
    seen = _mp_routes(server)
    resyncs = _mp_info(server)["resyncs"]
    _mp_info(server, resync=True)  # internal: force a resync
    _wait(lambda: (info := _mp_info(server))["resyncs"] > resyncs and info["synced"], what="a resync")
    assert _mp_routes(server) == seen
    _wait(lambda: a.s.run(ping(IROUTE_HOST, 1, timeout=0.5)) == 1, what="the iroute to carry traffic")
    assert a.s.run(ping(IROUTE_HOST, 3)) == 3
    # IPv6 through the iroute: a UDP echo on B's fd55::1, asked from A
    assert b.s.loop is not None
    echo = asyncio.run_coroutine_threadsafe(_udp_echo_once(socket.AF_INET6, (IROUTE6_HOST, 7777)), b.s.loop)
    time.sleep(0.1)
    reply = a.s.run(_udp_request(socket.AF_INET6, (IROUTE6_HOST, 7777), b"hello over v6"))
    assert reply == b"hello over v6"[::-1]
    assert echo.result(10)[1][0] == a.vpn6


def _check_control_packets(server: Site, a: Client, b: Client) -> None:
    a.s.request(SendControl(a.peer_id, b"\x20from a"))
    n = server.wait_note(lambda n: isinstance(n, ControlPacket) and n.packet == b"\x20from a")
    assert n == ControlPacket(a.peer_id, b"\x20from a", (a.veth, PORT))
    # a new client without a peer: its handshake comes up with UNDEF_PEER_ID and its address
    unknown = _iface_drops(server, "rx_unknown_peer")
    port = a.s.call(lambda: _hello_from_new_client(a.veth_server))
    n = server.wait_note(lambda n: isinstance(n, ControlPacket) and n.packet == b"\x38new client")
    assert n == ControlPacket(UNDEF_PEER_ID, b"\x38new client", (a.veth, port))
    # and data from an unknown address with the undefined peer id is dropped and counted
    _wait(lambda: _iface_drops(server, "rx_unknown_peer") == unknown + 1, what="the unknown data packet")
    server.request(SendControl(b.peer_id, b"\x28to b"))
    b.s.wait_note(lambda n: isinstance(n, ControlPacket) and n.packet == b"\x28to b")


def _hello_from_new_client(server_ip: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"\x38new client", (server_ip, PORT))
        s.sendto(bytes([0x48, 0xFF, 0xFF, 0xFF]) + bytes(40), (server_ip, PORT))  # DATA_V2, UNDEF
        return int(s.getsockname()[1])


def _check_float(server: Site, a: Client) -> None:
    assert isinstance(a.s.backend, UserspaceDataChannel)
    server.notes.clear()
    forged = a.s.run(a.s.backend.debug(a.peer_id, "encrypt", payload=PING_MAGIC))  # A's live key
    other = a.s.call(lambda: _bind_udp((a.veth, PORT + 1000)))
    try:
        a.s.call(lambda: other.sendto(forged, (a.veth_server, PORT)))
        assert server.wait_note(lambda n: isinstance(n, PeerFloated)) == PeerFloated(
            a.peer_id, (a.veth, PORT + 1000)
        )
        other.sendto(b"\x20after float", (a.veth_server, PORT))
        n = server.wait_note(lambda n: isinstance(n, ControlPacket) and n.packet == b"\x20after float")
        assert n.peer_id == a.peer_id  # the address index moved with the peer
        server.request(SendControl(a.peer_id, b"\x28to the new address"))
        other.settimeout(3)
        assert other.recv(100) == b"\x28to the new address"
    finally:
        other.close()
    server.notes.clear()
    assert a.s.run(ping(SERVER_VPN, 2)) == 2  # A's real socket speaks: it floats back
    server.wait_note(lambda n: n == PeerFloated(a.peer_id, (a.veth, PORT)))


def _check_reverse_path(server: Site, a: Client, b: Client) -> None:
    """Decrypted packets whose source does not belong to the sending peer are dropped."""
    ip("-n", b.s.netns, "addr", "add", "10.66.0.1/32", "dev", "lo")
    ip("-n", a.s.netns, "addr", "add", "10.55.0.7/32", "dev", "lo")
    before_b = _server_stats(server, b.peer_id).get("rx_dropped_src", 0)
    before_a = _server_stats(server, a.peer_id).get("rx_dropped_src", 0)
    # B sends from an address the server has no route for via B
    b.s.run(_send_from("10.66.0.1", (a.vpn, 9999), b"spoof", 3))
    # A sends from inside B's iroute: the route names B, not A
    a.s.run(_send_from("10.55.0.7", (SERVER_VPN, 9999), b"spoof", 3))
    _wait(lambda: _server_stats(server, b.peer_id).get("rx_dropped_src", 0) - before_b >= 3, what="B's drops")
    _wait(lambda: _server_stats(server, a.peer_id).get("rx_dropped_src", 0) - before_a >= 3, what="A's drops")
    assert a.s.run(ping(b.vpn, 1)) == 1  # legitimate traffic still flows


def _check_keepalive_expiry_is_per_peer(server: Site, a: Client, b: Client) -> None:
    server.notes.clear()
    server.request(SetPeer(a.peer_id, keepalive_interval=1, keepalive_timeout=3))
    server.request(SetPeer(b.peer_id, keepalive_interval=1, keepalive_timeout=3))
    a.s.request(SetPeer(a.peer_id, keepalive_interval=1, keepalive_timeout=3))  # A pings; B stays silent
    n = server.wait_note(lambda n: isinstance(n, PeerDeleted) and n.peer_id == b.peer_id, timeout=10)
    assert n == PeerDeleted(b.peer_id, PeerDelReason.EXPIRED)
    time.sleep(1.5)
    assert not any(isinstance(n, PeerDeleted) and n.peer_id == a.peer_id for n in server.notes)
    assert _server_stats(server, a.peer_id).get("keepalive_rx", 0) >= 2
    assert b.s.backend is not None
    assert isinstance(b.s.backend, UserspaceDataChannel)
    assert b.s.backend.peer_stats(b.peer_id).extra.get("keepalive_rx", 0) >= 1  # the server pinged B
    assert a.s.run(ping(SERVER_VPN, 2)) == 2
    assert a.s.run(ping(b.vpn, 1, timeout=0.5)) == 0


# ---------------------------------------------------------------------------- TCP


@pytest.mark.netns
def test_mp_keepalive_lane(mplab: MpLab) -> None:
    """A server socket bound as the server edge binds it gets the keepalive lane: every ping (of
    either AEAD) takes it and nothing else does, expiry still works, and a replayed ping that
    waited there is counted as late, not as a replay."""
    a, b, server, _ifname, sbackend = _two_clients(mplab, "inprocess", True)
    ssock = server.call(lambda: _bind_server_socket(socket.AF_INET, ("0.0.0.0", PORT), dual_stack=False))
    for c in (a, b):
        c.sock = c.s.call(lambda c=c: _bind_udp((c.veth, PORT)))

    def counters() -> tuple[int, dict[int, int], dict[int, int], dict[int, int]]:
        def snap() -> tuple[int, dict[int, int], dict[int, int], dict[int, int]]:
            stats = {
                c.peer_id: sbackend.peer_stats(c.peer_id) for c in (a, b) if c.peer_id in sbackend._peers
            }
            return (
                sbackend.iface_stats.extra.get("keepalive_lane_rx", 0),
                {p: st.extra.get("keepalive_rx", 0) for p, st in stats.items()},
                {p: st.extra.get("keepalive_late", 0) for p, st in stats.items()},
                {p: st.dropped_replay for p, st in stats.items()},
            )

        return server.call(snap)

    try:
        for c in (a, b):
            server.request(
                NewPeer(
                    c.peer_id, ssock.fileno(), Transport.UDP, (c.veth, PORT), vpn_ipv4=c.vpn, vpn_ipv6=c.vpn6
                )
            )
            _server_key(server, c)
            _client_peer(c, remote=(c.veth_server, PORT))
        (shared,) = sbackend._shared.values()
        assert shared.lane is not None
        for c in (a, b):
            server.request(SetPeer(c.peer_id, keepalive_interval=1, keepalive_timeout=3))
            c.s.request(SetPeer(c.peer_id, keepalive_interval=1, keepalive_timeout=3))
        time.sleep(4.5)  # longer than the timeout: only pings that took the lane kept them alive
        assert not [n for n in server.notes if isinstance(n, PeerDeleted)]
        # the last ping sent may still wait on the lane (drained at most _LANE_MAX_DELAY late)
        _wait(lambda: all(n >= 3 for n in counters()[1].values()), timeout=3, what="three pings per peer")
        assert not [n for n in server.notes if isinstance(n, PeerDeleted)]
        lane, pings, late, _ = counters()
        assert lane == sum(pings.values()) and sum(late.values()) == 0  # all pings, and only pings

        # user data never waits on the lane
        assert a.s.run(ping(b.vpn, 5)) == 5
        assert b.s.run(ping(SERVER_VPN, 3)) == 3
        lane2, pings2, _, _ = counters()
        assert lane2 - lane == sum(pings2.values()) - sum(pings.values())

        # B falls silent: it expires, A does not (its pings keep coming through the lane)
        b.s.request(SetPeer(b.peer_id, keepalive_interval=0, keepalive_timeout=0))
        _check_keepalive_expiry_is_per_peer(server, a, b)

        # a ping replayed onto the lane: the copy is late, not a replay error (A's own pings stop,
        # as the window will refuse them after the forged id)
        a.s.request(SetPeer(a.peer_id, keepalive_interval=0, keepalive_timeout=0))
        server.request(SetPeer(a.peer_id, keepalive_interval=10, keepalive_timeout=60))
        time.sleep(0.5)
        enc, dec = split_key2(a.key2, a.cipher, tls_client=True)
        forged = KeyState.from_directions(0, a.cipher, enc, dec)
        forged._tx_pid = 1 << 20  # ahead of the real client (whose later packets the window then refuses)
        pkt = forged.encrypt(PING_MAGIC, a.peer_id)
        assert len(pkt) == PING_DATAGRAM_SIZE
        assert isinstance(a.s.backend, UserspaceDataChannel)
        a_backend = a.s.backend

        def a_sent() -> int:  # what A's own plane sent: its pings are off, but its TUN may still
            return a.s.call(lambda: a_backend.peer_stats(a.peer_id).link_tx_packets)  # send IPv6 RS/MLD

        _, pings, late, replay = counters()
        sent = a_sent()
        assert a.sock is not None
        a.s.call(lambda: [a.sock.sendto(pkt, (a.veth_server, PORT)) for _ in range(2)] and None)
        _wait(lambda: counters()[2][a.peer_id] == late[a.peer_id] + 1, what="the late copy")
        assert counters()[1][a.peer_id] > pings[a.peer_id]
        # the only replays are A's own packets sent after the forged id, never the late copy
        _wait(
            lambda: counters()[3][a.peer_id] - replay[a.peer_id] == a_sent() - sent,
            timeout=2,
            what="replays = A's own later packets",
        )

        # the last peer leaves: the lane closes, the server socket gets pings again
        server.request(DelPeer(a.peer_id))
        assert sbackend._shared == {} and shared.lane is None
        a.s.call(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(pkt, (a.veth_server, PORT)))
        ssock.settimeout(3)
        assert ssock.recvfrom(100)[0] == pkt
    finally:
        ssock.close()
        for c in (a, b):
            if c.sock is not None:
                c.sock.close()


@pytest.mark.netns
@pytest.mark.parametrize("plane", PLANES)
def test_mp_server_tcp_and_udp_clients(mplab: MpLab, plane: str) -> None:
    """A TCP client has its own socket; it talks to the server and, through it, to a UDP client."""
    c = Client("c", 1, 11, Cipher.AES_128_GCM)
    d = Client("d", 2, 12, Cipher.AES_256_GCM)
    server, _ifname, _ = _start_all(mplab, c, d, plane=plane)

    listener = tcp_listener(server, (c.veth_server, PORT))
    ssock = server.call(_bind_dual_stack)  # as the server edge: IPv4 clients appear v4-mapped
    c.sock = c.s.call(lambda: socket.create_connection((c.veth_server, PORT), timeout=5))
    conn, _ = listener.accept()
    d.sock = d.s.call(lambda: _bind_udp((d.veth, PORT)))
    try:
        with pytest.raises(BackendError, match="TCP peer must not have a remote"):
            server.request(NewPeer(c.peer_id, conn.fileno(), Transport.TCP, (c.veth, 1), vpn_ipv4=c.vpn))
        server.request(NewPeer(c.peer_id, conn.fileno(), Transport.TCP, vpn_ipv4=c.vpn))
        with pytest.raises(BackendError, match="already carries peer 11"):
            server.request(NewPeer(99, conn.fileno(), Transport.TCP, vpn_ipv4="10.88.0.99"))
        server.request(NewPeer(d.peer_id, ssock.fileno(), Transport.UDP, (d.veth, PORT), vpn_ipv4=d.vpn))
        _server_key(server, c)
        _server_key(server, d)
        _client_peer(c, remote=None, transport=Transport.TCP)
        _client_peer(d, remote=(d.veth_server, PORT))

        assert c.s.run(ping(SERVER_VPN, 3)) == 3
        assert server.run(ping(c.vpn, 3)) == 3
        assert c.s.run(ping(d.vpn, 3)) == 3  # TCP client -> UDP client through the server
        assert d.s.run(ping(c.vpn, 3)) == 3
        c.s.request(SendControl(c.peer_id, b"\x20tcp control"))
        n = server.wait_note(lambda n: isinstance(n, ControlPacket) and n.packet == b"\x20tcp control")
        assert n == ControlPacket(c.peer_id, b"\x20tcp control", None)
        d.s.request(SendControl(d.peer_id, b"\x20udp control"))
        n = server.wait_note(lambda n: isinstance(n, ControlPacket) and n.packet == b"\x20udp control")
        assert n == ControlPacket(d.peer_id, b"\x20udp control", (d.veth, PORT))  # found by address
        assert server.request(GetPeer(d.peer_id)).remote == (d.veth, PORT)

        # the TCP client hangs up: only it goes
        c.s.request(DelPeer(c.peer_id))
        c.sock.close()
        c.sock = None
        server.wait_note(lambda n: n == PeerDeleted(c.peer_id, PeerDelReason.TRANSPORT_DISCONNECT))
        assert server.run(ping(d.vpn, 2)) == 2
        assert server.run(ping(c.vpn, 1, timeout=0.5)) == 0
    finally:
        for s in (listener, ssock, conn):
            s.close()
        for cl in (c, d):
            if cl.sock is not None:
                cl.sock.close()
