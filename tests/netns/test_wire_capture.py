"""What pyovpn's offload engine puts on the wire, checked against a capture and stock OpenVPN.

pyovpn (``userspace-engine multiprocess``, P2P ``tls-client`` in ns a) sends to stock OpenVPN 2.6
(P2P ``tls-server`` in ns b, tls-crypt, AES-256-GCM, 4 MiB socket buffers, no keepalive):
a 5 s TCP iperf3 and a UDP iperf3 with the largest datagram
that fits the path without fragmentation, while ``tcpdump`` records the outer UDP on ns b's
veth. The engine sends UDP GSO trains; ``gso_max_segs 1`` on both veths makes the kernel cut
them before the capture tap, so every record is one packet as it crosses the link.

Checked:

* every outer packet fits what the configuration allows (both ends run OpenVPN 2.6's
  defaults, ``tun-mtu 1500`` and ``mssfix 1492 mtu``, read back from openvpn's verb-4
  option dump): the outer IPv4 packet is the inner packet plus 52 bytes (IPv4 20 + UDP 8 +
  DATA_V2 opcode/peer-id 4 + packet id 4 + AEAD tag 16), the inner packet is at most
  ``tun-mtu``, TCP segments are clamped so the outer packet is at most ``mssfix``, nothing is
  IP-fragmented, and the largest UDP datagrams come out at exactly the computed size;
* openvpn logged no decrypt, authentication or replay error;
* the transfers moved the bytes iperf3 says they did, and openvpn's own counters (SIGUSR2
  statistics) match the capture exactly: "TCP/UDP read bytes" = the UDP payload bytes pyovpn
  sent, "TUN/TAP write bytes" = the decrypted data bytes (each DATA_V2 payload less its 24
  bytes of overhead) — i.e. openvpn decrypted every data packet pyovpn sent.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from pyovpn.tools.pki import Pki
from tests.netns.harness import (
    DEFAULT_PORT,
    OUTER4,
    HarnessError,
    Netns,
    Proc,
    Tunnel,
    TunnelSpec,
    describe_iperf,
    iperf3_transfer,
    start_tunnel,
)

pytestmark = pytest.mark.netns

MB = 1_000_000
TCP_SECONDS = 5
UDP_SECONDS = 3
UDP_RATE = "200M"
VETH_MTU = 1500  # the harness's veth pair
# Outer bytes on top of the inner IP packet, P2P over UDP/IPv4 with an AEAD cipher
IPV4_HEADER, UDP_HEADER = 20, 8
DATA_V2_OVERHEAD = 4 + 4 + 16  # opcode/key-id/peer-id, packet id, AEAD tag
ENCAP = IPV4_HEADER + UDP_HEADER + DATA_V2_OVERHEAD  # 52
# The largest inner packet that crosses the 1500-byte veth unfragmented, and the iperf3 UDP
# payload that makes it: 1500 - 52 = 1448 = 20 (IP) + 8 (UDP) + 1420
UDP_LEN = VETH_MTU - ENCAP - IPV4_HEADER - UDP_HEADER
PING_PAYLOAD = 16  # a keepalive ping's plaintext: consumed by openvpn, not written to its TUN
OPCODE_DATA_V2 = 9
CAPTURE_FILTER = ("udp", "port", str(DEFAULT_PORT))
OPENVPN_BUFFERS = ("sndbuf 4194304", "rcvbuf 4194304")
OPENVPN_ERRORS = re.compile(
    r"AEAD Decrypt error|Authenticate/Decrypt packet error|bad packet ID|PID_ERR|packet replay"
    r"|replay-window backtrack|Packet \(.*\) with invalid|HMAC authentication failed|TLS Error",
    re.I,
)


def _need_tcpdump() -> None:
    if shutil.which("tcpdump") is None:
        pytest.skip("netns wire-capture test skipped: tcpdump is missing (scripts/setup.sh installs it)")


# ------------------------------------------------------------------------------- pcap


@dataclass(frozen=True)
class Pkt:
    ts: float
    src: str
    dst: str
    ip_len: int  # outer IPv4 total length
    fragment: bool  # MF set or a non-zero fragment offset
    udp_payload: int
    opcode: int  # first payload byte >> 3 (9 = P_DATA_V2)


def read_pcap(path: Path) -> list[Pkt]:
    """IPv4/UDP records of an Ethernet pcap (µs or ns timestamps); a torn last record is ignored."""
    data = path.read_bytes()
    if len(data) < 24:
        return []
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        end = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        end = ">"
    else:
        raise AssertionError(f"{path} is not a pcap file (magic {magic.hex()})")
    nano = magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
    linktype = struct.unpack(end + "I", data[20:24])[0]
    assert linktype == 1, f"capture link type {linktype}, want Ethernet (1)"
    rec = struct.Struct(end + "IIII")
    out: list[Pkt] = []
    off = 24
    while off + rec.size <= len(data):
        sec, frac, incl, _orig = rec.unpack_from(data, off)
        off += rec.size
        if off + incl > len(data):
            break
        frame = data[off : off + incl]
        off += incl
        if len(frame) < 14 + 20 + 8 + 1 or frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        if ip[9] != 17:
            continue
        total = struct.unpack(">H", ip[2:4])[0]
        flags_frag = struct.unpack(">H", ip[6:8])[0]
        udp_len = struct.unpack(">H", ip[ihl + 4 : ihl + 6])[0]
        first = ip[ihl + 8] if len(ip) > ihl + 8 else 0
        out.append(
            Pkt(
                ts=sec + frac / (1e9 if nano else 1e6),
                src=".".join(map(str, ip[12:16])),
                dst=".".join(map(str, ip[16:20])),
                ip_len=total,
                fragment=bool(flags_frag & 0x2000) or (flags_frag & 0x1FFF) != 0,
                udp_payload=udp_len - UDP_HEADER,
                opcode=first >> 3,
            )
        )
    return out


# ------------------------------------------------------------------------------- openvpn


def openvpn_option(log: str, name: str) -> int:
    """A numeric option from openvpn's verb-4 option dump (``  tun_mtu = 1500``)."""
    m = re.search(rf"^.*\b{re.escape(name)} = (\d+)\s*$", log, re.M)
    assert m, f"openvpn's option dump has no {name} (is verb >= 4?)"
    return int(m.group(1))


def openvpn_stats(proc: Proc, timeout: float = 10.0) -> dict[str, int]:
    """Ask openvpn for its statistics (SIGUSR2) and parse what it logs.

    ``TUN/TAP read bytes,N`` ... ``TCP/UDP read bytes,N`` ... ``Auth read bytes,N``.
    """
    mark = proc.mark()
    os.kill(proc.pid, signal.SIGUSR2)
    m = proc.wait_for_line(r"Auth read bytes,\d+", timeout, since=mark)
    text = proc.text()[mark : m.end()]
    return {k: int(v) for k, v in re.findall(r"(TUN/TAP \w+ bytes|TCP/UDP \w+ bytes),(\d+)", text)}


def udp_socket_drops(ns: str, port: int) -> int:
    """Datagrams the kernel dropped for the UDP socket bound to ``port`` in ``ns`` (full queue)."""
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "cat", "/proc/net/udp"], capture_output=True, text=True, check=True
    ).stdout
    drops = 0
    for line in out.splitlines()[1:]:
        f = line.split()
        if len(f) >= 13 and int(f[1].split(":")[1], 16) == port:
            drops += int(f[12])
    return drops


# ------------------------------------------------------------------------------- the test


def _fail(msg: str, tunnel: Tunnel, extra: str = "") -> NoReturn:
    pytest.fail(f"{msg}\n{extra}\n{tunnel.logs(40)}", pytrace=False)


def test_offload_engine_wire_sizes_and_openvpn_counters(net: Netns, pki: Pki) -> None:
    _need_tcpdump()
    for ns in (net.a, net.b):
        subprocess.run(["ip", "-n", ns, "link", "set", "veth0", "gso_max_segs", "1"], check=True)
        shown = subprocess.run(
            ["ip", "-d", "-n", ns, "link", "show", "veth0"], capture_output=True, text=True, check=True
        )
        assert "gso_max_segs 1 " in shown.stdout, f"could not turn GSO off on veth0:\n{shown.stdout}"
    pcap = net.workdir / "outer.pcap"
    dump = net.spawn(
        "b",
        ["tcpdump", "-i", "veth0", "-nn", "-U", "-s", "96", "-B", "16384", "-w", str(pcap), *CAPTURE_FILTER],
        "tcpdump",
    )
    dump.wait_for_line(r"listening on veth0", 10)

    # No keepalive: after the transfers nothing but stray IPv6 housekeeping crosses the tunnel,
    # so the capture and openvpn's counters can be compared byte for byte. openvpn gets a 4 MiB
    # receive buffer: with the default (208 KiB here) the engine's GSO bursts overflow it (about
    # 10% of the packets during the TCP transfer), and dropped packets make the comparison a bound.
    spec = TunnelSpec(
        role="p2p",
        cipher="AES-256-GCM",
        wrap="tls-crypt",
        keepalive=None,
        verb=4,
        openvpn_extra=OPENVPN_BUFFERS,
        pyovpn_extra=("userspace-engine multiprocess",),
    )
    tunnel = start_tunnel(net, pki, spec, server_impl="openvpn", client_impl="pyovpn")
    ovpn, py = tunnel.server, tunnel.client
    if "offload engine" not in py.text():
        _fail("pyovpn did not start the offload engine (userspace-engine multiprocess)", tunnel)
    tun_mtu = openvpn_option(ovpn.text(), "tun_mtu")
    mssfix = openvpn_option(ovpn.text(), "mssfix")
    assert "mssfix_encap = ENABLED" in ovpn.text(), "want OpenVPN 2.6's default `mssfix 1492 mtu`"

    windows: dict[str, tuple[float, float]] = {}
    t0 = time.time()
    try:
        tcp = iperf3_transfer(net.a, net.b, tunnel.addrs.server4, seconds=TCP_SECONDS, log_dir=net.workdir)
        windows["tcp"] = (t0, time.time())
        t0 = time.time()
        udp = iperf3_transfer(
            net.a,
            net.b,
            tunnel.addrs.server4,
            seconds=UDP_SECONDS,
            udp_rate=UDP_RATE,
            length=UDP_LEN,
            log_dir=net.workdir,
        )
        windows["udp"] = (t0, time.time())
    except HarnessError as e:
        error = e
    else:
        error = None
    if error is not None:
        _fail(f"iperf3 through the tunnel failed: {error}", tunnel)
    time.sleep(1.0)

    # openvpn's counters against the capture so far; retried while a late packet is in flight
    for _ in range(5):
        drops = udp_socket_drops(net.b, DEFAULT_PORT)
        stats = openvpn_stats(ovpn)
        pkts = read_pcap(pcap)
        from_py = [p for p in pkts if p.src == OUTER4["a"]]
        sent_payload = sum(p.udp_payload for p in from_py)
        data = [p for p in from_py if p.opcode == OPCODE_DATA_V2]
        plain = sum(p.udp_payload - DATA_V2_OVERHEAD for p in data if p.udp_payload != 24 + PING_PAYLOAD)
        if stats.get("TCP/UDP read bytes") == sent_payload and stats.get("TUN/TAP write bytes") == plain:
            break
        time.sleep(0.5)
    counted = f"pyovpn sent {sent_payload} UDP payload bytes, {plain} bytes of data"
    dump_rc = dump.stop()
    m = re.search(r"(\d+) packets dropped by kernel", dump.text())
    cap_drops = int(m.group(1)) if m else -1
    pkts = read_pcap(pcap)
    from_py = [p for p in pkts if p.src == OUTER4["a"]]
    data = [p for p in from_py if p.opcode == OPCODE_DATA_V2]
    summary = (
        f"{counted}; "
        f"tun-mtu {tun_mtu}, mssfix {mssfix} mtu; capture: {len(pkts)} packets ({len(from_py)} from pyovpn, "
        f"{len(data)} DATA_V2), tcpdump exit {dump_rc}, kernel drops {cap_drops}; openvpn stats {stats}; "
        f"openvpn socket drops {drops}\nTCP: {describe_iperf(tcp).splitlines()[0]}\n"
        f"UDP: {udp['udp']}"
    )
    print(summary)

    # 1. the transfers moved what they should
    if tcp["bytes_sent"] < 10 * MB or tcp["bytes_received"] < tcp["bytes_sent"] * 0.9:
        _fail("the TCP transfer moved too little", tunnel, summary)
    u = udp["udp"]
    if u["packets"] - u["lost_packets"] <= 0 or u["bytes_received"] < udp["bytes_sent"] * 0.5:
        _fail("the UDP transfer lost most of its datagrams", tunnel, summary)
    if stats["TUN/TAP write bytes"] < tcp["bytes_received"] + u["bytes_received"]:
        _fail("openvpn wrote fewer bytes to its TUN than iperf3 received", tunnel, summary)

    # 2. wire sizes
    assert cap_drops == 0, f"tcpdump lost packets, the capture is incomplete\n{summary}"
    assert len(data) > 1000, summary
    limit = tun_mtu + ENCAP
    too_big = [p for p in pkts if p.ip_len > limit]
    assert not too_big, f"{len(too_big)} outer packets over tun-mtu + {ENCAP} = {limit}: {too_big[:5]}"
    fragments = [p for p in pkts if p.fragment]
    assert not fragments, f"{len(fragments)} outer packets are IP fragments: {fragments[:5]}"
    over_link = [p for p in pkts if p.ip_len > VETH_MTU]
    assert not over_link, f"{len(over_link)} outer packets over the veth MTU: {over_link[:5]}"
    start, stop = windows["tcp"]
    tcp_phase = [p for p in data if start <= p.ts <= stop]
    over_mss = [p for p in tcp_phase if p.ip_len > mssfix]
    assert tcp_phase, f"no DATA_V2 packets captured during the TCP transfer\n{summary}"
    assert not over_mss, (
        f"{len(over_mss)} packets during the TCP transfer over mssfix {mssfix}: {over_mss[:5]}"
    )
    start, stop = windows["udp"]
    udp_sizes = {p.ip_len for p in data if start <= p.ts <= stop}
    want = IPV4_HEADER + UDP_HEADER + UDP_LEN + ENCAP  # the iperf3 datagram, tunneled
    assert max(udp_sizes, default=0) == want == VETH_MTU, (
        f"{UDP_LEN}-byte UDP datagrams should leave pyovpn as {want}-byte outer packets; "
        f"sizes seen during the UDP transfer: {sorted(udp_sizes)[-5:]}"
    )
    print(f"largest outer packets: TCP phase {max(p.ip_len for p in tcp_phase)}, UDP phase {want}")

    # 3. openvpn decrypted everything: no errors, counters match the capture
    errors = [line for line in ovpn.text().splitlines() if OPENVPN_ERRORS.search(line)]
    if errors:
        _fail(f"openvpn logged {len(errors)} decrypt/replay errors", tunnel, "\n".join(errors[:20]))
    # (the snapshot from the loop above: the final capture may hold a later stray packet)
    if drops == 0:
        assert stats["TCP/UDP read bytes"] == sent_payload, (
            f"openvpn read {stats['TCP/UDP read bytes']} bytes, pyovpn sent {sent_payload}\n{summary}"
        )
        assert stats["TUN/TAP write bytes"] == plain, (
            f"openvpn wrote {stats['TUN/TAP write bytes']} decrypted bytes to its TUN, pyovpn sent "
            f"{plain} bytes of data\n{summary}"
        )
    else:
        # The receive queue overflowed (UDP may do that): the capture is an upper bound.
        assert stats["TCP/UDP read bytes"] <= sent_payload, summary
        assert stats["TUN/TAP write bytes"] <= plain, summary
        assert sent_payload - stats["TCP/UDP read bytes"] <= drops * (VETH_MTU - 28), summary

    codes = tunnel.stop()
    assert codes["client"] == 0, f"pyovpn exited {codes['client']} on SIGTERM\n{tunnel.logs()}"
