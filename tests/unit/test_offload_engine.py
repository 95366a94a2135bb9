"""The offload engine (``OffloadDataChannel``) against the userspace backend's scenarios.

Same laboratory as ``test_userspace_backend.py`` (two namespaces joined by a veth, one
thread per namespace running an asyncio loop), but each side drives the multi-process
engine through the proxy: ping both ways, bulk traffic with GSO/GRO and TSO segmentation,
no wire packet above the MTU, key swap during traffic, float, keepalive and expiry, key
exhaustion, control packets both ways, TCP transport, engine lifecycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from pyovpn.datachannel.api import (
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
    PeerDeleted,
    PeerDelReason,
    PeerFloated,
    SendControl,
    SetPeer,
    SwapKeys,
    Transport,
)
from pyovpn.datachannel.crypto import MAX_PACKET_ID, PING_MAGIC
from pyovpn.datachannel.offload import OffloadDataChannel
from pyovpn.errors import BackendError
from pyovpn.net import tun
from tests.unit.test_userspace_backend import (
    CIPHER,
    PORT,
    SO_RCVBUFFORCE,
    TUN6_A,
    TUN6_B,
    TUN_A,
    TUN_B,
    VETH_A,
    VETH_B,
    Lab,
    Site,
    _install_key,
    _keys,
    _udp_socket,
    lab,  # noqa: F401 - the fixture
    ping,
)

MTU = 1400


def _start_side(site: Site, tun_addr: str, tun_peer: str, tun6: str, **options: Any) -> None:
    backend = OffloadDataChannel(**options)
    site.backend = backend  # type: ignore[assignment]
    backend.subscribe(site.notes.append)
    site.request(NewIface("tun", IfaceMode.P2P, MTU))
    ifname = backend.ifname
    assert ifname and ifname.startswith("tun")

    def addresses() -> None:
        tun.add_address(ifname, tun_addr, 32, peer=tun_peer)
        tun.add_address(ifname, tun6, 64)

    site.call(addresses)


def _stats(site: Site, peer_id: int) -> Any:
    return site.run(site.backend.peer_stats(peer_id))  # type: ignore[union-attr]


def _tcp_bulk(a: Site, b: Site, nbytes: int, port: int = 5201, dst: str = TUN_B) -> float:
    """Send ``nbytes`` over one TCP connection A -> B through the tunnel; returns seconds.

    Sockets are created inside the sites' namespaces; using them from this thread is fine
    (a socket keeps the namespace it was created in).
    """
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET

    def listen() -> socket.socket:
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((dst, port))
        s.listen(1)
        return s

    ls = b.call(listen)
    got = bytearray()
    errors: list[BaseException] = []

    def sink() -> None:
        try:
            ls.settimeout(30)
            conn, _ = ls.accept()
            conn.settimeout(30)
            with conn:
                while True:
                    d = conn.recv(1 << 20)
                    if not d:
                        break
                    got.extend(d)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=sink, daemon=True)
    t.start()
    payload = os.urandom(nbytes)
    start = time.monotonic()
    c = a.call(lambda: socket.socket(fam, socket.SOCK_STREAM))
    try:
        c.settimeout(30)
        c.connect((dst, port))
        c.sendall(payload)
    finally:
        c.close()
    t.join(60)
    ls.close()
    elapsed = time.monotonic() - start
    assert not errors, errors
    assert bytes(got) == payload, f"the stream must arrive intact ({len(got)} of {nbytes} bytes)"
    return elapsed


class _Sniffer:
    """AF_PACKET capture of the UDP datagrams leaving a veth, as they will be on the wire.

    veth passes UDP GSO trains through unsegmented, so the tap sees super-packets; with
    PACKET_VNET_HDR each capture carries its virtio_net_hdr, whose gso_size is the size
    every datagram of the train will have once segmented.
    """

    PACKET_VNET_HDR = 15
    ETH_P_ALL = 0x0003

    def __init__(self, site: Site, ifname: str) -> None:
        self.sizes: list[int] = []
        self.trains = 0
        self.sock = site.call(lambda: self._open(ifname))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _open(self, ifname: str) -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(self.ETH_P_ALL))
        s.setsockopt(263, self.PACKET_VNET_HDR, 1)  # SOL_PACKET
        s.bind((ifname, 0))
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
        s.settimeout(0.2)
        return s

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                data, addr = self.sock.recvfrom(1 << 17)
            except TimeoutError:
                continue
            except OSError:
                return
            if addr[2] != socket.PACKET_OUTGOING or len(data) < 10 + 14 + 28:
                continue
            _flags, gso_type, _hl, gso_size, _cs, _co = struct.unpack_from("<BBHHHH", data)
            frame = data[10:]
            if frame[12:14] != b"\x08\x00":
                continue
            ip = frame[14:]
            if ip[9] != 17 or struct.unpack_from("!H", ip, 22)[0] != PORT:
                continue
            if gso_type:
                self.trains += 1
                self.sizes.append(20 + 8 + gso_size)
            else:
                self.sizes.append(struct.unpack_from("!H", ip, 2)[0])

    def close(self) -> list[int]:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()
        return self.sizes


def _gone(pid: int) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------------------- engine process


def test_engine_starts_and_rejects_commands_cleanly() -> None:
    if os.geteuid() != 0:
        pytest.skip("the engine creates TUN devices: needs root")

    async def body() -> None:
        b = OffloadDataChannel(workers=2)
        try:
            with pytest.raises(BackendError, match="GetPeer: unknown peer id 3"):
                await b.request(GetPeer(3))
            with pytest.raises(BackendError, match="NewPeer: no interface"):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                try:
                    await b.request(NewPeer(1, s.fileno(), Transport.UDP, ("192.0.2.1", 1194)))
                finally:
                    s.close()
            with pytest.raises(BackendError, match="NewPeer: socket fd 999 is not usable"):
                await b.request(NewPeer(1, 999, Transport.UDP, ("192.0.2.1", 1194)))
            with pytest.raises(BackendError, match="NewIface: multipoint"):
                await b.request(NewIface("tun", IfaceMode.MP))
            with pytest.raises(BackendError, match="DelIface: no interface"):
                await b.request(DelIface("tun9"))
            with pytest.raises(BackendError, match="SwapKeys: unknown peer"):
                await b.request(SwapKeys(1))
            pid = b.engine_pid
            workers = list(b.worker_pids)
            assert pid and len(workers) == 2
        finally:
            await b.close()
        assert b._proc is not None and b._proc.poll() is not None, "close() must stop the engine"
        for w in workers:
            assert _gone(w), f"worker {w} outlived close()"
        with pytest.raises(BackendError, match="closed"):
            await b.request(GetPeer(1))

    asyncio.run(body())


def test_engine_dies_with_its_parent() -> None:
    """The engine gets PR_SET_PDEATHSIG: killing the control plane kills engine and workers."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    code = (
        "import asyncio, sys, time\n"
        "from pyovpn.datachannel.offload import OffloadDataChannel\n"
        "from pyovpn.datachannel.api import GetPeer\n"
        "async def main():\n"
        "    b = OffloadDataChannel(workers=2)\n"
        "    try:\n"
        "        await b.request(GetPeer(1))\n"
        "    except Exception:\n"
        "        pass\n"
        "    print(b.engine_pid, *b.worker_pids, flush=True)\n"
        "    time.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    proc = subprocess.Popen([os.sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)  # type: ignore[attr-defined]
    try:
        assert proc.stdout is not None
        pids = [int(x) for x in proc.stdout.readline().split()]
        assert len(pids) == 3
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
            time.sleep(0.05)
        assert not any(os.path.exists(f"/proc/{p}") for p in pids), "engine processes outlived the parent"
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()


# ---------------------------------------------------------------------------- UDP


@pytest.mark.netns
@pytest.mark.parametrize("workers", [2, 1])
def test_udp_engine_scenarios(lab: Lab, workers: int) -> None:  # noqa: F811
    a = lab.site(lab.ns_a)
    b = lab.site(lab.ns_b)
    _start_side(a, TUN_A, TUN_B, TUN6_A, workers=workers)
    _start_side(b, TUN_B, TUN_A, TUN6_B, workers=workers)
    sock_a = a.call(lambda: _udp_socket((VETH_A, PORT)))
    sock_b = b.call(lambda: _udp_socket((VETH_B, PORT)))
    try:
        a.request(NewPeer(7, sock_a.fileno(), Transport.UDP, (VETH_B, PORT), tx_peer_id=9))
        b.request(NewPeer(9, sock_b.fileno(), Transport.UDP, (VETH_A, PORT), tx_peer_id=7))
        key0 = os.urandom(256)
        _install_key(a, 7, KeySlot.PRIMARY, 0, key0, client=True)
        _install_key(b, 9, KeySlot.PRIMARY, 0, key0, client=False)

        assert a.run(ping(TUN_B, 3)) == 3
        assert b.run(ping(TUN_A, 3)) == 3
        info_a = a.request(GetPeer(7))
        info_b = b.request(GetPeer(9))
        assert info_a.vpn_tx_packets >= 3 and info_a.vpn_rx_packets >= 3
        assert info_b.vpn_rx_packets >= 3 and info_b.link_rx_packets >= 3
        assert info_a.remote == (VETH_B, PORT)
        assert a.request(GetKey(7, KeySlot.PRIMARY)).key_id == 0

        _check_tcp_bulk_offloads(lab, a, b)
        _check_ipv6_inside(a, b)
        _check_command_errors(a)

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


def _check_tcp_bulk_offloads(lab: Lab, a: Site, b: Site) -> None:  # noqa: F811 - lab is a parameter
    """One TCP stream each way: TSO segmentation, GSO sends, GRO coalescing; nothing above MTU."""
    sniff = _Sniffer(a, f"pv{lab.tag}a")
    try:
        _tcp_bulk(a, b, 8 << 20, port=5201)
        _tcp_bulk(b, a, 4 << 20, port=5202, dst=TUN_A)
        _tcp_bulk(a, b, 2 << 20, port=5203, dst=TUN6_B)
    finally:
        sizes = sniff.close()
    sa, sb = _stats(a, 7), _stats(b, 9)
    print(f"bulk: A {sa}\nbulk: B {sb}")
    print(f"wire: {len(sizes)} captures out of A ({sniff.trains} GSO trains), max IP length {max(sizes)}")
    assert sizes and max(sizes) <= MTU + 24 + 28, "a wire packet exceeded the tunnel MTU + overhead"
    assert sa.extra.get("tso_packets", 0) > 0, "TCP from the TUN should arrive as TSO super-packets"
    assert sa.extra.get("gso_sends", 0) > 0
    assert sb.extra.get("gro_batches", 0) > 0
    assert sb.extra.get("gro_merged", 0) > 0, "in-order segments should be coalesced into GSO writes"
    assert sa.dropped_auth == sb.dropped_auth == 0
    assert sa.dropped_replay == sb.dropped_replay == 0


def _check_ipv6_inside(a: Site, b: Site) -> None:
    rx = b.call(lambda: _udp_socket((TUN6_B, 5001), socket.AF_INET6))
    tx = a.call(lambda: _udp_socket((TUN6_A, 0), socket.AF_INET6))
    try:
        rx.settimeout(3)
        a.call(lambda: tx.sendto(b"over ipv6", (TUN6_B, 5001)))
        assert rx.recvfrom(100)[0] == b"over ipv6"
        # a UDP burst larger than the MTU in one send with UDP_SEGMENT: the TUN hands it over
        # as a USO super-packet that the engine must cut into normal datagrams
        a.call(
            lambda: tx.sendmsg([os.urandom(600 * 5)], [(17, 103, struct.pack("=H", 600))], 0, (TUN6_B, 5001))
        )
        got = [len(rx.recvfrom(2000)[0]) for _ in range(5)]
        assert got == [600] * 5
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
    a.request(DelKey(7, KeySlot.SECONDARY))


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
    a.request(SwapKeys(a_peer))
    time.sleep(0.15)
    b.request(SwapKeys(b_peer))
    assert traffic.result(30) == 10, "no ping may be lost across the key swap"
    for site, pid in ((a, a_peer), (b, b_peer)):
        assert site.request(GetKey(pid, KeySlot.PRIMARY)).key_id == 1
        assert site.request(GetKey(pid, KeySlot.SECONDARY)).key_id == 0
        site.request(DelKey(pid, KeySlot.SECONDARY))
    assert a.run(ping(TUN_B, 3)) == 3


def _check_float(a: Site, b: Site) -> None:
    other = a.call(lambda: _udp_socket((VETH_A, PORT + 1000)))
    try:
        # a packet sealed with A's live key (its next packet id) sent from another port
        forged = a.run(a.backend.debug(7, "encrypt", payload=PING_MAGIC))  # type: ignore[union-attr]
        a.call(lambda: other.sendto(forged, (VETH_B, PORT)))
        moved = b.wait_note(lambda n: isinstance(n, PeerFloated))
        assert moved == PeerFloated(9, (VETH_A, PORT + 1000))
        assert b.request(GetPeer(9)).remote == (VETH_A, PORT + 1000)
        b.request(SendControl(9, b"\x20to the new address"))
        other.settimeout(3)
        assert other.recv(100) == b"\x20to the new address"
    finally:
        other.close()
    b.notes.clear()
    assert a.run(ping(TUN_B, 2)) == 2
    b.wait_note(lambda n: n == PeerFloated(9, (VETH_A, PORT)))


def _check_keepalive_and_expiry(a: Site, b: Site) -> None:
    a.request(SetPeer(7, keepalive_interval=1, keepalive_timeout=3))
    b.request(SetPeer(9, keepalive_interval=1, keepalive_timeout=3))
    assert a.request(GetPeer(7)).keepalive_interval == 1
    time.sleep(4)
    assert not any(isinstance(n, PeerDeleted) for n in a.notes + b.notes)
    assert _stats(b, 9).extra.get("keepalive_rx", 0) >= 2
    assert a.run(ping(TUN_B, 1)) == 1
    a.request(SetPeer(7, keepalive_interval=0, keepalive_timeout=0))
    n = b.wait_note(lambda n: isinstance(n, PeerDeleted), timeout=8)
    assert n == PeerDeleted(9, PeerDelReason.EXPIRED)
    with pytest.raises(BackendError, match="unknown peer id 9"):
        b.request(GetPeer(9))


def _check_key_exhaustion_and_del_iface(a: Site) -> None:
    key_id = a.request(GetKey(7, KeySlot.PRIMARY)).key_id
    a.run(a.backend.debug(7, "set_tx_pid", value=MAX_PACKET_ID - 1))  # type: ignore[union-attr]
    a.run(ping(TUN_B, 2, timeout=0.5))
    n = a.wait_note(lambda n: isinstance(n, KeyExhausted))
    assert n == KeyExhausted(7, key_id)
    with pytest.raises(BackendError, match="no key in the primary slot"):
        a.request(GetKey(7, KeySlot.PRIMARY))
    ifname = a.backend.ifname  # type: ignore[union-attr]
    a.request(DelIface("tun"))
    a.wait_note(lambda n: n == PeerDeleted(7, PeerDelReason.TEARDOWN))
    assert a.call(lambda: ifname not in [name for _, name in socket.if_nameindex()])


# ---------------------------------------------------------------------------- UDP, without offloads


@pytest.mark.netns
def test_udp_engine_without_tun_offloads(lab: Lab) -> None:  # noqa: F811
    """The plain TUN path (no vnet header) still works, e.g. on kernels that refuse offloads."""
    a = lab.site(lab.ns_a)
    b = lab.site(lab.ns_b)
    _start_side(a, TUN_A, TUN_B, TUN6_A, tun_offload=False)
    _start_side(b, TUN_B, TUN_A, TUN6_B, tun_offload=False, udp_gro=False)
    sock_a = a.call(lambda: _udp_socket((VETH_A, PORT)))
    sock_b = b.call(lambda: _udp_socket((VETH_B, PORT)))
    try:
        a.request(NewPeer(7, sock_a.fileno(), Transport.UDP, (VETH_B, PORT)))
        b.request(NewPeer(7, sock_b.fileno(), Transport.UDP, (VETH_A, PORT)))
        key0 = os.urandom(256)
        _install_key(a, 7, KeySlot.PRIMARY, 0, key0, client=True)
        _install_key(b, 7, KeySlot.PRIMARY, 0, key0, client=False)
        assert a.run(ping(TUN_B, 3)) == 3
        _tcp_bulk(a, b, 2 << 20)
    finally:
        sock_a.close()
        sock_b.close()


# ---------------------------------------------------------------------------- TCP


@pytest.mark.netns
def test_tcp_engine_backlog_rekey_and_disconnect(lab: Lab) -> None:  # noqa: F811
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

        big = b"\x20" + os.urandom(1200)
        for i in range(20):
            b.request(SendControl(1, big[:-1] + bytes([i])))
        assert a.run(ping(TUN_B, 2)) == 2
        for _ in range(50):
            got = [n.packet for n in a.notes if isinstance(n, ControlPacket) and len(n.packet) == len(big)]
            if len(got) == 20:
                break
            time.sleep(0.05)
        assert [p[-1] for p in got] == list(range(20))

        _tcp_bulk(a, b, 4 << 20)  # TSO super-packets over a TCP transport
        _check_rekey_during_traffic(a, b, a_peer=1, b_peer=1)
        info = b.request(GetPeer(1))
        assert info.remote is None and info.vpn_rx_packets > 0

        a.request(DelPeer(1))
        a.wait_note(lambda n: n == PeerDeleted(1, PeerDelReason.USERSPACE))
        assert os.get_blocking(conn_a.fileno()) == blocking_before
        conn_a.close()
        b.wait_note(lambda n: n == PeerDeleted(1, PeerDelReason.TRANSPORT_DISCONNECT))
    finally:
        for s in (conn_a, conn_b, listener):
            s.close()


@pytest.mark.netns
def test_tcp_engine_bad_frame_is_transport_error(lab: Lab) -> None:  # noqa: F811
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
        client.sendall(b"\x00\x01x")
        assert a.wait_note(lambda n: isinstance(n, PeerDeleted)) == PeerDeleted(
            4, PeerDelReason.TRANSPORT_ERROR
        )
    finally:
        server.close()
        client.close()


# ---------------------------------------------------------------------------- control packets first
#
# Under a saturating transfer the peer's socket receive queue is full right after each data
# burst; a control packet sent then is dropped there, and its retransmissions (sent the
# same way) too, so a renegotiation could stall for tens of seconds. The transmit worker
# therefore never sends a UDP control packet within _CTL_GAP of a data burst: it stops
# reading the TUN, waits out the gap and sends the control packet ahead of the next burst.
# TCP control frames overtake queued data frames. A full socket buffer never drops one.


def _bare_worker() -> tuple[Any, socket.socket]:
    from pyovpn.datachannel.engine.worker import Worker

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    w = Worker(0, theirs, {})
    w.chan.setblocking(False)
    return w, ours


def _close_worker(w: Any, chan: socket.socket) -> None:
    w.ep.close()
    w.chan.close()
    chan.close()


def _bare_peer(w: Any, sock: Any, transport: Transport, send_addr: Any = None) -> Any:
    from pyovpn.datachannel.engine.worker import _Peer

    m = {
        "peer_id": 1,
        "gen": 1,
        "tx_peer_id": 1,
        "transport": transport.value,
        "tx": True,
        "rx": False,
        "gso": False,
        "gro": False,
        "mss4": 0,
        "mss6": 0,
        "send_addr": send_addr,
        "raw_ip": send_addr[0] if send_addr else None,
        "raw_port": send_addr[1] if send_addr else 0,
    }
    peer = _Peer(m, sock, None)
    w.peers[1] = peer
    w.tx_peer = peer
    return peer


class _RefusingSocket:
    """A UDP socket whose first ``refusals`` sends fail with EAGAIN (a full send buffer)."""

    def __init__(self, sock: socket.socket, refusals: int) -> None:
        self.sock = sock
        self.refusals = refusals

    def fileno(self) -> int:
        return self.sock.fileno()

    def sendto(self, data: bytes, addr: Any) -> int:
        if self.refusals:
            self.refusals -= 1
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return self.sock.sendto(data, addr)


def _recv_all(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096))
        except BlockingIOError:
            return out


def test_worker_udp_control_waits_out_the_gap_and_goes_before_data() -> None:
    import select

    from pyovpn.datachannel.engine.worker import _CTL_GAP

    w, chan = _bare_worker()
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind(("127.0.0.1", 0))
    rx.bind(("127.0.0.1", 0))
    rx.setblocking(False)
    tun_r, tun_w = os.pipe()  # stands in for the TUN: readable = bulk data waiting
    try:
        peer = _bare_peer(w, tx, Transport.UDP, rx.getsockname())
        w.tun_fd, w.tun_read = tun_r, True
        w._register(tun_r, select.EPOLLIN, w._on_tun)
        os.write(tun_w, b"x")

        # no burst lately: out at once, data flow untouched
        w._send_control(peer, b"\x20now")
        assert _recv_all(rx) == [b"\x20now"]
        assert not w.tun_paused

        # a burst just left: held, in order, and the TUN is not read meanwhile
        w.last_burst = time.monotonic() + 60  # (a burst "now" whose gap cannot run out mid-test)
        w._send_control(peer, b"\x20one")
        w._send_control(peer, b"\x28two")
        w._run_timers()
        assert _recv_all(rx) == []
        assert w.tun_paused and w.ep.poll(0) == [], "no data may be read while control waits"
        w.last_burst = time.monotonic()
        assert 0 < w._next_timer() <= _CTL_GAP + 0.002
        time.sleep(w._next_timer())
        w._run_timers()
        assert _recv_all(rx) == [b"\x20one", b"\x28two"]
        assert not w.tun_paused and [fd for fd, _ in w.ep.poll(0)] == [tun_r]
        assert time.monotonic() - w.last_burst >= _CTL_GAP

        # a full send buffer (EAGAIN) is retried, never dropped, and data still waits
        w.last_burst = 0.0
        peer.sock = _RefusingSocket(tx, refusals=2)
        w._send_control(peer, b"\x20three")
        w._send_control(peer, b"\x20four")
        assert _recv_all(rx) == [] and w.tun_paused
        deadline = time.monotonic() + 2
        while peer.ctl_q and time.monotonic() < deadline:
            time.sleep(max(0.0, w._next_timer()))
            w._run_timers()
        assert _recv_all(rx) == [b"\x20three", b"\x20four"]
        assert not w.tun_paused
        st = peer.stats.extra
        assert st["control_tx"] == 5 and st["control_tx_retries"] == 2
        assert "control_tx_dropped" not in st

        # DelPeer (userspace) still lets a held packet (EXIT) leave
        peer.sock = tx
        w.last_burst = time.monotonic()
        w._send_control(peer, b"\x20bye")
        w._del_peer(peer, True)
        assert _recv_all(rx) == [b"\x20bye"]
        assert not w.tun_paused
    finally:
        rx.close()
        tx.close()
        for fd in (tun_r, tun_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        _close_worker(w, chan)


def test_worker_tcp_control_frames_overtake_queued_data() -> None:
    w, chan = _bare_worker()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    ours.setblocking(False)
    try:
        peer = _bare_peer(w, ours, Transport.TCP)

        def frame(kind: int, n: int, size: int) -> bytes:
            body = bytes([kind << 3]) + n.to_bytes(4, "big") + bytes([n & 0xFF]) * size
            return struct.pack(">H", len(body)) + body

        # data in chunks of several frames, as the TUN path queues them, until a backlog forms
        data_frames: list[bytes] = []
        queued = 0
        while len(peer.tcp_tx) < 200_000:
            chunk = [
                frame(9, len(data_frames) + i, 1300 + 7 * ((len(data_frames) + i) % 13)) for i in range(8)
            ]
            data_frames += chunk
            assert w._tcp_queue(peer, b"".join(chunk), control=False)
            queued += sum(len(f) for f in chunk)
        taken = queued - len(peer.tcp_tx)  # bytes the kernel took: at most one frame split
        starts, pos = [], 0
        for f in data_frames:
            starts.append(pos)
            pos += len(f)
        data_before = sum(1 for s in starts if s < taken)

        for i in range(3):
            w._send_control(peer, b"\x20" + b"ctl%d" % i + os.urandom(300))
        w._send_control(peer, b"\x28" + b"ctl3")  # behind the first three, still ahead of data
        for _ in range(8):  # more data after the control frames
            f = frame(9, len(data_frames), 1400)
            data_frames.append(f)
            assert w._tcp_queue(peer, f, control=False)

        got = bytearray()
        theirs.settimeout(5)
        while peer.tcp_tx or len(got) < queued:
            got += theirs.recv(65536)
            if peer.tcp_tx:
                w._on_tcp_writable(peer)
            queued = sum(len(f) for f in data_frames)
        frames, off = [], 0
        while off < len(got):
            n = struct.unpack_from(">H", got, off)[0]
            frames.append(bytes(got[off + 2 : off + 2 + n]))
            off += 2 + n
        assert off == len(got), "the stream must stay whole frames"
        kinds = [f[0] >> 3 for f in frames]
        first_ctl = kinds.index(4) if 4 in kinds else kinds.index(5)
        assert first_ctl == data_before, "control must follow the frame in flight, not the queue"
        assert [f[1:5] for f in frames[first_ctl : first_ctl + 4]] == [b"ctl0", b"ctl1", b"ctl2", b"ctl3"]
        assert [f for f in frames if f[0] >> 3 == 9] == [f[2:] for f in data_frames], "data intact, in order"
        assert peer.stats.extra.get("control_tx_ahead") == 4
    finally:
        ours.close()
        theirs.close()
        _close_worker(w, chan)


class _WireLog:
    """Kernel timestamps and first payload bytes of the UDP datagrams leaving a veth (AF_PACKET)."""

    ETH_P_ALL = 0x0003
    SO_TIMESTAMPNS = 35  # also the cmsg type (SCM_TIMESTAMPNS); not in the socket module

    def __init__(self, site: Site, ifname: str) -> None:
        self.log: list[tuple[float, int]] = []  # (seconds, first payload byte) per send
        self.sock = site.call(lambda: self._open(ifname))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _open(self, ifname: str) -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(self.ETH_P_ALL))
        s.bind((ifname, 0))
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
        s.setsockopt(socket.SOL_SOCKET, self.SO_TIMESTAMPNS, 1)
        s.settimeout(0.2)
        return s

    def _run(self) -> None:
        space = socket.CMSG_SPACE(16)
        while not self.stop.is_set():
            try:
                data, anc, _flags, addr = self.sock.recvmsg(128, space)
            except TimeoutError:
                continue
            except OSError:
                return
            if addr[2] != socket.PACKET_OUTGOING or len(data) < 14 + 28 + 1 or data[12:14] != b"\x08\x00":
                continue
            ip = data[14:]
            ihl = (ip[0] & 0x0F) * 4
            if ip[9] != 17 or struct.unpack_from("!H", ip, ihl + 2)[0] != PORT:
                continue
            ts = 0.0
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == self.SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", raw[:16])
                    ts = sec + nsec / 1e9
            self.log.append((ts, ip[ihl + 8]))

    def close(self) -> list[tuple[float, int]]:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()
        return self.log


def _control_both_ways_while_saturated(
    a: Site, b: Site, *, a_peer: int, b_peer: int, bulk: Callable[[], Any]
) -> tuple[list[float], list[float]]:
    """Bulk data A -> B in a thread; meanwhile control packets both ways. Returns latencies.

    Every control packet must arrive, in order, within a bound, while the tunnel is saturated.
    """
    arrivals: dict[str, list[tuple[float, bytes]]] = {"a": [], "b": []}
    for name, site in (("a", a), ("b", b)):

        def record(n: Any, box: list[tuple[float, bytes]] = arrivals[name]) -> None:
            if isinstance(n, ControlPacket) and n.packet[1:4] == b"ctl":
                box.append((time.monotonic(), n.packet))

        site.call(lambda site=site, record=record: site.backend.subscribe(record))  # type: ignore[union-attr]
    errors: list[BaseException] = []

    def run_bulk() -> None:
        try:
            bulk()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run_bulk, daemon=True)
    t.start()
    time.sleep(0.5)  # let the transfer ramp up to saturation
    sent: dict[str, list[tuple[float, bytes]]] = {"a": [], "b": []}
    i = 0
    while t.is_alive() or i < 10:
        for name, site, pid, op in (("a", a, a_peer, 0x20), ("b", b, b_peer, 0x28)):
            pkt = bytes([op]) + b"ctl%04d" % i + os.urandom(1100 if i % 2 else 60)
            sent[name].append((time.monotonic(), pkt))
            site.request(SendControl(pid, pkt))
        i += 1
        time.sleep(0.02)
    t.join(120)
    assert not errors, errors
    assert not t.is_alive(), "the bulk transfer did not finish"
    latencies: dict[str, list[float]] = {}
    for src, dst in (("a", "b"), ("b", "a")):
        deadline = time.monotonic() + 5
        while len(arrivals[dst]) < len(sent[src]) and time.monotonic() < deadline:
            time.sleep(0.02)
        got = [p for _, p in arrivals[dst]]
        want = [p for _, p in sent[src]]
        assert got == want, (
            f"control {src} -> {dst}: {len(got)} of {len(want)} arrived"
            f"{'' if len(got) < len(want) else ' out of order'}"
        )
        latencies[src] = [ta - ts for (ts, _), (ta, _) in zip(sent[src], arrivals[dst], strict=True)]
        assert max(latencies[src]) < 1.0, f"control {src} -> {dst} took up to {max(latencies[src]):.3f}s"
    return latencies["a"], latencies["b"]


@pytest.mark.netns
@pytest.mark.parametrize("transport", [Transport.UDP, Transport.TCP])
def test_engine_control_packets_under_saturation(lab: Lab, transport: Transport) -> None:  # noqa: F811
    """Control packets both ways while bulk data saturates the tunnel: all arrive, in order, fast.

    UDP: no control packet leaves within _CTL_GAP of data (measured on the wire), so a
    receiver whose queue a burst just filled has had time to drain it. TCP: control frames
    overtake queued data frames and the stream stays intact.
    """
    from pyovpn.datachannel.engine.worker import _CTL_GAP

    a = lab.site(lab.ns_a)
    b = lab.site(lab.ns_b)
    _start_side(a, TUN_A, TUN_B, TUN6_A, workers=2)
    _start_side(b, TUN_B, TUN_A, TUN6_B, workers=2)
    conns: list[socket.socket] = []
    try:
        if transport is Transport.UDP:
            sock_a = a.call(lambda: _udp_socket((VETH_A, PORT)))
            sock_b = b.call(lambda: _udp_socket((VETH_B, PORT)))
            conns += [sock_a, sock_b]
            a.request(NewPeer(7, sock_a.fileno(), Transport.UDP, (VETH_B, PORT)))
            b.request(NewPeer(7, sock_b.fileno(), Transport.UDP, (VETH_A, PORT)))
        else:

            def listen() -> socket.socket:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((VETH_A, PORT))
                s.listen(1)
                return s

            listener = a.call(listen)
            conn_b = b.call(lambda: socket.create_connection((VETH_A, PORT), timeout=5))
            conn_a, _ = listener.accept()
            conns += [listener, conn_a, conn_b]
            a.request(NewPeer(7, conn_a.fileno(), Transport.TCP))
            b.request(NewPeer(7, conn_b.fileno(), Transport.TCP))
        key0 = os.urandom(256)
        _install_key(a, 7, KeySlot.PRIMARY, 0, key0, client=True)
        _install_key(b, 7, KeySlot.PRIMARY, 0, key0, client=False)
        assert a.run(ping(TUN_B, 3)) == 3

        wire = _WireLog(a, f"pv{lab.tag}a") if transport is Transport.UDP else None
        try:
            lat_ab, lat_ba = _control_both_ways_while_saturated(
                a, b, a_peer=7, b_peer=7, bulk=lambda: _tcp_bulk(a, b, 96 << 20)
            )
        finally:
            log = wire.close() if wire is not None else []
        sa = _stats(a, 7)
        print(
            f"{transport.value}: {len(lat_ab)} control packets each way; "
            f"A->B max {max(lat_ab) * 1000:.1f} ms, B->A max {max(lat_ba) * 1000:.1f} ms; A stats {sa.extra}"
        )
        assert "control_tx_dropped" not in sa.extra
        if wire is not None:
            # the gap between a control packet and the data sent before it, on the wire
            gaps, last_data = [], None
            for ts, first in log:
                if first >> 3 == 9:  # DATA_V2
                    last_data = ts
                elif last_data is not None:
                    gaps.append(ts - last_data)
            print(
                f"wire: {len(log)} sends, {len(gaps)} control packets after data, "
                f"min gap {min(gaps) * 1000:.2f} ms"
            )
            assert len(gaps) >= len(lat_ab) // 2, "the capture missed most control packets"
            assert min(gaps) >= _CTL_GAP * 0.95, (
                f"a control packet left {min(gaps) * 1000:.2f} ms after a data burst "
                f"(< {_CTL_GAP * 1000:.0f} ms): a peer's full receive queue would drop it"
            )
    finally:
        for s in conns:
            s.close()
