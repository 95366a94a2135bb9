"""Tests for the kernel ``ovpn`` backend (:mod:`pyovpn.datachannel.kernel`).

What every backend must do (peers, keys, control packets, float, keepalive, TCP framing,
tunnels between two namespaces) is the contract suite, tests/contract, which runs on this
backend in the guest too; here is what only the kernel backend has: the ovpn link, stale
links, kernel error details, notifications of other interfaces, backend selection, and
the differential test against the userspace backend.

They need root and a kernel with the ``ovpn`` generic-netlink family (Linux >= 6.16 with
the module); otherwise every test skips and says why. On machines without the driver,
run them in the guest VM (kernel 7.3, see /work/shared/reference/kernel-vm):

    PYTHONPATH=<checkout>/src python3 -m pytest -p no:cacheprovider tests/kernel -v

Every test works in private network namespaces (deleted afterwards, also on failure),
each side being a thread that has ``setns()``-ed into its namespace and runs its own
asyncio loop; worker threads started from there inherit the namespace.

The differential test puts the kernel backend in namespace A and the userspace backend
in namespace B, pings across, and compares the DATA_V2 packets captured on A's veth
(AF_PACKET) byte for byte with what pyovpn's own AEAD code produces for the same key,
nonce tail and packet id, for all three ciphers and both directions; then it feeds the
same inner IP packet to both encrypters under the same key and requires identical wire
bytes.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest
from tests import nslab
from tests.nslab import (
    Lab,
    Site,
    checksum,
    keydir,
    open_lab,
    packet_socket,
    ping,
    tcp_listener,
    tcp_pair,
    udp_socket,
)

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
    KeySlot,
    NewIface,
    NewKey,
    NewPeer,
    Notification,
    PeerDeleted,
    PeerDelReason,
    SendControl,
    SetPeer,
    SwapKeys,
    Transport,
)
from pyovpn.datachannel.crypto import KeyState
from pyovpn.errors import BackendError
from pyovpn.proto.packets import UNDEF_PEER_ID

PACKET_HOST, PACKET_OUTGOING = 0, 4
ROUTED_NET = "10.201.0.0"  # routed into the tunnel on both sides; nobody owns it
CIPHERS = [Cipher.AES_128_GCM, Cipher.AES_256_GCM, Cipher.CHACHA20_POLY1305]
P_CONTROL_V1 = 4 << 3  # any non-data opcode: the kernel passes it up the socket

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- availability


_STATUS: tuple[bool, str] | None = None


def _ovpn_status() -> tuple[bool, str]:
    global _STATUS
    if _STATUS is None:
        if os.geteuid() != 0:
            _STATUS = (False, "needs root (network namespaces, CAP_NET_ADMIN)")
        elif shutil.which("ip") is None:
            _STATUS = (False, "needs the iproute2 'ip' command")
        else:
            from pyovpn.datachannel.choice import kernel_ovpn_status

            _STATUS = kernel_ovpn_status()
    return _STATUS


@pytest.fixture(autouse=True)
def _require_ovpn() -> None:
    ok, why = _ovpn_status()
    if not ok:
        print(f"skipping kernel ovpn backend tests: {why}")
        pytest.skip(f"kernel ovpn driver unavailable: {why}")


# ---------------------------------------------------------------------------- namespaces


@pytest.fixture
def lab() -> Iterator[Lab]:
    # generous timeouts: the guest is emulated (TCG) and slow when the host is busy
    with open_lab(Lab("k", "pk", no_ipv6=True, timeout=60, note_timeout=15)) as lab:
        yield lab


@pytest.fixture
def one(lab: Lab) -> Site:
    """A single namespace with a kernel backend subscribed to ``site.notes``."""
    from pyovpn.datachannel.kernel import KernelDataChannel

    lab.add_ns(lab.ns_a)
    site = lab.site(lab.ns_a)
    site.backend = KernelDataChannel()
    site.backend.subscribe(site.notes.append)
    return site


def _link(site: Site, name: str) -> dict[str, Any] | None:
    """kind, IFLA_OVPN_MODE, mtu and flags of a link, via pyroute2 in the namespace."""

    def work() -> dict[str, Any] | None:
        from pyroute2 import IPRoute

        from pyovpn.datachannel.kernel import rtnl as kernel

        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=name)
            if not idx:
                return None
            (msg,) = tuple(ipr.get_links(idx[0]))
            return {
                "index": idx[0],
                "kind": kernel._link_kind(ipr, idx[0]),
                "mode": kernel._link_mode(ipr, idx[0]),
                "mtu": msg.get_attr("IFLA_MTU"),
                "up": bool(msg["flags"] & 1),
            }

    return site.sync(work)


def _start_p2p(site: Site, name: str = "ovk0", mode: IfaceMode = IfaceMode.P2P) -> str:
    site.request(NewIface(name, mode, 1400))
    assert site.backend.ifname == name
    return name


# ---------------------------------------------------------------------------- link


def test_link_p2p_mp_and_pattern(one: Site) -> None:
    from pyovpn.datachannel.kernel import KernelDataChannel

    one.request(NewIface("ovk0", IfaceMode.P2P, 1400))
    info = _link(one, "ovk0")
    assert info is not None and info["kind"] == "ovpn" and info["mtu"] == 1400 and info["up"]
    assert info["mode"] in (None, 0)  # reported by kernels that fill IFLA_INFO_DATA
    with pytest.raises(BackendError, match="already drives ovk0"):
        one.request(NewIface("ovk1"))
    one.request(DelIface("ovk0"))
    assert _link(one, "ovk0") is None
    with pytest.raises(BackendError, match="DelIface: no interface"):
        one.request(DelIface("ovk0"))

    one.request(NewIface("ovk1", IfaceMode.MP, 1500))
    info = _link(one, "ovk1")
    assert info is not None and info["kind"] == "ovpn" and info["mtu"] == 1500
    assert info["mode"] in (None, 1)
    one.run(one.backend.close())
    assert _link(one, "ovk1") is None  # close() removes the interface, like closing a TUN

    # "tun" lets the backend pick a free tunN, like the userspace backend
    b = KernelDataChannel()
    one.run(b.request(NewIface("tun", IfaceMode.P2P, 1400)))
    try:
        assert b.ifname is not None and b.ifname.startswith("tun")
        assert _link(one, b.ifname)["kind"] == "ovpn"  # type: ignore[index]
    finally:
        one.run(b.close())

    # an existing non-ovpn link of that name is reported, never touched
    one.sync(lambda: subprocess.run(["ip", "link", "add", "ovkdummy", "type", "dummy"], check=True))
    c = KernelDataChannel()
    with pytest.raises(BackendError, match="not an ovpn device"):
        one.run(c.request(NewIface("ovkdummy")))
    one.run(c.close())
    assert _link(one, "ovkdummy")["kind"] == "dummy"  # type: ignore[index]
    with pytest.raises(BackendError, match="MTU"):
        one.run(KernelDataChannel().request(NewIface("ovk2", IfaceMode.P2P, 10)))


def test_stale_cleanup(one: Site) -> None:
    from pyovpn.datachannel.kernel.rtnl import cleanup_stale_iface

    def add(name: str, kind: str) -> None:
        subprocess.run(["ip", "link", "add", name, "type", kind], check=True, capture_output=True)

    one.sync(lambda: add("ovkstale", "ovpn"))
    one.sync(lambda: add("ovkother", "dummy"))
    assert one.sync(lambda: cleanup_stale_iface("ovkother")) is False
    assert _link(one, "ovkother") is not None
    assert one.sync(lambda: cleanup_stale_iface("nosuchlink")) is False
    # from a thread with a running loop too (the work moves to a helper thread)
    assert one.call(lambda: cleanup_stale_iface("ovkstale")) is True
    assert _link(one, "ovkstale") is None

    # a link with a peer is in use: kept unless forced
    _start_p2p(one, "ovkbusy")
    sock = udp_socket(one)
    one.request(NewPeer(1, sock.fileno(), Transport.UDP, ("127.0.0.1", 9)))
    assert one.sync(lambda: cleanup_stale_iface("ovkbusy")) is False
    assert _link(one, "ovkbusy") is not None
    assert one.sync(lambda: cleanup_stale_iface("ovkbusy", force=True)) is True
    one.wait_note(lambda n: n == PeerDeleted(1, PeerDelReason.TEARDOWN))
    sock.close()


def test_killed_process_leaves_a_stale_link_without_peers(one: Site) -> None:
    """What cleanup_stale_iface is for: a SIGKILLed run leaves the link, the kernel drops the peer."""
    from pyovpn.datachannel.kernel import KernelDataChannel
    from pyovpn.datachannel.kernel.rtnl import cleanup_stale_iface

    child = textwrap.dedent(
        """
        import asyncio, socket, sys, time
        from pyovpn.datachannel.api import NewIface, NewPeer, Transport
        from pyovpn.datachannel.kernel import KernelDataChannel
        async def main():
            b = KernelDataChannel()
            await b.request(NewIface("ovkkill"))
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            await b.request(NewPeer(3, s.fileno(), Transport.UDP, ("127.0.0.1", 9)))
            print("ready", flush=True)
            await asyncio.sleep(60)
        asyncio.run(main())
        """
    )
    proc = subprocess.Popen(
        ["ip", "netns", "exec", one.netns, sys.executable, "-c", child],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        index = _link(one, "ovkkill")["index"]  # type: ignore[index]
        assert len(one.sync(lambda: _peers(index))) == 1
        proc.send_signal(signal.SIGKILL)
        proc.wait(20)
        assert _link(one, "ovkkill") is not None
        deadline = time.monotonic() + 10
        while one.sync(lambda: _peers(index)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert one.sync(lambda: _peers(index)) == []
        with pytest.raises(BackendError, match="already exists"):
            one.run(KernelDataChannel().request(NewIface("ovkkill")))
        assert one.sync(lambda: cleanup_stale_iface("ovkkill")) is True
        b = KernelDataChannel()
        one.run(b.request(NewIface("ovkkill")))
        one.run(b.close())
    finally:
        if proc.poll() is None:
            proc.kill()


def _peers(index: int) -> list[Any]:
    from pyovpn.datachannel.kernel.genl import OvpnNetlink

    with OvpnNetlink() as genl:
        genl.bind()
        return genl.peers(index)


# ---------------------------------------------------------------------------- peers


def test_mp_mode_peers_and_control_dispatch(one: Site) -> None:
    _start_p2p(one, "ovkmp", IfaceMode.MP)
    sock = udp_socket(one)
    port = sock.getsockname()[1]
    c1, c2, stranger = udp_socket(one), udp_socket(one), udp_socket(one)
    r1, r2 = c1.getsockname(), c2.getsockname()
    one.request(NewPeer(1, sock.fileno(), Transport.UDP, r1, vpn_ipv4="10.8.0.2"))
    one.request(NewPeer(2, sock.fileno(), Transport.UDP, r2, vpn_ipv4="10.8.0.3", vpn_ipv6="fd00::3"))
    assert one.request(GetPeer(1)).remote == r1
    assert one.request(GetPeer(2)).remote == r2
    with pytest.raises(BackendError, match=r"PEER_NEW.*VPN IP"):
        one.request(NewPeer(3, sock.fileno(), Transport.UDP, r2))
    with pytest.raises(BackendError, match="PEER_NEW"):
        one.request(NewPeer(1, sock.fileno(), Transport.UDP, r1, vpn_ipv4="10.8.0.9"))  # duplicate id
    for s, tag in ((c1, b"one"), (c2, b"two"), (stranger, b"who")):
        s.sendto(bytes([P_CONTROL_V1]) + tag, ("127.0.0.1", port))
    one.wait_note(lambda n: n == ControlPacket(1, bytes([P_CONTROL_V1]) + b"one", r1))
    one.wait_note(lambda n: n == ControlPacket(2, bytes([P_CONTROL_V1]) + b"two", r2))
    one.wait_note(
        lambda n: isinstance(n, ControlPacket) and n.peer_id == UNDEF_PEER_ID and n.packet.endswith(b"who")
    )
    one.request(SendControl(2, b"\x20hello"))
    c2.settimeout(5)
    assert c2.recvfrom(100) == (b"\x20hello", ("127.0.0.1", port))
    one.request(DelPeer(1))
    one.wait_note(lambda n: n == PeerDeleted(1, PeerDelReason.USERSPACE))
    assert one.request(GetPeer(2)).peer_id == 2
    for s in (sock, c1, c2, stranger):
        s.close()


def test_kernel_errors_name_command_and_attribute(one: Site) -> None:
    _start_p2p(one)
    sock = udp_socket(one)
    fd = sock.fileno()
    # an unknown peer: the kernel's answer is named along with the command
    with pytest.raises(BackendError, match=r"GetPeer: unknown peer id 5 \(kernel PEER_GET"):
        one.request(GetPeer(5))
    a128 = Cipher.AES_128_GCM
    with pytest.raises(BackendError, match=r"NewKey: unknown peer id 4 \(kernel KEY_NEW"):
        one.request(NewKey(4, KeySlot.PRIMARY, 1, a128, keydir(a128), keydir(a128)))
    with pytest.raises(BackendError) as exc:
        one.request(NewPeer(0x1000000, fd, Transport.UDP, ("127.0.0.2", 1194)))
    msg = str(exc.value)
    print("bad peer id ->", msg)
    assert msg.startswith("NewPeer:") and "PEER_NEW" in msg and "OVPN_A_PEER_ID" in msg
    with pytest.raises(BackendError) as exc:
        one.request(NewPeer(1, fd, Transport.UDP, ("127.0.0.2", 1194), None, None, None, 100000, 100000))
    print("keepalive too big ->", exc.value)
    # the keepalive goes in a PEER_SET after PEER_NEW (the driver races otherwise); refused, it takes
    # the new peer with it
    assert "PEER_SET" in str(exc.value) and "KEEPALIVE_INTERVAL" in str(exc.value)
    with pytest.raises(BackendError, match=r"GetPeer: unknown peer id 1 \(kernel PEER_GET"):
        one.request(GetPeer(1))
    with pytest.raises(BackendError, match=r"SetPeer: unknown peer id 3 \(kernel PEER_SET.*ENOENT"):
        one.request(SetPeer(3, keepalive_interval=1, keepalive_timeout=5))
    with pytest.raises(BackendError, match="UDP peer needs a remote"):
        one.request(NewPeer(1, fd, Transport.UDP))
    with pytest.raises(BackendError, match="not allowed in P2P"):
        one.request(NewPeer(1, fd, Transport.UDP, ("127.0.0.2", 1194), vpn_ipv4="10.0.0.2"))
    with pytest.raises(BackendError, match="not a TCP socket"):
        one.request(NewPeer(1, fd, Transport.TCP))
    with pytest.raises(BackendError, match="not usable"):
        one.request(NewPeer(1, 9999, Transport.UDP, ("127.0.0.2", 1194)))
    with pytest.raises(BackendError, match="frame boundary"):
        one.request(NewPeer(1, fd, Transport.TCP, tcp_backlog=b"\x00"))
    with pytest.raises(BackendError, match="SendControl: unknown peer id 1"):
        one.request(SendControl(1, b"x"))
    sock.close()


def test_ipv6_transport_and_local_ip(one: Site) -> None:
    _start_p2p(one)

    def udp6() -> socket.socket:
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.bind(("::1", 0))
        return s

    def dual() -> socket.socket:
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", 0))
        return s

    subprocess.run(
        ["ip", "netns", "exec", one.netns, "sysctl", "-q", "-w", "net.ipv6.conf.lo.disable_ipv6=0"],
        capture_output=True,
        timeout=30,
    )
    sock, far = one.call(udp6), one.call(udp6)
    port = sock.getsockname()[1]
    far_addr = far.getsockname()[:2]
    one.request(NewPeer(2, sock.fileno(), Transport.UDP, far_addr, local_ip="::1"))
    assert one.request(GetPeer(2)).remote == far_addr
    far.sendto(bytes([P_CONTROL_V1]) + b"six", ("::1", port))
    one.wait_note(lambda n: n == ControlPacket(2, bytes([P_CONTROL_V1]) + b"six", far_addr))
    one.request(SendControl(2, b"\x28six-back"))
    far.settimeout(5)
    assert far.recvfrom(100)[0] == b"\x28six-back"
    # an IPv4 peer on a dual-stack socket: addresses are reported without the ::ffff: prefix
    sock4, far4 = one.call(dual), udp_socket(one)
    port4 = sock4.getsockname()[1]
    one.request(
        NewPeer(3, sock4.fileno(), Transport.UDP, ("::ffff:" + far4.getsockname()[0], far4.getsockname()[1]))
    )
    one.wait_note(lambda n: n == PeerDeleted(2, PeerDelReason.TEARDOWN))
    assert one.request(GetPeer(3)).remote == far4.getsockname()
    far4.sendto(bytes([P_CONTROL_V1]) + b"four", ("127.0.0.1", port4))
    one.wait_note(lambda n: n == ControlPacket(3, bytes([P_CONTROL_V1]) + b"four", far4.getsockname()))
    one.request(SendControl(3, b"\x28four-back"))
    far4.settimeout(5)
    assert far4.recvfrom(100)[0] == b"\x28four-back"
    with pytest.raises(BackendError, match="differ in address family"):
        one.request(NewPeer(4, sock4.fileno(), Transport.UDP, far4.getsockname(), local_ip="::1"))
    for s in (sock, far, sock4, far4):
        s.close()


def test_tcp_short_frame_drops_the_peer(one: Site) -> None:
    _start_p2p(one)
    # a frame too short to hold an opcode word makes the kernel drop the peer itself
    server, client = tcp_pair(one)
    one.request(NewPeer(5, client.fileno(), Transport.TCP))
    server.sendall(b"\x00\x02" + bytes([P_CONTROL_V1]) + b"x")
    one.wait_note(lambda n: n == PeerDeleted(5, PeerDelReason.TRANSPORT_ERROR))
    with pytest.raises(BackendError, match="unknown peer id 5"):
        one.request(GetPeer(5))
    client.close()
    server.close()


def test_notifications_of_other_interfaces_are_ignored(lab: Lab) -> None:
    from pyovpn.datachannel.kernel import KernelDataChannel

    lab.add_ns(lab.ns_a)
    site = lab.site(lab.ns_a)
    b1, b2 = KernelDataChannel(), KernelDataChannel()
    n1: list[Notification] = []
    n2: list[Notification] = []
    b1.subscribe(n1.append)
    b2.subscribe(n2.append)
    try:
        site.run(b1.request(NewIface("ovkx1")))
        site.run(b2.request(NewIface("ovkx2")))
        s1, s2 = udp_socket(site), udp_socket(site)
        site.run(b1.request(NewPeer(1, s1.fileno(), Transport.UDP, ("127.0.0.1", 9))))
        site.run(b2.request(NewPeer(1, s2.fileno(), Transport.UDP, ("127.0.0.1", 9))))
        site.run(b1.request(DelPeer(1)))
        time.sleep(0.5)
        assert n1 == [PeerDeleted(1, PeerDelReason.USERSPACE)] and n2 == []
        assert site.run(b2.request(GetPeer(1))).peer_id == 1
    finally:
        site.run(b1.close())
        site.run(b2.close())


def test_select_picks_the_kernel_backend(one: Site, caplog: pytest.LogCaptureFixture) -> None:
    from pyovpn.datachannel.choice import open_backend
    from pyovpn.datachannel.kernel import KernelDataChannel

    caplog.set_level(logging.INFO, logger="pyovpn")
    assert isinstance(one.run(open_backend("auto")), KernelDataChannel)
    assert "DCO: using the kernel ovpn driver (generic netlink family 'ovpn' found" in caplog.text
    assert isinstance(one.run(open_backend("kernel")), KernelDataChannel)
    # userspace: the offload engine by default (P2P and P2MP), the in-process backend on request
    assert type(one.run(open_backend("userspace"))).__name__ == "EngineDataChannel"
    assert type(one.run(open_backend("userspace", engine="inprocess"))).__name__ == "UserspaceDataChannel"


def test_missing_cap_net_admin_is_reported(one: Site) -> None:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("needs util-linux setpriv to drop CAP_NET_ADMIN")
    child = textwrap.dedent(
        """
        import asyncio
        from pyovpn.datachannel.choice import kernel_ovpn_status
        from pyovpn.datachannel.api import NewIface
        from pyovpn.datachannel.kernel import KernelDataChannel
        print(kernel_ovpn_status())
        async def main():
            try:
                await KernelDataChannel().request(NewIface("ovkcap"))
            except Exception as e:
                print(type(e).__name__, e)
        asyncio.run(main())
        """
    )
    res = subprocess.run(
        [
            "ip", "netns", "exec", one.netns,
            setpriv, "--inh-caps=-net_admin", "--bounding-set=-net_admin",
            sys.executable, "-c", child,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    print(res.stdout, res.stderr)
    assert "(False," in res.stdout and "CAP_NET_ADMIN" in res.stdout
    assert "BackendError NewIface" in res.stdout and "CAP_NET_ADMIN" in res.stdout.splitlines()[-1]


# ---------------------------------------------------------------------------- differential


def _ipv4_udp(src: str, dst: str, sport: int, dport: int, payload: bytes, ident: int) -> bytes:
    """A complete IPv4/UDP packet with valid checksums (sent verbatim via IPPROTO_RAW)."""
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    ulen = 8 + len(payload)
    udp = struct.pack("!HHHH", sport, dport, ulen, 0) + payload
    ucsum = checksum(s + d + struct.pack("!BBH", 0, 17, ulen) + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", ucsum) + udp[8:]
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, ident, 0x4000, 64, 17, 0, s, d)
    hdr = hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]
    return hdr + udp


async def _ping(dst: str, count: int = 2, timeout: float = 3.0) -> int:
    return await ping(dst, count, timeout, size=32)


class Capture:
    """AF_PACKET capture of the tunnel's UDP datagrams on one veth (inside a site's namespace)."""

    def __init__(self, site: Site, ifname: str) -> None:
        self.sock = packet_socket(site, ifname, timeout=0)

    def take(self, settle: float = 0.5) -> list[tuple[str, bytes]]:
        """[(out|in, UDP payload)] for port-1194 datagrams since the last call."""
        time.sleep(settle)
        out: list[tuple[str, bytes]] = []
        while True:
            try:
                frame, addr = self.sock.recvfrom(65535)
            except BlockingIOError:
                return out
            if len(frame) < 14 + 20 + 8 or frame[12:14] != b"\x08\x00":
                continue
            ip = frame[14:]
            ihl = (ip[0] & 0x0F) * 4
            if ip[9] != 17:
                continue
            sport, dport, ulen = struct.unpack_from("!HHH", ip, ihl)
            if nslab.PORT not in (sport, dport):
                continue
            direction = "out" if addr[2] == PACKET_OUTGOING else "in"
            out.append((direction, bytes(ip[ihl + 8 : ihl + ulen])))

    def close(self) -> None:
        self.sock.close()


def _data_v2(packets: list[tuple[str, bytes]], direction: str, key_id: int) -> list[bytes]:
    return [p for d, p in packets if d == direction and p and p[0] == (9 << 3) | key_id]


def _reencrypt_check(pkt: bytes, key_id: int, cipher: Cipher, key: KeyDirection, peer_id: int) -> bytes:
    """Decrypt a captured packet with pyovpn's AEAD code and re-encrypt it with the same pid."""
    ref = KeyState.from_directions(key_id, cipher, key, key)
    plain = ref.decrypt(pkt)
    pid = struct.unpack_from(">I", pkt, 4)[0]
    ref.tx_packet_id = pid - 1
    again = ref.encrypt(plain, peer_id)
    assert again == pkt, f"{cipher.value} pid {pid}: re-encryption differs"
    return plain


def _kernel_and_userspace(lab: Lab) -> tuple[Site, Site]:
    """Kernel backend in namespace A, userspace backend in B, each with its P2P interface up."""
    from pyovpn.datachannel.kernel import KernelDataChannel
    from pyovpn.datachannel.userspace import UserspaceDataChannel
    from pyovpn.net import tun

    lab.pair()
    a, b = lab.site(lab.ns_a), lab.site(lab.ns_b)
    a.backend, b.backend = KernelDataChannel(), UserspaceDataChannel()
    a.backend.subscribe(a.notes.append)
    b.backend.subscribe(b.notes.append)
    a.request(NewIface("ovkA", IfaceMode.P2P, 1400))
    b.request(NewIface("tun", IfaceMode.P2P, 1400))
    for site, local, peer in ((a, nslab.TUN_A, nslab.TUN_B), (b, nslab.TUN_B, nslab.TUN_A)):
        name = site.backend.ifname

        def configure(name: str = name, local: str = local, peer: str = peer) -> None:
            tun.add_address(name, local, 32, peer=peer)
            tun.add_route(name, ROUTED_NET, 24)

        site.sync(configure)
    return a, b


@pytest.fixture
def pair(lab: Lab) -> Iterator[tuple[Site, Site, int]]:
    """The two backends of :func:`_kernel_and_userspace` joined by one P2P UDP tunnel (no keys yet)."""
    a, b = _kernel_and_userspace(lab)
    sock_a = udp_socket(a, (nslab.VETH_A, nslab.PORT))
    sock_b = udp_socket(b, (nslab.VETH_B, nslab.PORT))
    peer_id = 0x12345
    a.request(NewPeer(peer_id, sock_a.fileno(), Transport.UDP, (nslab.VETH_B, nslab.PORT)))
    b.request(NewPeer(peer_id, sock_b.fileno(), Transport.UDP, (nslab.VETH_A, nslab.PORT)))
    try:
        yield a, b, peer_id
    finally:
        sock_a.close()
        sock_b.close()


def test_differential_kernel_vs_userspace(lab: Lab, pair: tuple[Site, Site, int]) -> None:
    a, b, peer_id = pair
    cap = Capture(a, lab.veth_a)
    listen_a = udp_socket(a, (nslab.TUN_A, 5555))
    listen_b = udp_socket(b, (nslab.TUN_B, 5555))
    listen_a.settimeout(10)
    listen_b.settimeout(10)
    summary = []
    try:
        for n, cipher in enumerate(CIPHERS):
            # 1. normal asymmetric keys: a ping each way and a known datagram each way
            kid = n
            k_ab, k_ba = keydir(cipher), keydir(cipher)
            a.request(NewKey(peer_id, KeySlot.PRIMARY, kid, cipher, k_ab, k_ba))
            b.request(NewKey(peer_id, KeySlot.PRIMARY, kid, cipher, k_ba, k_ab))
            cap.take(0)
            assert a.run(_ping(nslab.TUN_B)) == 2, f"{cipher.value}: kernel -> userspace ping failed"
            assert b.run(_ping(nslab.TUN_A)) == 2, f"{cipher.value}: userspace -> kernel ping failed"
            mark_a = f"from-kernel-{cipher.value}".encode()
            mark_b = f"from-userspace-{cipher.value}".encode()
            a.call(lambda m=mark_a: listen_a.sendto(m, (nslab.TUN_B, 5555)))
            assert listen_b.recvfrom(100)[0] == mark_a  # the userspace backend decrypted the kernel
            b.call(lambda m=mark_b: listen_b.sendto(m, (nslab.TUN_A, 5555)))
            assert listen_a.recvfrom(100)[0] == mark_b  # the kernel decrypted the userspace backend
            packets = cap.take()
            k_out, u_in = _data_v2(packets, "out", kid), _data_v2(packets, "in", kid)
            # A sent 2 echo requests, 2 echo replies and the datagram; so did B
            for name, pkts, key, mark in (("kernel", k_out, k_ab, mark_a), ("userspace", u_in, k_ba, mark_b)):
                assert len(pkts) == 5, f"{cipher.value} {name}: {len(pkts)} DATA_V2 packets"
                pids = [struct.unpack_from(">I", p, 4)[0] for p in pkts]
                assert pids == [1, 2, 3, 4, 5], f"{cipher.value} {name}: pids {pids}"
                assert all(p[1:4] == peer_id.to_bytes(3, "big") for p in pkts)
                plains = [_reencrypt_check(p, kid, cipher, key, peer_id) for p in pkts]
                assert any(pl.endswith(mark) for pl in plains)

            # 2. the same key both ways and the same inner packet: identical wire bytes
            kid2 = 4 + n
            same = keydir(cipher)
            a.request(NewKey(peer_id, KeySlot.PRIMARY, kid2, cipher, same, same))
            b.request(NewKey(peer_id, KeySlot.PRIMARY, kid2, cipher, same, same))
            inner = _ipv4_udp("10.99.0.77", "10.201.0.9", 4000, 4001, b"differential " * 20, 0x4242)

            def send_raw(pkt: bytes = inner) -> None:
                with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as s:
                    s.sendto(pkt, ("10.201.0.9", 0))

            cap.take(0)
            a.call(send_raw)
            b.call(send_raw)
            packets = cap.take()
            (k_pkt,) = _data_v2(packets, "out", kid2)
            (u_pkt,) = _data_v2(packets, "in", kid2)
            assert struct.unpack_from(">I", k_pkt, 4)[0] == 1
            assert k_pkt == u_pkt, f"{cipher.value}: kernel and userspace DATA_V2 differ for the same input"
            assert _reencrypt_check(k_pkt, kid2, cipher, same, peer_id) == inner
            summary.append(f"{cipher.value}: 5+5 packets re-encrypt identically; same-key packet identical")
        info = a.request(GetPeer(peer_id))
        assert info.vpn_tx_packets >= 15 and info.vpn_rx_packets >= 15 and info.link_rx_packets >= 18
        print("\n".join(summary))
    finally:
        cap.close()
        listen_a.close()
        listen_b.close()

    # keepalive 1/3 on the kernel side; the userspace side never answers pings: EXPIRED
    c = Cipher.AES_256_GCM
    a.request(NewKey(peer_id, KeySlot.PRIMARY, 0, c, keydir(c), keydir(c)))
    a.request(SetPeer(peer_id, keepalive_interval=1, keepalive_timeout=3))
    a.wait_note(lambda n: n == PeerDeleted(peer_id, PeerDelReason.EXPIRED), timeout=15)


def test_differential_tcp_and_rekey(lab: Lab) -> None:
    """Kernel and userspace backends over TCP: pings across, then a rekey via the secondary slot."""
    a, b = _kernel_and_userspace(lab)

    lsock = tcp_listener(b, (nslab.VETH_B, nslab.PORT))
    conn_a = a.call(lambda: socket.create_connection((nslab.VETH_B, nslab.PORT)))
    conn_b, _ = lsock.accept()
    lsock.close()
    try:
        a.request(NewPeer(3, conn_a.fileno(), Transport.TCP))
        b.request(NewPeer(3, conn_b.fileno(), Transport.TCP))
        c = Cipher.AES_256_GCM
        k1, k2 = keydir(c), keydir(c)
        a.request(NewKey(3, KeySlot.PRIMARY, 0, c, k1, k2))
        b.request(NewKey(3, KeySlot.PRIMARY, 0, c, k2, k1))
        assert a.run(_ping(nslab.TUN_B, 3)) == 3
        assert b.run(_ping(nslab.TUN_A, 3)) == 3
        # control packets interleave with the kernel's data frames on the same stream
        a.request(SendControl(3, bytes([P_CONTROL_V1]) + b"k2u"))
        b.request(SendControl(3, bytes([P_CONTROL_V1]) + b"u2k"))
        b.wait_note(lambda n: n == ControlPacket(3, bytes([P_CONTROL_V1]) + b"k2u", None))
        a.wait_note(lambda n: n == ControlPacket(3, bytes([P_CONTROL_V1]) + b"u2k", None))
        # rekey: new key in the secondary slot on both, swap, old one deleted
        k3, k4 = keydir(c), keydir(c)
        a.request(NewKey(3, KeySlot.SECONDARY, 1, c, k3, k4))
        b.request(NewKey(3, KeySlot.SECONDARY, 1, c, k4, k3))
        a.request(SwapKeys(3))
        b.request(SwapKeys(3))
        a.request(DelKey(3, KeySlot.SECONDARY))
        b.request(DelKey(3, KeySlot.SECONDARY))
        assert a.request(GetKey(3, KeySlot.PRIMARY)).key_id == 1
        assert a.run(_ping(nslab.TUN_B, 2)) == 2
        a.request(DelPeer(3))
        a.wait_note(lambda n: n == PeerDeleted(3, PeerDelReason.USERSPACE))
        # the kernel let go of the socket: it is a plain TCP stream again
        conn_a.sendall(b"\x00\x03" + bytes([P_CONTROL_V1]) + b"ok")
        b.wait_note(lambda n: n == ControlPacket(3, bytes([P_CONTROL_V1]) + b"ok", None))
    finally:
        conn_a.close()
        conn_b.close()
