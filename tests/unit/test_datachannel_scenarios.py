"""The data-channel scenarios, run on every userspace backend through the one DataChannel interface.

Backends: ``inprocess`` (:class:`UserspaceDataChannel`, the asyncio backend) and
``offload`` (:class:`EngineDataChannel`, the multi-process engine behind its proxy).
Two private namespaces joined by a veth (tests/nslab.py), one backend per side: pings
both ways, UDP bursts with GSO and the GSO fallback, bulk TCP through the tunnel (TSO
and GRO on the engine), no wire packet above the MTU, IPv6 inside, command errors,
control packets both ways, key swap during traffic, float, keepalive and expiry, key
exhaustion and interface teardown; over TCP the pre-handover backlog, control and data
frames sharing the stream, rekey and disconnect, and a bad frame.

Backend-specific tests stay next to their backend: test_userspace_backend.py (no root),
test_userspace_mp.py (multipoint), test_offload_engine.py (engine lifecycle, control
priority under saturation, the plain TUN path).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from pyovpn.datachannel.api import (
    ControlPacket,
    DelIface,
    DelKey,
    DelPeer,
    GetKey,
    GetPeer,
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
from pyovpn.datachannel.engine.proxy import EngineDataChannel
from pyovpn.datachannel.userspace import UserspaceDataChannel
from pyovpn.errors import BackendError
from tests.nslab import (
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
    install_key,
    ip,
    keys,
    ping,
    start_side,
    tcp_bulk,
    tcp_listener,
    tcp_pair,
    udp_socket,
)

MTU = 1400


@dataclass(frozen=True)
class Backend:
    """How a scenario makes a backend, and reaches what the DataChannel interface does not offer."""

    name: str
    make: Callable[[], Any]
    tun_offloads: bool  # TSO super-packets from the TUN, GRO-coalesced writes to it

    def start(self, site: Site, tun_addr: str, tun_peer: str, tun6: str) -> None:
        start_side(site, self.make(), tun_addr, tun_peer, tun6, MTU)

    def stats(self, site: Site, peer_id: int) -> Any:
        """All counters of a peer (``peer_stats``: plain on one backend, a coroutine on the other)."""

        async def get() -> Any:
            st = site.backend.peer_stats(peer_id)
            return await st if inspect.isawaitable(st) else st

        return site.run(get())

    def forge(self, site: Site, peer_id: int, tx_peer_id: int, payload: bytes) -> bytes:
        """A data packet sealed with the peer's live primary key (its next packet id)."""
        if isinstance(site.backend, EngineDataChannel):
            return site.run(site.backend.debug(peer_id, "encrypt", payload=payload))  # type: ignore[no-any-return]
        ks = site.backend._peers[peer_id].keys[0]  # internal: no public way to forge a packet
        assert ks is not None
        return site.call(lambda: ks.encrypt(payload, tx_peer_id))  # type: ignore[no-any-return]

    def fast_forward_tx(self, site: Site, peer_id: int, packet_id: int) -> None:
        """Make the primary key's next packet id ``packet_id + 1`` (skip 4 billion packets)."""
        if isinstance(site.backend, EngineDataChannel):
            site.run(site.backend.debug(peer_id, "set_tx_pid", value=packet_id))
            return
        ks = site.backend._peers[peer_id].keys[0]
        assert ks is not None

        def set_pid() -> None:
            ks.tx_packet_id = packet_id

        site.call(set_pid)


INPROCESS = Backend("inprocess", UserspaceDataChannel, tun_offloads=False)
OFFLOAD = Backend("offload", EngineDataChannel, tun_offloads=True)
OFFLOAD_2 = Backend("offload-2workers", lambda: EngineDataChannel(workers=2), tun_offloads=True)
OFFLOAD_1 = Backend("offload-1worker", lambda: EngineDataChannel(workers=1), tun_offloads=True)


def _backends(*backends: Backend) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("backend", backends, ids=[b.name for b in backends])


# ---------------------------------------------------------------------------- UDP


@pytest.mark.netns
@_backends(INPROCESS, OFFLOAD_2, OFFLOAD_1)
def test_udp_tunnel_scenarios(lab: Lab, backend: Backend) -> None:
    a = lab.site(lab.ns_a)
    b = lab.site(lab.ns_b)
    backend.start(a, TUN_A, TUN_B, TUN6_A)
    backend.start(b, TUN_B, TUN_A, TUN6_B)
    sock_a = udp_socket(a, (VETH_A, PORT))
    sock_b = udp_socket(b, (VETH_B, PORT))
    try:
        # asymmetric peer ids: A sends 9 and expects 7, B the reverse
        a.request(NewPeer(7, sock_a.fileno(), Transport.UDP, (VETH_B, PORT), tx_peer_id=9))
        b.request(NewPeer(9, sock_b.fileno(), Transport.UDP, (VETH_A, PORT), tx_peer_id=7))
        key0 = os.urandom(256)
        install_key(a, 7, KeySlot.PRIMARY, 0, key0, client=True)
        install_key(b, 9, KeySlot.PRIMARY, 0, key0, client=False)

        assert a.run(ping(TUN_B, 3)) == 3
        assert b.run(ping(TUN_A, 3)) == 3
        info_a = a.request(GetPeer(7))
        info_b = b.request(GetPeer(9))
        assert info_a.vpn_tx_packets >= 3 and info_a.vpn_rx_packets >= 3
        assert info_b.vpn_rx_packets >= 3 and info_b.link_rx_packets >= 3
        assert info_a.remote == (VETH_B, PORT)
        assert a.request(GetKey(7, KeySlot.PRIMARY)).key_id == 0

        _check_bulk_and_batching(backend, a, b)
        _check_gso_fallback(backend, lab, a, b)
        _check_tcp_bulk_offloads(backend, lab, a, b)
        _check_ipv6_inside(a, b)
        _check_command_errors(a)

        # control packets pass through untouched, in both directions
        a.request(SendControl(7, b"\x20" + b"hello control"))
        n = b.wait_note(lambda n: isinstance(n, ControlPacket))
        assert n == ControlPacket(9, b"\x20hello control", (VETH_A, PORT))
        b.request(SendControl(9, b"\x28ack"))
        a.wait_note(lambda n: isinstance(n, ControlPacket) and n.packet == b"\x28ack")

        _check_rekey_during_traffic(a, b, a_peer=7, b_peer=9)
        _check_float(backend, a, b)
        _check_keepalive_and_expiry(backend, a, b)
        _check_key_exhaustion_and_del_iface(backend, a)
    finally:
        sock_a.close()
        sock_b.close()


def _check_bulk_and_batching(backend: Backend, a: Site, b: Site) -> None:
    """Bursts from a socket in A: the TUN reader drains them in batches (UDP GSO on send)."""
    rx = udp_socket(b, (TUN_B, 5000))
    rx.setblocking(False)
    rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)  # the sink must not be the bottleneck
    before_a = a.request(GetPeer(7))
    before_b = b.request(GetPeer(9))
    tx = udp_socket(a, (TUN_A, 0))
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
    sa = backend.stats(a, 7)
    sb = backend.stats(b, 9)
    tunneled = sa.vpn_tx_packets - before_a.vpn_tx_packets
    delivered = sb.vpn_rx_packets - before_b.vpn_rx_packets
    print(f"bulk: sent {sent} tunneled {tunneled} delivered {delivered} received {got}")
    print(f"bulk: A {sa}\nbulk: B {sb}")
    assert tunneled == delivered == sent
    assert got >= sent * 0.95
    assert sb.dropped_auth == 0 and sb.dropped_replay == 0
    assert sa.extra.get("gso_sends", 0) > 0, "the TUN reader should batch equal-size packets into GSO sends"


def _check_gso_fallback(backend: Backend, lab: Lab, a: Site, b: Site) -> None:
    """Segments too big for the outer MTU make GSO fail: those go one by one (fragmented)."""
    ip("-n", lab.ns_a, "link", "set", lab.veth_a, "mtu", "1280")
    rx = udp_socket(b, (TUN_B, 5002))
    rx.setblocking(False)
    rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
    tx = udp_socket(a, (TUN_A, 0))
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
        ip("-n", lab.ns_a, "link", "set", lab.veth_a, "mtu", "1500")
    extra = backend.stats(a, 7).extra
    print(f"gso fallback: received {len(sizes)}; A extra {extra}")
    assert sizes.count(1300) == 20 and sizes.count(500) == 20
    assert extra.get("gso_fallbacks", 0) >= 1
    assert extra["gso_sends"] > 5, "small segments must still go out with GSO after the fallback"


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
            iph = frame[14:]
            if iph[9] != 17 or struct.unpack_from("!H", iph, 22)[0] != PORT:
                continue
            if gso_type:
                self.trains += 1
                self.sizes.append(20 + 8 + gso_size)
            else:
                self.sizes.append(struct.unpack_from("!H", iph, 2)[0])

    def close(self) -> list[int]:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()
        return self.sizes


def _check_tcp_bulk_offloads(backend: Backend, lab: Lab, a: Site, b: Site) -> None:
    """One TCP stream each way (and one over IPv6): intact, GSO sends, nothing above the MTU.

    On the engine also TSO segmentation and GRO coalescing.
    """
    sniff = _Sniffer(a, lab.veth_a)
    try:
        tcp_bulk(a, b, 8 << 20, port=5201)
        tcp_bulk(b, a, 4 << 20, port=5202, dst=TUN_A)
        tcp_bulk(a, b, 2 << 20, port=5203, dst=TUN6_B)
    finally:
        sizes = sniff.close()
    sa, sb = backend.stats(a, 7), backend.stats(b, 9)
    print(f"bulk: A {sa}\nbulk: B {sb}")
    print(f"wire: {len(sizes)} captures out of A ({sniff.trains} GSO trains), max IP length {max(sizes)}")
    assert sizes and max(sizes) <= MTU + 24 + 28, "a wire packet exceeded the tunnel MTU + overhead"
    assert sa.extra.get("gso_sends", 0) > 0
    if backend.tun_offloads:
        assert sa.extra.get("tso_packets", 0) > 0, "TCP from the TUN should arrive as TSO super-packets"
        assert sb.extra.get("gro_batches", 0) > 0
        assert sb.extra.get("gro_merged", 0) > 0, "in-order segments should be coalesced into GSO writes"
    assert sa.dropped_auth == sb.dropped_auth == 0
    assert sa.dropped_replay == sb.dropped_replay == 0


def _check_ipv6_inside(a: Site, b: Site) -> None:
    rx = udp_socket(b, (TUN6_B, 5001), socket.AF_INET6)
    tx = udp_socket(a, (TUN6_A, 0), socket.AF_INET6)
    try:
        rx.settimeout(3)
        a.call(lambda: tx.sendto(b"over ipv6", (TUN6_B, 5001)))
        assert rx.recvfrom(100)[0] == b"over ipv6"
        # a UDP burst larger than the MTU in one send with UDP_SEGMENT: a TUN with offloads
        # hands it over as a USO super-packet that the backend must cut into normal datagrams
        a.call(
            lambda: tx.sendmsg([os.urandom(600 * 5)], [(17, 103, struct.pack("=H", 600))], 0, (TUN6_B, 5001))
        )
        got = [len(rx.recvfrom(2000)[0]) for _ in range(5)]
        assert got == [600] * 5
    finally:
        rx.close()
        tx.close()


def _check_command_errors(a: Site) -> None:
    enc, dec = keys(os.urandom(256), client=True)
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
    install_key(a, a_peer, KeySlot.SECONDARY, 1, key1, client=True)
    install_key(b, b_peer, KeySlot.SECONDARY, 1, key1, client=False)

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


def _check_float(backend: Backend, a: Site, b: Site) -> None:
    """An authenticated packet from a new address moves B's remote there (and back)."""
    other = udp_socket(a, (VETH_A, PORT + 1000))
    try:
        # A's own live key, so B's replay window sees one consistent packet-id sequence
        forged = backend.forge(a, 7, 9, PING_MAGIC)  # 9: A's tx peer id
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
    # A's real socket speaks again: B floats back before its kernel even answers the echo
    assert a.run(ping(TUN_B, 2)) == 2
    b.wait_note(lambda n: n == PeerFloated(9, (VETH_A, PORT)))


def _check_keepalive_and_expiry(backend: Backend, a: Site, b: Site) -> None:
    a.request(SetPeer(7, keepalive_interval=1, keepalive_timeout=3))
    b.request(SetPeer(9, keepalive_interval=1, keepalive_timeout=3))
    assert a.request(GetPeer(7)).keepalive_interval == 1
    time.sleep(4)  # idle longer than the timeout: only pings keep the peers alive
    assert not any(isinstance(n, PeerDeleted) for n in a.notes + b.notes)
    assert backend.stats(b, 9).extra.get("keepalive_rx", 0) >= 2
    assert a.run(ping(TUN_B, 1)) == 1  # pings never reach the TUN, traffic still flows
    # stop A's pings; B must expire A after the timeout
    a.request(SetPeer(7, keepalive_interval=0, keepalive_timeout=0))
    n = b.wait_note(lambda n: isinstance(n, PeerDeleted), timeout=8)
    assert n == PeerDeleted(9, PeerDelReason.EXPIRED)
    with pytest.raises(BackendError, match="unknown peer id 9"):
        b.request(GetPeer(9))


def _check_key_exhaustion_and_del_iface(backend: Backend, a: Site) -> None:
    key_id = a.request(GetKey(7, KeySlot.PRIMARY)).key_id
    backend.fast_forward_tx(a, 7, MAX_PACKET_ID - 1)
    a.run(ping(TUN_B, 2, timeout=0.5))  # B is gone; we only need two packets to leave A
    n = a.wait_note(lambda n: isinstance(n, KeyExhausted))
    assert n == KeyExhausted(7, key_id)
    with pytest.raises(BackendError, match="no key in the primary slot"):
        a.request(GetKey(7, KeySlot.PRIMARY))
    ifname = a.backend.ifname
    a.request(DelIface("tun"))
    a.wait_note(lambda n: n == PeerDeleted(7, PeerDelReason.TEARDOWN))
    assert a.call(lambda: ifname not in [name for _, name in socket.if_nameindex()])


# ---------------------------------------------------------------------------- TCP


@pytest.mark.netns
@_backends(INPROCESS, OFFLOAD)
def test_tcp_tunnel_backlog_rekey_and_disconnect(lab: Lab, backend: Backend) -> None:
    a = lab.site(lab.ns_a)
    b = lab.site(lab.ns_b)
    backend.start(a, TUN_A, TUN_B, TUN6_A)
    backend.start(b, TUN_B, TUN_A, TUN6_B)

    listener = tcp_listener(a, (VETH_A, PORT))
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
        install_key(a, 1, KeySlot.PRIMARY, 0, key0, client=False)
        install_key(b, 1, KeySlot.PRIMARY, 0, key0, client=True)
        assert a.run(ping(TUN_B, 3)) == 3

        # control and data share the stream; frames never interleave
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

        tcp_bulk(a, b, 4 << 20)  # bulk data over a TCP transport (TSO super-packets on the engine)
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
@_backends(INPROCESS, OFFLOAD)
def test_tcp_bad_frame_is_transport_error(lab: Lab, backend: Backend) -> None:
    a = lab.site(lab.ns_a)
    backend.start(a, TUN_A, TUN_B, TUN6_A)

    server, client = tcp_pair(a)
    try:
        a.request(NewPeer(4, server.fileno(), Transport.TCP))
        client.sendall(b"\x00\x01x")  # a 1-byte frame: the kernel's parser rejects < 2
        assert a.wait_note(lambda n: isinstance(n, PeerDeleted)) == PeerDeleted(
            4, PeerDelReason.TRANSPORT_ERROR
        )
    finally:
        server.close()
        client.close()
