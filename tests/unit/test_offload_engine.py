"""The offload engine (``EngineDataChannel``): what only the multi-process engine has.

Its data-channel scenarios (ping both ways, bulk traffic with GSO/GRO and TSO, no wire
packet above the MTU, key swap during traffic, float, keepalive and expiry, key
exhaustion, control packets both ways, TCP transport) are the backend contract suite,
tests/contract, which every backend runs. Here: the engine process lifecycle, the plain TUN path,
and control packets ahead of data in the workers and under saturation, in the same
laboratory (tests/nslab.py: two namespaces joined by a veth, one thread per namespace
running an asyncio loop).
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
    GetPeer,
    KeySlot,
    NewPeer,
    SendControl,
    SwapKeys,
    Transport,
)
from pyovpn.datachannel.engine.proxy import EngineDataChannel
from pyovpn.errors import BackendError
from pyovpn.proto.packets import UNDEF_PEER_ID
from tests import nslab
from tests.nslab import (
    Lab,
    Site,
    install_key,
    packet_socket,
    ping,
    start_side,
    tcp_bulk,
    tcp_listener,
    udp_socket,
)
from tests.unit.edgefakes import recv_all

MTU = 1400


def _start_side(site: Site, tun_addr: str, tun_peer: str, tun6: str, **options: Any) -> None:
    start_side(site, EngineDataChannel(**options), tun_addr, tun_peer, tun6, MTU)


def _stats(site: Site, peer_id: int) -> Any:
    return site.run(site.backend.peer_stats(peer_id))


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
        b = EngineDataChannel(workers=2)
        try:
            # (what every backend refuses before NewIface and after close: tests/contract)
            with pytest.raises(BackendError, match="GetPeer: unknown peer id 3"):
                await b.request(GetPeer(3))
            with pytest.raises(BackendError, match="NewPeer: socket fd 999 is not usable"):
                await b.request(NewPeer(1, 999, Transport.UDP, ("192.0.2.1", 1194)))
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

    asyncio.run(body())


def test_engine_dies_with_its_parent() -> None:
    """The engine gets PR_SET_PDEATHSIG: killing the control plane kills engine and workers."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    code = (
        "import asyncio, sys, time\n"
        "from pyovpn.datachannel.engine.proxy import EngineDataChannel\n"
        "from pyovpn.datachannel.api import GetPeer\n"
        "async def main():\n"
        "    b = EngineDataChannel(workers=2)\n"
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


# ---------------------------------------------------------------------------- UDP, without offloads


@pytest.mark.netns
def test_udp_engine_without_tun_offloads(lab: Lab) -> None:
    """The plain TUN path (no vnet header) still works, e.g. on kernels that refuse offloads.

    Side b also receives with one ``recvmsg`` per datagram (``recvmmsg=False``): the fallback
    where recvmmsg is missing."""
    a = lab.site(lab.ns_a)
    b = lab.site(lab.ns_b)
    _start_side(a, nslab.TUN_A, nslab.TUN_B, nslab.TUN6_A, tun_offload=False)
    _start_side(b, nslab.TUN_B, nslab.TUN_A, nslab.TUN6_B, tun_offload=False, udp_gro=False, recvmmsg=False)
    sock_a = udp_socket(a, (nslab.VETH_A, nslab.PORT))
    sock_b = udp_socket(b, (nslab.VETH_B, nslab.PORT))
    try:
        a.request(NewPeer(7, sock_a.fileno(), Transport.UDP, (nslab.VETH_B, nslab.PORT)))
        b.request(NewPeer(7, sock_b.fileno(), Transport.UDP, (nslab.VETH_A, nslab.PORT)))
        key0 = os.urandom(256)
        install_key(a, 7, KeySlot.PRIMARY, 0, key0, client=True)
        install_key(b, 7, KeySlot.PRIMARY, 0, key0, client=False)
        assert a.run(ping(nslab.TUN_B, 3)) == 3
        tcp_bulk(a, b, 2 << 20)
    finally:
        sock_a.close()
        sock_b.close()


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
        assert recv_all(rx) == [b"\x20now"]
        assert not w.tun_paused

        # a burst just left: held, in order, and the TUN is not read meanwhile
        w.last_burst = time.monotonic() + 60  # (a burst "now" whose gap cannot run out mid-test)
        w._send_control(peer, b"\x20one")
        w._send_control(peer, b"\x28two")
        w._run_timers()
        assert recv_all(rx) == []
        assert w.tun_paused and w.ep.poll(0) == [], "no data may be read while control waits"
        w.last_burst = time.monotonic()
        assert 0 < w._next_timer() <= _CTL_GAP + 0.002
        time.sleep(w._next_timer())
        w._run_timers()
        assert recv_all(rx) == [b"\x20one", b"\x28two"]
        assert not w.tun_paused and [fd for fd, _ in w.ep.poll(0)] == [tun_r]
        assert time.monotonic() - w.last_burst >= _CTL_GAP

        # a full send buffer (EAGAIN) is retried, never dropped, and data still waits
        w.last_burst = 0.0
        peer.sock = _RefusingSocket(tx, refusals=2)
        w._send_control(peer, b"\x20three")
        w._send_control(peer, b"\x20four")
        assert recv_all(rx) == [] and w.tun_paused
        deadline = time.monotonic() + 2
        while peer.ctl_q and time.monotonic() < deadline:
            time.sleep(max(0.0, w._next_timer()))
            w._run_timers()
        assert recv_all(rx) == [b"\x20three", b"\x20four"]
        assert not w.tun_paused
        st = peer.stats.extra
        assert st["control_tx"] == 5 and st["control_tx_retries"] == 2
        assert "control_tx_dropped" not in st

        # DelPeer (userspace) still lets a held packet (EXIT) leave
        peer.sock = tx
        w.last_burst = time.monotonic()
        w._send_control(peer, b"\x20bye")
        w._del_peer(peer, True)
        assert recv_all(rx) == [b"\x20bye"]
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

    def __init__(self, site: Site, ifname: str) -> None:
        self.log: list[tuple[float, int]] = []  # (seconds, first payload byte) per send
        self.sock = packet_socket(site, ifname, timestamps=True)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

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
            if ip[9] != 17 or struct.unpack_from("!H", ip, ihl + 2)[0] != nslab.PORT:
                continue
            ts = 0.0
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == nslab.SO_TIMESTAMPNS:
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
def test_engine_control_packets_under_saturation(lab: Lab, transport: Transport) -> None:
    """Control packets both ways while bulk data saturates the tunnel: all arrive, in order, fast.

    UDP: no control packet leaves within _CTL_GAP of data (measured on the wire), so a
    receiver whose queue a burst just filled has had time to drain it. TCP: control frames
    overtake queued data frames and the stream stays intact.
    """
    from pyovpn.datachannel.engine.worker import _CTL_GAP

    a = lab.site(lab.ns_a)
    b = lab.site(lab.ns_b)
    _start_side(a, nslab.TUN_A, nslab.TUN_B, nslab.TUN6_A, workers=2)
    _start_side(b, nslab.TUN_B, nslab.TUN_A, nslab.TUN6_B, workers=2)
    conns: list[socket.socket] = []
    try:
        if transport is Transport.UDP:
            sock_a = udp_socket(a, (nslab.VETH_A, nslab.PORT))
            sock_b = udp_socket(b, (nslab.VETH_B, nslab.PORT))
            conns += [sock_a, sock_b]
            a.request(NewPeer(7, sock_a.fileno(), Transport.UDP, (nslab.VETH_B, nslab.PORT)))
            b.request(NewPeer(7, sock_b.fileno(), Transport.UDP, (nslab.VETH_A, nslab.PORT)))
        else:
            listener = tcp_listener(a, (nslab.VETH_A, nslab.PORT))
            conn_b = b.call(lambda: socket.create_connection((nslab.VETH_A, nslab.PORT), timeout=5))
            conn_a, _ = listener.accept()
            conns += [listener, conn_a, conn_b]
            a.request(NewPeer(7, conn_a.fileno(), Transport.TCP))
            b.request(NewPeer(7, conn_b.fileno(), Transport.TCP))
        key0 = os.urandom(256)
        install_key(a, 7, KeySlot.PRIMARY, 0, key0, client=True)
        install_key(b, 7, KeySlot.PRIMARY, 0, key0, client=False)
        assert a.run(ping(nslab.TUN_B, 3)) == 3

        wire = _WireLog(a, lab.veth_a) if transport is Transport.UDP else None
        try:
            lat_ab, lat_ba = _control_both_ways_while_saturated(
                a, b, a_peer=7, b_peer=7, bulk=lambda: tcp_bulk(a, b, 96 << 20)
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


# ---------------------------------------------------------------------------- receive paths
#
# The receive worker takes datagrams with recvmmsg (net/mmsg.py) where it can, and with one
# recvmsg each otherwise. Both must hand the TUN the same packets, drop the same ones and
# report the same floats and control packets, for any mix of senders and packet kinds.


def _worker_messages(w: Any, ours: socket.socket) -> list[Any]:
    """Everything a worker has said on its channel so far (events, control packets).

    The test drives the worker's handlers, not its loop, so it ends the turn here: what the
    worker queued for the controller goes out as the loop would send it.
    """
    from pyovpn.datachannel.engine import wire

    w._flush_chan()
    out = []
    ours.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            batch = wire.recv_all(ours)
            assert batch is not None
            out += [msg for msg, _fds in batch]
    return out


def _rx_run(use_mmsg: bool, datagrams: list[tuple[int, bytes]], key: bytes) -> tuple[Any, ...]:
    from pyovpn.datachannel.api import Cipher
    from pyovpn.datachannel.crypto import DataKey, KeyState
    from pyovpn.datachannel.engine.worker import Worker, _Peer
    from pyovpn.net import mmsg

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    w = Worker(0, theirs, {"recvmmsg": use_mmsg})
    assert w.mmsg_ok == (use_mmsg and mmsg.available())
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    rx.setblocking(False)
    senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    for s in senders:
        s.bind(("127.0.0.1", 0))
    tun_r, tun_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)  # keeps packet boundaries
    tun_w.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    tun_r.setblocking(False)
    try:
        m = {
            "peer_id": 5, "gen": 1, "tx_peer_id": 5, "transport": Transport.UDP.value, "tx": False,
            "rx": True, "gso": False, "gro": False, "mss4": 0, "mss6": 0,
            "send_addr": senders[0].getsockname(), "raw_ip": "127.0.0.1",
            "raw_port": senders[0].getsockname()[1],
        }  # fmt: skip
        peer = _Peer(m, rx, None)
        w.peers[5] = peer
        w.rx_peer = peer
        dk = DataKey(Cipher.AES_256_GCM, key[:32], key[32:40])
        peer.keys[0] = KeyState(0, dk, dk)
        w.tun_fd = tun_w.fileno()
        for who, data in datagrams:
            senders[who].sendto(data, rx.getsockname())
        time.sleep(0.05)
        while True:
            before = peer.stats.link_rx_packets + peer.stats.dropped_other
            w._on_udp(peer)
            if peer.stats.link_rx_packets + peer.stats.dropped_other == before:
                break
        tun = recv_all(tun_r)
        events = [(msg.kind, msg.body) for msg in _worker_messages(w, ours)]
        ports = {s.getsockname()[1]: i for i, s in enumerate(senders)}
        st = peer.stats
        return (
            tun,
            [(k, b.get("ev"), ports.get(b.get("addr", (0, 0))[1])) for k, b in events],
            (st.link_rx_packets, st.vpn_rx_packets, st.dropped_auth, st.dropped_replay, st.dropped_other),
            dict(st.extra),
            ports[peer.raw_port],
        )
    finally:
        for s in (*senders, rx, tun_r, tun_w, ours, theirs):
            s.close()
        w.ep.close()


def test_recvmmsg_and_recvmsg_receive_paths_agree() -> None:
    from pyovpn.datachannel.api import Cipher
    from pyovpn.datachannel.crypto import DataKey, KeyState

    key = os.urandom(40)
    dk = DataKey(Cipher.AES_256_GCM, key[:32], key[32:40])
    tx = KeyState(0, dk, dk)

    def ip_packet(i: int) -> bytes:
        body = os.urandom(20 + i * 37 % 1300)
        return (
            struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(body), i, 0, 64, 17, 0, b"\n\0\0\1", b"\n\0\0\2")
            + body
        )

    plain = [ip_packet(i) for i in range(300)]
    data = [tx.encrypt(p, peer_id=5) for p in plain]
    datagrams: list[tuple[int, bytes]] = [(0, d) for d in data[:100]]
    datagrams += [(0, data[10]), (0, data[11])]  # replays
    datagrams += [(0, b"")]  # empty
    datagrams += [(0, data[100][:30] + bytes(len(data[100]) - 30))]  # fails authentication
    datagrams += [(1, os.urandom(60))]  # a stranger's garbage
    datagrams += [(1, d) for d in data[101:150]]  # the peer floats to sender 1
    datagrams += [(0, d) for d in data[150:300]]  # and back
    a = _rx_run(True, datagrams, key)
    b = _rx_run(False, datagrams, key)
    assert a == b
    tun, events, counts, _extra, final_sender = a
    assert tun == plain[:100] + plain[101:]  # in order; the forged packet 100 is dropped
    assert counts[1] == 299 and counts[2] == 1 and counts[3] == 2
    assert [e[1] for e in events if e[1] == "float"] == ["float", "float"]
    assert final_sender == 0


# ---------------------------------------------------------------------------- multipoint receive
#
# A P2MP server's receiving worker reads one socket for all UDP peers. Whatever the mix of
# senders and packet kinds, each datagram must reach its peer (by peer id, else by address),
# a stranger's control packet must go up as UNDEF_PEER_ID, the reverse-path check must hold,
# and both receive paths must agree.


def _mp_ip_packet(src: str, i: int) -> bytes:
    body = os.urandom(20 + i * 53 % 1200)
    hdr = struct.pack(">BBHHHBBH", 0x45, 0, 20 + len(body), i, 0, 64, 17, 0)
    return hdr + socket.inet_aton(src) + socket.inet_aton("10.0.0.1") + body


def _mp_rx_run(use_mmsg: bool, datagrams: list[tuple[int, bytes]], keys: dict[int, bytes]) -> tuple[Any, ...]:
    from pyovpn.datachannel.api import Cipher
    from pyovpn.datachannel.crypto import DataKey, KeyState
    from pyovpn.datachannel.engine.worker import Worker, _Peer, _SharedRx
    from pyovpn.datachannel.routing import PeerRouter

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    w = Worker(1, theirs, {"recvmmsg": use_mmsg})
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    rx.setblocking(False)
    senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
    for s in senders:
        s.bind(("127.0.0.1", 0))
    tun_r, tun_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    tun_w.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    tun_r.setblocking(False)
    try:
        w.router = PeerRouter()
        shared = _SharedRx((0, 0), rx)
        w.shared[shared.key] = shared
        peers = {}
        for who, (peer_id, vpn) in enumerate(((5, "10.0.0.2"), (6, "10.0.0.3"))):
            m = {
                "peer_id": peer_id, "gen": 1, "tx_peer_id": peer_id, "transport": Transport.UDP.value,
                "tx": False, "rx": True, "gso": False, "gro": False, "mss4": 0, "mss6": 0,
                "send_addr": senders[who].getsockname(), "raw_ip": "127.0.0.1",
                "raw_port": senders[who].getsockname()[1], "vpn4": vpn,
            }  # fmt: skip
            peer = _Peer(m, rx, None)
            key = keys[peer_id]
            dk = DataKey(Cipher.AES_256_GCM, key[:32], key[32:40])
            peer.keys[0] = KeyState(0, dk, dk)
            w.peers[peer_id] = peer
            w.router.add_peer(peer, vpn, None)
            shared.attach(peer)
            peers[peer_id] = peer
        w.tun_fd = tun_w.fileno()
        for who, data in datagrams:
            senders[who].sendto(data, rx.getsockname())
        time.sleep(0.05)
        total = len(datagrams)
        for _ in range(100):
            w._on_shared(shared)
            seen = sum(p.stats.link_rx_packets for p in peers.values()) + w.mp_stats.dropped_other
            if seen >= total - 3:  # the three control packets are not link_rx data
                break
        tun = recv_all(tun_r)
        events = [msg.body for msg in _worker_messages(w, ours)]
        ports = {s.getsockname()[1]: i for i, s in enumerate(senders)}
        by_source: dict[bytes, list[bytes]] = {}
        for pkt in tun:  # the order across clients is the batching's; each client's is fixed
            by_source.setdefault(pkt[12:16], []).append(pkt)
        return (
            by_source,
            sorted((b["ev"], b["peer_id"], ports.get(b["addr"][1]), b.get("packet") or b"") for b in events),
            {
                pid: (p.stats.vpn_rx_packets, p.stats.dropped_auth, dict(p.stats.extra))
                for pid, p in peers.items()
            },
            (w.mp_stats.dropped_other, dict(w.mp_stats.extra)),
            {pid: ports[p.raw_port] for pid, p in peers.items()},
            sorted(ports[port] for _ip, port in shared.by_addr),
        )
    finally:
        for s in (*senders, rx, tun_r, tun_w, ours, theirs):
            s.close()
        w.ep.close()


def test_mp_shared_socket_demultiplexes_on_both_receive_paths() -> None:
    from pyovpn.datachannel.api import Cipher
    from pyovpn.datachannel.crypto import DataKey, KeyState

    keys = {5: os.urandom(40), 6: os.urandom(40)}
    dks = {pid: DataKey(Cipher.AES_256_GCM, k[:32], k[32:40]) for pid, k in keys.items()}
    tx = {pid: KeyState(0, dk, dk) for pid, dk in dks.items()}
    a_plain = [_mp_ip_packet("10.0.0.2", i) for i in range(60)]
    b_plain = [_mp_ip_packet("10.0.0.3", i) for i in range(60)]
    a = [tx[5].encrypt(p, peer_id=5) for p in a_plain]
    b = [tx[6].encrypt(p, peer_id=6) for p in b_plain]
    spoof = tx[6].encrypt(_mp_ip_packet("10.0.0.2", 99), peer_id=6)  # B sends with A's source
    undef_plain = _mp_ip_packet("10.0.0.2", 98)
    undef = tx[5].encrypt(undef_plain, peer_id=UNDEF_PEER_ID)  # A's key, no id: found by address
    datagrams: list[tuple[int, bytes]] = []
    for i in range(40):  # the two clients' datagrams interleave
        datagrams += [(0, a[i]), (1, b[i])]
    datagrams += [(0, undef), (1, spoof)]
    datagrams += [(2, b"\x38hello from a new client" + bytes(40))]  # a stranger's control packet
    datagrams += [(1, b"\x20b's control packet")]  # control from B's address
    datagrams += [(2, b"\x48\x01"), (2, b"\x48\x00\x00\x09" + bytes(40))]  # short, unknown peer id
    datagrams += [(2, a[40][:-1] + bytes([a[40][-1] ^ 1]))]  # A's id from a stranger, forged: no float
    datagrams += [(2, d) for d in a[41:60]]  # A floats to sender 2
    datagrams += [(1, d) for d in b[40:60]]
    one = _mp_rx_run(True, datagrams, keys)
    two = _mp_rx_run(False, datagrams, keys)
    assert one == two
    tun, events, per_peer, iface, remotes, indexed = one
    # each client's packets reach the TUN in order; the forged one and B's spoofed one do not
    assert tun[socket.inet_aton("10.0.0.3")] == b_plain
    assert tun[socket.inet_aton("10.0.0.2")] == [*a_plain[:40], undef_plain, *a_plain[41:]]
    assert ("control", UNDEF_PEER_ID, 2, b"\x38hello from a new client" + bytes(40)) in events
    assert ("control", 6, 1, b"\x20b's control packet") in events
    assert [e[:3] for e in events if e[0] == "float"] == [("float", 5, 2)]
    assert per_peer[6][2].get("rx_dropped_src") == 1
    assert per_peer[5][1] == 1  # the forged packet failed authentication
    assert iface == (2, {"rx_unknown_peer": 2})  # data for no peer is dropped and counted
    assert remotes == {5: 2, 6: 1} and indexed == [1, 2]  # the address index moved with the float


def test_a_failed_control_send_does_not_leave_the_tun_paused() -> None:
    """MP: a held control packet pauses the TUN until no peer has one waiting. A send that fails
    hard (reported to the caller) must not leave its peer counted as waiting, or the TUN would
    stay paused, and the server stop sending to every client, for good."""
    from pyovpn.datachannel.engine.worker import Worker, _Peer

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tun_r, tun_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    w = Worker(0, theirs, {})
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    try:
        w._set_tun({"vnet": False, "mtu": 1500, "read": True, "mp": True}, [os.dup(tun_r.fileno())])
        peers = {}
        for peer_id, addr in ((5, sink.getsockname()), (6, ("127.0.0.1", 0))):  # port 0: EINVAL
            m = {
                "peer_id": peer_id, "gen": 1, "tx_peer_id": peer_id, "transport": Transport.UDP.value,
                "tx": True, "rx": False, "gso": False, "gro": False, "mss4": 0, "mss6": 0,
                "send_addr": addr, "raw_ip": addr[0], "raw_port": addr[1],
            }  # fmt: skip
            peers[peer_id] = w.peers[peer_id] = _Peer(m, sock, None)
        w.last_burst = time.monotonic()  # a data burst just left: control packets wait their gap
        w._send_control(peers[5], b"\x28held")
        assert w.tun_paused and w.ctl_waiting == {peers[5]}
        w.last_burst = 0.0
        with pytest.raises(OSError, match="failed"):
            w._send_control(peers[6], b"\x28fails")
        assert peers[6] not in w.ctl_waiting and w.tun_paused  # A's packet still waits
        time.sleep(0.01)
        w._run_timers()
        assert sink.recv(100) == b"\x28held"
        assert not w.ctl_waiting and not w.tun_paused
    finally:
        w._clear_tun()
        for s in (ours, theirs, tun_r, tun_w, sock, sink):
            s.close()
        w.ep.close()
