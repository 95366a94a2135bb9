"""Tests for the userspace data channel: two backends in two private network namespaces.

Each side is a thread that has ``setns()``-ed into its own namespace (namespaces are per
thread on Linux, and threads it starts inherit it) and runs its own asyncio loop; the
test drives both from the main thread, which never leaves the host namespace. The
namespaces are joined by a veth pair and carry the tunnel as UDP or TCP; all traffic
goes to addresses inside them. Namespaces are always deleted, even on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import secrets
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from pyovpn.datachannel.api import (
    Cipher,
    ControlPacket,
    DelIface,
    DelKey,
    DelPeer,
    GetKey,
    GetPeer,
    IfaceMode,
    KeyDirection,
    KeyExhausted,
    KeySlot,
    NewIface,
    NewKey,
    NewPeer,
    Notification,
    PeerDeleted,
    PeerDelReason,
    PeerFloated,
    SendControl,
    SetPeer,
    SwapKeys,
    Transport,
)
from pyovpn.datachannel.crypto import MAX_PACKET_ID, PING_MAGIC, split_key2
from pyovpn.datachannel.userspace import UserspaceDataChannel
from pyovpn.errors import BackendError
from pyovpn.net import tun

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
SO_RCVBUFFORCE = 33  # not exported by the socket module
_libc = ctypes.CDLL(None, use_errno=True)

VETH_A, VETH_B = "198.18.0.1", "198.18.0.2"  # benchmarking range, only inside our namespaces
TUN_A, TUN_B = "10.99.0.1", "10.99.0.2"
TUN6_A, TUN6_B = "fd99::1", "fd99::2"
PORT = 1194
CIPHER = Cipher.AES_256_GCM


def _require_root() -> None:
    if os.geteuid() != 0:
        print("skipping: the userspace backend tests need root (TUN devices, network namespaces)")
        pytest.skip("needs root for TUN devices and network namespaces")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("/dev/net/tun missing (modprobe tun)")
    if shutil.which("ip") is None:
        pytest.skip("needs the iproute2 'ip' command")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


class Site:
    """One side of the tunnel: a thread inside a namespace running an asyncio loop."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.loop: asyncio.AbstractEventLoop | None = None
        self.backend: UserspaceDataChannel | None = None
        self.notes: list[Notification] = []
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"site-{netns}", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("site thread did not start")
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        try:
            fd = os.open(f"/var/run/netns/{self.netns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns failed")
            finally:
                os.close(fd)
            self.loop = asyncio.new_event_loop()
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T], timeout: float = 30) -> T:
        async def wrapper() -> T:
            return fn()

        return self.run(wrapper(), timeout)

    def request(self, cmd: Any) -> Any:
        assert self.backend is not None
        return self.run(self.backend.request(cmd))

    def wait_note(self, pred: Callable[[Notification], bool], timeout: float = 10) -> Notification:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for n in list(self.notes):
                if pred(n):
                    return n
            time.sleep(0.02)
        raise AssertionError(f"{self.netns}: no matching notification in {timeout}s; got {self.notes}")

    def stop(self) -> None:
        if self.loop is None or self.loop.is_closed():
            return
        if self.backend is not None:
            with contextlib.suppress(Exception):
                self.run(self.backend.close(), timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class Lab:
    """Two namespaces joined by a veth pair; sites are created on demand."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.ns_a = f"pyovpn-t-{self.tag}-a"
        self.ns_b = f"pyovpn-t-{self.tag}-b"
        self.namespaces: list[str] = []  # exactly those created, for cleanup
        self.sites: list[Site] = []

    def setup(self) -> None:
        tag = self.tag
        for ns in (self.ns_a, self.ns_b):
            _ip("netns", "add", ns)
            self.namespaces.append(ns)
        veth_a, veth_b = f"pv{tag}a", f"pv{tag}b"
        _ip(
            "link",
            "add",
            veth_a,
            "netns",
            self.ns_a,
            "type",
            "veth",
            "peer",
            "name",
            veth_b,
            "netns",
            self.ns_b,
        )
        for ns, dev, addr in ((self.ns_a, veth_a, VETH_A), (self.ns_b, veth_b, VETH_B)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def site(self, ns: str) -> Site:
        s = Site(ns)
        self.sites.append(s)
        return s

    def close(self) -> None:
        for s in self.sites:
            with contextlib.suppress(Exception):
                s.stop()
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


@pytest.fixture
def lab() -> Iterator[Lab]:
    _require_root()
    lab = Lab()
    try:
        lab.setup()
        yield lab
    finally:
        lab.close()


# ---------------------------------------------------------------------------- helpers run in a site


def _icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


async def ping(dst: str, count: int = 3, timeout: float = 2.0) -> int:
    """ICMP echo over a raw socket (no ping binary needed); returns the number of replies."""
    loop = asyncio.get_running_loop()
    ident = secrets.randbelow(0xFFFF)
    replies = 0
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        sock.setblocking(False)
        for seq in range(count):
            body = struct.pack("!HH", ident, seq) + os.urandom(48)
            pkt = struct.pack("!BBH", 8, 0, _icmp_checksum(b"\x08\0\0\0" + body)) + body
            await loop.sock_sendto(sock, pkt, (dst, 0))
            deadline = loop.time() + timeout
            while (left := deadline - loop.time()) > 0:
                try:
                    data = await asyncio.wait_for(loop.sock_recv(sock, 4096), left)
                except TimeoutError:
                    break
                ihl = (data[0] & 0x0F) * 4
                if data[ihl] == 0 and struct.unpack_from("!HH", data, ihl + 4) == (ident, seq):
                    replies += 1
                    break
    return replies


def _udp_socket(bind: tuple[str, int], family: int = socket.AF_INET) -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind(bind)
    return s


def _keys(key2: bytes, *, client: bool) -> tuple[Any, Any]:
    return split_key2(key2, CIPHER, tls_client=client)


def _start_side(site: Site, tun_addr: str, tun_peer: str, tun6: str) -> None:
    site.backend = UserspaceDataChannel()
    site.backend.subscribe(site.notes.append)
    site.request(NewIface("tun", IfaceMode.P2P, 1400))
    ifname = site.backend.ifname
    assert ifname and ifname.startswith("tun")

    def addresses() -> None:
        # called with the site's loop running: exercises tun.py's worker-thread path
        tun.add_address(ifname, tun_addr, 32, peer=tun_peer)
        tun.add_address(ifname, tun6, 64)

    site.call(addresses)


def _install_key(site: Site, peer_id: int, slot: KeySlot, key_id: int, key2: bytes, *, client: bool) -> None:
    enc, dec = _keys(key2, client=client)
    site.request(NewKey(peer_id, slot, key_id, CIPHER, enc, dec))


# ---------------------------------------------------------------------------- tests without root


def test_commands_fail_cleanly_without_interface() -> None:
    async def body() -> None:
        b = UserspaceDataChannel()
        with pytest.raises(BackendError, match="GetPeer: unknown peer id 3"):
            await b.request(GetPeer(3))
        with pytest.raises(BackendError, match="NewPeer: no interface"):
            await b.request(NewPeer(1, 0, Transport.UDP, ("192.0.2.1", 1194)))
        with pytest.raises(BackendError, match="NewIface: MTU 10 out of range"):
            await b.request(NewIface("tun", IfaceMode.MP, 10))
        with pytest.raises(BackendError, match="DelIface: no interface"):
            await b.request(DelIface("tun9"))
        with pytest.raises(BackendError, match="SwapKeys: unknown peer"):
            await b.request(SwapKeys(1))
        await b.close()
        with pytest.raises(BackendError, match="closed"):
            await b.request(GetPeer(1))

    asyncio.run(body())


def test_tun_helpers_validate_input() -> None:
    with pytest.raises(BackendError, match="too long"):
        tun.open_tun("a-very-long-interface-name")
    with pytest.raises(BackendError, match="not an IP address"):
        tun.add_address("lo", "not-an-ip", 24)
    with pytest.raises(BackendError, match="families differ"):
        tun.add_route("lo", "10.0.0.0", 8, gateway="fd00::1")
    with pytest.raises(BackendError, match="MTU"):
        tun.configure_link("lo", 10)


# ---------------------------------------------------------------------------- UDP


@pytest.mark.netns
def test_udp_tunnel_ping_rekey_float_keepalive(lab: Lab) -> None:
    a = lab.site(lab.ns_a)
    b = lab.site(lab.ns_b)
    _start_side(a, TUN_A, TUN_B, TUN6_A)
    _start_side(b, TUN_B, TUN_A, TUN6_B)
    sock_a = a.call(lambda: _udp_socket((VETH_A, PORT)))
    sock_b = b.call(lambda: _udp_socket((VETH_B, PORT)))
    try:
        # asymmetric peer ids: A sends 9 and expects 7, B the reverse
        a.request(NewPeer(7, sock_a.fileno(), Transport.UDP, (VETH_B, PORT), tx_peer_id=9))
        b.request(NewPeer(9, sock_b.fileno(), Transport.UDP, (VETH_A, PORT), tx_peer_id=7))
        key0 = os.urandom(256)
        _install_key(a, 7, KeySlot.PRIMARY, 0, key0, client=True)
        _install_key(b, 9, KeySlot.PRIMARY, 0, key0, client=False)

        assert a.run(ping(TUN_B, 3)) == 3
        info_a = a.request(GetPeer(7))
        info_b = b.request(GetPeer(9))
        assert info_a.vpn_tx_packets >= 3 and info_a.vpn_rx_packets >= 3
        assert info_b.vpn_rx_packets >= 3 and info_b.link_rx_packets >= 3
        assert info_a.remote == (VETH_B, PORT)
        assert a.request(GetKey(7, KeySlot.PRIMARY)).key_id == 0

        _check_bulk_and_batching(a, b)
        _check_gso_fallback(lab, a, b)
        _check_ipv6_inside(a, b)
        _check_command_errors(a)

        # control packets pass through untouched, in both directions
        a.request(SendControl(7, b"\x20" + b"hello control"))
        n = b.wait_note(lambda n: isinstance(n, ControlPacket))
        assert n == ControlPacket(9, b"\x20hello control", (VETH_A, PORT))
        b.request(SendControl(9, b"\x28ack"))
        a.wait_note(lambda n: isinstance(n, ControlPacket) and n.packet == b"\x28ack")

        _check_rekey_during_traffic(a, b, a_peer=7, b_peer=9)
        _check_float(a, b)
        _check_keepalive_and_expiry(a, b)
        _check_key_exhaustion_and_del_iface(a)
    finally:
        sock_a.close()
        sock_b.close()


def _check_bulk_and_batching(a: Site, b: Site) -> None:
    """Bursts from a socket in A: the TUN reader drains them in batches (UDP GSO on send)."""
    rx = b.call(lambda: _udp_socket((TUN_B, 5000)))
    rx.setblocking(False)
    rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)  # the sink must not be the bottleneck
    before_a = a.request(GetPeer(7))
    before_b = b.request(GetPeer(9))
    tx = a.call(lambda: _udp_socket((TUN_A, 0)))
    sent = 0
    try:

        def burst() -> None:
            nonlocal sent
            for _ in range(40):  # the loop is busy here, so the TUN queue fills
                tx.sendto(os.urandom(1000), (TUN_B, 5000))
                sent += 1

        for _ in range(5):
            a.call(burst)
            time.sleep(0.05)
        time.sleep(0.3)

        def drain() -> int:
            got = 0
            with contextlib.suppress(BlockingIOError):
                while True:
                    rx.recv(2048)
                    got += 1
            return got

        got = b.call(drain)
    finally:
        rx.close()
        tx.close()
    sa = a.backend.peer_stats(7)  # type: ignore[union-attr]
    sb = b.backend.peer_stats(9)  # type: ignore[union-attr]
    tunneled = sa.vpn_tx_packets - before_a.vpn_tx_packets
    delivered = sb.vpn_rx_packets - before_b.vpn_rx_packets
    print(f"bulk: sent {sent} tunneled {tunneled} delivered {delivered} received {got}")
    print(f"bulk: A {sa}\nbulk: B {sb}")
    assert tunneled == delivered == sent
    assert got >= sent * 0.95
    assert sb.dropped_auth == 0 and sb.dropped_replay == 0
    assert sa.extra.get("gso_sends", 0) > 0, "the TUN reader should batch equal-size packets into GSO sends"


def _check_gso_fallback(lab: Lab, a: Site, b: Site) -> None:
    """Segments too big for the outer MTU make GSO fail: those go one by one (fragmented)."""
    veth_a = f"pv{lab.tag}a"
    _ip("-n", lab.ns_a, "link", "set", veth_a, "mtu", "1280")
    rx = b.call(lambda: _udp_socket((TUN_B, 5002)))
    rx.setblocking(False)
    rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
    tx = a.call(lambda: _udp_socket((TUN_A, 0)))
    try:

        def burst(size: int) -> None:
            for _ in range(20):
                tx.sendto(os.urandom(size), (TUN_B, 5002))

        a.call(lambda: burst(1300))  # 1300 + 28 + 24 + 28 > 1280 outer bytes
        time.sleep(0.3)
        a.call(lambda: burst(500))
        time.sleep(0.3)

        def drain() -> list[int]:
            sizes = []
            with contextlib.suppress(BlockingIOError):
                while True:
                    sizes.append(len(rx.recv(2048)))
            return sizes

        sizes = b.call(drain)
    finally:
        rx.close()
        tx.close()
        _ip("-n", lab.ns_a, "link", "set", veth_a, "mtu", "1500")
    extra = a.backend.peer_stats(7).extra  # type: ignore[union-attr]
    print(f"gso fallback: received {len(sizes)}; A extra {extra}")
    assert sizes.count(1300) == 20 and sizes.count(500) == 20
    assert extra.get("gso_fallbacks", 0) >= 1
    assert extra["gso_sends"] > 5, "small segments must still go out with GSO after the fallback"


def _check_ipv6_inside(a: Site, b: Site) -> None:
    rx = b.call(lambda: _udp_socket((TUN6_B, 5001), socket.AF_INET6))
    tx = a.call(lambda: _udp_socket((TUN6_A, 0), socket.AF_INET6))
    try:
        rx.settimeout(3)
        a.call(lambda: tx.sendto(b"over ipv6", (TUN6_B, 5001)))
        assert rx.recvfrom(100)[0] == b"over ipv6"
    finally:
        rx.close()
        tx.close()


def _check_command_errors(a: Site) -> None:
    enc, dec = _keys(os.urandom(256), client=True)
    short = KeyDirection(enc.cipher_key[:16], enc.nonce_tail)
    with pytest.raises(BackendError, match="NewKey: bad encrypt key length 16"):
        a.request(NewKey(7, KeySlot.SECONDARY, 1, CIPHER, short, dec))
    with pytest.raises(BackendError, match="nonce tail must be 8 bytes"):
        a.request(NewKey(7, KeySlot.SECONDARY, 1, CIPHER, enc, KeyDirection(dec.cipher_key, b"\0" * 4)))
    with pytest.raises(BackendError, match="key id 8"):
        a.request(NewKey(7, KeySlot.SECONDARY, 8, CIPHER, enc, dec))
    with pytest.raises(BackendError, match="NewKey: unknown peer id 1234"):
        a.request(NewKey(1234, KeySlot.SECONDARY, 1, CIPHER, enc, dec))
    with pytest.raises(BackendError, match=r"GetKey: .* no key in the secondary slot"):
        a.request(GetKey(7, KeySlot.SECONDARY))
    with pytest.raises(BackendError, match="together"):
        a.request(SetPeer(7, keepalive_interval=5))
    with pytest.raises(BackendError, match="NewIface: this backend already drives"):
        a.request(NewIface("tun"))
    a.request(DelKey(7, KeySlot.SECONDARY))  # empty slot: fine, as in the kernel


def _check_rekey_during_traffic(a: Site, b: Site, *, a_peer: int, b_peer: int) -> None:
    key1 = os.urandom(256)
    _install_key(a, a_peer, KeySlot.SECONDARY, 1, key1, client=True)
    _install_key(b, b_peer, KeySlot.SECONDARY, 1, key1, client=False)

    async def steady_pings() -> int:
        ok = 0
        for _ in range(10):
            ok += await ping(TUN_B, 1)
            await asyncio.sleep(0.05)
        return ok

    assert a.loop is not None
    traffic = asyncio.run_coroutine_threadsafe(steady_pings(), a.loop)
    time.sleep(0.15)
    a.request(SwapKeys(a_peer))  # A now sends with key 1; B finds it by key id in its secondary slot
    time.sleep(0.15)
    b.request(SwapKeys(b_peer))
    assert traffic.result(30) == 10, "no ping may be lost across the key swap"
    for site, pid in ((a, a_peer), (b, b_peer)):
        assert site.request(GetKey(pid, KeySlot.PRIMARY)).key_id == 1
        assert site.request(GetKey(pid, KeySlot.SECONDARY)).key_id == 0
        site.request(DelKey(pid, KeySlot.SECONDARY))
    assert a.run(ping(TUN_B, 3)) == 3


def _check_float(a: Site, b: Site) -> None:
    """An authenticated packet from a new address moves B's remote there (and back)."""
    assert a.backend is not None
    other = a.call(lambda: _udp_socket((VETH_A, PORT + 1000)))
    try:
        # A's own live key, so B's replay window sees one consistent packet-id sequence
        ks = a.backend._peers[7].keys[0]  # internal: no public way to forge a packet
        assert ks is not None
        a.call(lambda: other.sendto(ks.encrypt(PING_MAGIC, 9), (VETH_B, PORT)))  # A's tx peer id
        moved = b.wait_note(lambda n: isinstance(n, PeerFloated))
        assert moved == PeerFloated(9, (VETH_A, PORT + 1000))
        assert b.request(GetPeer(9)).remote == (VETH_A, PORT + 1000)
        b.request(SendControl(9, b"\x20to the new address"))
        other.settimeout(3)
        assert other.recv(100) == b"\x20to the new address"
    finally:
        other.close()
    b.notes.clear()
    # A's real socket speaks again: B floats back before its kernel even answers the echo
    assert a.run(ping(TUN_B, 2)) == 2
    b.wait_note(lambda n: n == PeerFloated(9, (VETH_A, PORT)))


def _check_keepalive_and_expiry(a: Site, b: Site) -> None:
    a.request(SetPeer(7, keepalive_interval=1, keepalive_timeout=3))
    b.request(SetPeer(9, keepalive_interval=1, keepalive_timeout=3))
    assert a.request(GetPeer(7)).keepalive_interval == 1
    time.sleep(4)  # idle longer than the timeout: only pings keep the peers alive
    assert not any(isinstance(n, PeerDeleted) for n in a.notes + b.notes)
    assert a.backend is not None and b.backend is not None
    assert b.backend.peer_stats(9).extra.get("keepalive_rx", 0) >= 2
    assert a.run(ping(TUN_B, 1)) == 1  # pings never reach the TUN, traffic still flows
    # stop A's pings; B must expire A after the timeout
    a.request(SetPeer(7, keepalive_interval=0, keepalive_timeout=0))
    n = b.wait_note(lambda n: isinstance(n, PeerDeleted), timeout=8)
    assert n == PeerDeleted(9, PeerDelReason.EXPIRED)
    with pytest.raises(BackendError, match="unknown peer id 9"):
        b.request(GetPeer(9))


def _check_key_exhaustion_and_del_iface(a: Site) -> None:
    assert a.backend is not None
    ks = a.backend._peers[7].keys[0]  # internal: fast-forward 4 billion packets
    assert ks is not None
    ks.tx_packet_id = MAX_PACKET_ID - 1
    a.run(ping(TUN_B, 2, timeout=0.5))  # B is gone; we only need two packets to leave A
    n = a.wait_note(lambda n: isinstance(n, KeyExhausted))
    assert n == KeyExhausted(7, ks.key_id)
    with pytest.raises(BackendError, match="no key in the primary slot"):
        a.request(GetKey(7, KeySlot.PRIMARY))
    ifname = a.backend.ifname
    a.request(DelIface("tun"))
    a.wait_note(lambda n: n == PeerDeleted(7, PeerDelReason.TEARDOWN))
    assert a.call(lambda: ifname not in [name for _, name in socket.if_nameindex()])


# ---------------------------------------------------------------------------- TCP


@pytest.mark.netns
def test_tcp_tunnel_backlog_rekey_and_disconnect(lab: Lab) -> None:
    a = lab.site(lab.ns_a)
    b = lab.site(lab.ns_b)
    _start_side(a, TUN_A, TUN_B, TUN6_A)
    _start_side(b, TUN_B, TUN_A, TUN6_B)

    def listen() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((VETH_A, PORT))
        s.listen(1)
        return s

    listener = a.call(listen)
    conn_b = b.call(lambda: socket.create_connection((VETH_A, PORT), timeout=5))
    conn_a, _ = listener.accept()
    try:
        # a control frame whose first bytes the control plane already read before the handover
        hard_reset = b"\x38" + os.urandom(20)
        conn_b.sendall(struct.pack(">H", len(hard_reset)) + hard_reset)
        conn_a.settimeout(3)
        backlog = conn_a.recv(3)
        assert len(backlog) == 3

        blocking_before = os.get_blocking(conn_a.fileno())
        a.request(NewPeer(1, conn_a.fileno(), Transport.TCP, tcp_backlog=backlog))
        b.request(NewPeer(1, conn_b.fileno(), Transport.TCP))
        a.wait_note(lambda n: n == ControlPacket(1, hard_reset, None))
        with pytest.raises(BackendError, match="TCP peer must not have a remote"):
            a.request(NewPeer(2, conn_a.fileno(), Transport.TCP, remote=(VETH_B, 1)))

        key0 = os.urandom(256)
        _install_key(a, 1, KeySlot.PRIMARY, 0, key0, client=False)
        _install_key(b, 1, KeySlot.PRIMARY, 0, key0, client=True)
        assert a.run(ping(TUN_B, 3)) == 3

        # control and data share the stream; frames never interleave
        big = b"\x20" + os.urandom(1200)
        for i in range(20):
            b.request(SendControl(1, big[:-1] + bytes([i])))
        assert a.run(ping(TUN_B, 2)) == 2
        got = [n.packet for n in a.notes if isinstance(n, ControlPacket) and len(n.packet) == len(big)]
        for _ in range(50):
            if len(got) == 20:
                break
            time.sleep(0.05)
            got = [n.packet for n in a.notes if isinstance(n, ControlPacket) and len(n.packet) == len(big)]
        assert [p[-1] for p in got] == list(range(20))

        _check_rekey_during_traffic(a, b, a_peer=1, b_peer=1)
        info = b.request(GetPeer(1))
        assert info.remote is None and info.vpn_rx_packets > 0

        a.request(DelPeer(1))
        a.wait_note(lambda n: n == PeerDeleted(1, PeerDelReason.USERSPACE))
        assert os.get_blocking(conn_a.fileno()) == blocking_before  # the caller's flags come back
        conn_a.close()  # our last reference: B sees EOF
        b.wait_note(lambda n: n == PeerDeleted(1, PeerDelReason.TRANSPORT_DISCONNECT))
    finally:
        for s in (conn_a, conn_b, listener):
            s.close()


@pytest.mark.netns
def test_tcp_bad_frame_is_transport_error(lab: Lab) -> None:
    a = lab.site(lab.ns_a)
    _start_side(a, TUN_A, TUN_B, TUN6_A)

    def pair() -> tuple[socket.socket, socket.socket]:
        ls = socket.socket()
        ls.bind(("127.0.0.1", 0))
        ls.listen(1)
        c = socket.create_connection(ls.getsockname())
        s, _ = ls.accept()
        ls.close()
        return s, c

    server, client = a.call(pair)
    try:
        a.request(NewPeer(4, server.fileno(), Transport.TCP))
        client.sendall(b"\x00\x01x")  # a 1-byte frame: the kernel's parser rejects < 2
        assert a.wait_note(lambda n: isinstance(n, PeerDeleted)) == PeerDeleted(
            4, PeerDelReason.TRANSPORT_ERROR
        )
    finally:
        server.close()
        client.close()
