"""Hostile traffic at a pyovpn server while a stock OpenVPN client uses the tunnel.

From the client's namespace, but from other source ports, an attacker sends:
- the client's own data packets again (captured on the client's link): replays, which must not
  move the client's address to the attacker's port (a float needs a packet that authenticates
  *and* is new) nor disturb the tunnel;
- well-formed DATA_V2 packets for peer ids that do not exist and for the client's peer id with
  random contents (forgeries);
- a thousand half-open handshakes (hard resets from as many ports), which the server answers
  statelessly (HMAC cookie): none of them becomes a client session;
- oversized control messages (up to 60,000 bytes, so the IP layer fragments them) and
  control messages at the link's size, which the control-channel wrap must reject.
Throughout, the client pings the server through the tunnel; afterwards the server still lists
the one client at its real address. The same attack at a P2P server (both userspace planes), and
a P2MP server at its `max-clients` limit under half-open handshakes.
"""

from __future__ import annotations

import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyovpn.tools.pki import Pki
from tests.netns.harness import (
    INIT_LINE,
    Netns,
    Star,
    TunnelSpec,
    inner_addrs,
    netns_exec,
    ping,
    spawn_tunnel,
    vm_rss_kib,
    wait_for_lines,
    wait_listening,
)
from tests.netns.test_server import CLIENTS, SERVER4, client_conf, server_conf

pytestmark = pytest.mark.netns

SPEC = TunnelSpec(role="server", cipher="AES-256-GCM", wrap="tls-crypt", proto="udp", family=4, verb=4)
DATA_V2 = 9


def _udp_payloads_from_pcap(path: Path, dport: int) -> list[bytes]:
    """The UDP payloads to ``dport`` in a pcap of an Ethernet link (tcpdump -w)."""
    data = path.read_bytes()
    magic = struct.unpack_from("<I", data)[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    off, out = 24, []
    while off + 16 <= len(data):
        incl = struct.unpack_from(endian + "IIII", data, off)[2]
        frame = data[off + 16 : off + 16 + incl]
        off += 16 + incl
        if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
            continue
        ihl = (frame[14] & 0x0F) * 4
        udp = 14 + ihl
        if struct.unpack_from("!H", frame, udp + 2)[0] == dport:
            out.append(frame[udp + 8 :])
    return out


ATTACK = r"""
import os, random, socket, sys
host, port, replay_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
blob = open(replay_file, "rb").read()
replays, pos = [], 0
while pos < len(blob):
    n = int.from_bytes(blob[pos:pos + 2], "big"); replays.append(blob[pos + 2:pos + 2 + n]); pos += 2 + n
peer_id = int.from_bytes(replays[0][1:4], "big")
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sent = 0
for round in range(20):
    for pkt in replays:                                 # replays of the client's own packets
        s.sendto(pkt, (host, port)); sent += 1
    for _ in range(200):                                # DATA_V2 for unknown and known peer ids
        pid = random.choice([peer_id, random.randrange(1 << 24)])
        head = (0x48 | random.randrange(8)).to_bytes(1, "big") + pid.to_bytes(3, "big")
        body = head + os.urandom(random.randint(20, 1400))
        s.sendto(body, (host, port)); sent += 1
for _ in range(100):                                    # oversized: IP-fragmented, up to 60 kB
    body = bytes([(4 << 3) | random.randrange(8)]) + os.urandom(random.randint(1600, 60000))
    s.sendto(body, (host, port)); sent += 1
for _ in range(300):                                    # control messages at the link's size
    body = bytes([(4 << 3) | random.randrange(8)]) + os.urandom(random.randint(1200, 1471))
    s.sendto(body, (host, port)); sent += 1
for _ in range(1000):                                   # half-open handshakes from 1000 ports
    h = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    h.sendto(bytes([7 << 3]) + os.urandom(8) + b"\x00" + os.urandom(40), (host, port))
    h.close(); sent += 1
print(sent)
"""


# what the attack may cost a P2MP server's memory: a few sessions' worth, never one per datagram
RSS_BOUND_KIB = 8 * 1024


def _client_rows(status: str) -> list[str]:
    return [line for line in status.splitlines() if line.startswith("CLIENT_LIST,")]


def _capture_replays(net: Netns, inner: str) -> Path:
    """Capture the client's data packets while it pings, then start the attacker on them."""
    pcap = net.workdir / "client.pcap"
    dump = subprocess.Popen(
        [
            *netns_exec(net.a),
            "tcpdump",
            "-i",
            "veth0",
            "-U",
            "-w",
            str(pcap),
            "udp",
            "dst",
            "port",
            str(SPEC.port),
        ],
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1)
    assert ping(net.a, inner, count=30, timeout=40).ok
    dump.terminate()
    dump.wait(10)
    data_packets = [p for p in _udp_payloads_from_pcap(pcap, SPEC.port) if p and p[0] >> 3 == DATA_V2]
    assert len(data_packets) >= 10, f"captured only {len(data_packets)} data packets"
    replay_file = net.workdir / "replays.bin"
    replay_file.write_bytes(b"".join(len(p).to_bytes(2, "big") + p for p in data_packets))
    return replay_file


@pytest.mark.parametrize("engine", ["multiprocess", "inprocess"])
def test_p2p_server_under_replays_forgeries_and_resets_keeps_its_peer(
    net: Netns, pki: Pki, engine: str
) -> None:
    """The same attack at a P2P server (either userspace plane): the peer stays where it is, the
    tunnel keeps working, and the stranger filter drops most of it in the kernel."""
    spec = TunnelSpec(
        role="p2p",
        cipher="AES-256-GCM",
        wrap="tls-crypt",
        proto="udp",
        family=4,
        verb=4,
        pyovpn_extra=(f"userspace-engine {engine}",),
    )
    server, client = spawn_tunnel(net, pki, spec, "pyovpn", "openvpn", init_timeout=30)
    inner = inner_addrs(spec).server4
    assert ping(net.a, inner).ok
    replay_file = _capture_replays(net, inner)
    drops_before = _udp_socket_drops(net.b, spec.port)
    mark = server.mark()
    attacker = subprocess.Popen(
        [
            *netns_exec(net.a),
            sys.executable,
            "-c",
            ATTACK,
            net.outer("b", 4),
            str(spec.port),
            str(replay_file),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    during = ping(net.a, inner, count=30, timeout=40)
    sent = int((attacker.communicate(timeout=120)[0] or "0").strip())
    assert sent > 1000 + 20 * 200 + 400
    assert during.ok and during.received >= 30, during.output
    assert server.running() and client.running()
    log = server.text()[mark:]
    assert not re.search(r"(?i)floated", log), "a replayed or forged packet moved the peer"
    assert not re.search(r"Initialization Sequence Completed", log), "a forged reset restarted the session"
    # the forgeries with random peer ids and most of the resets never reached the process
    assert _udp_socket_drops(net.b, spec.port) - drops_before > 1000
    assert ping(net.a, inner, count=5).ok


def _udp_socket_drops(ns: str, port: int) -> int:
    """The kernel's drop count of the UDP socket bound to ``port`` in ``ns`` (/proc/net/udp)."""
    rows = subprocess.run([*netns_exec(ns), "cat", "/proc/net/udp"], capture_output=True, text=True).stdout
    total = 0
    for row in rows.splitlines()[1:]:
        fields = row.split()
        if int(fields[1].split(":")[1], 16) == port:
            total += int(fields[-1])
    return total


def test_replays_forgeries_and_half_open_handshakes_change_nothing(net: Netns, pki: Pki) -> None:
    status = net.workdir / "status.log"
    server, client = spawn_tunnel(
        net, pki, SPEC, "pyovpn", "openvpn", server_extra=f"status {status} 1\nstatus-version 2\n"
    )
    wait_for_lines([server, client], INIT_LINE, 30)
    server_addr = net.outer("b", 4)
    inner = "10.77.0.1"
    assert ping(net.a, inner).ok

    replay_file = _capture_replays(net, inner)

    time.sleep(2)  # a status rewrite after the capture
    before = _client_rows(status.read_text())
    assert len(before) == 1, status.read_text()
    real_address = before[0].split(",")[2]
    mark = server.mark()
    rss_before = vm_rss_kib(server.pid)

    attacker = subprocess.Popen(
        [*netns_exec(net.a), sys.executable, "-c", ATTACK, server_addr, str(SPEC.port), str(replay_file)],
        stdout=subprocess.PIPE,
        text=True,
    )
    during = ping(net.a, inner, count=30, timeout=40)
    sent = int((attacker.communicate(timeout=120)[0] or "0").strip())
    assert sent > 1000 + 20 * 200 + 400
    assert during.ok and during.received >= 30, during.output
    rss_after = vm_rss_kib(server.pid)
    print(f"\nP2MP server VmRSS: {rss_before} KiB before {sent} attack datagrams, {rss_after} KiB after")
    assert rss_after - rss_before < RSS_BOUND_KIB, f"the server grew {rss_after - rss_before} KiB"

    time.sleep(12)  # status interval (10 s default) plus a margin
    assert server.running(), server.tail()
    after = _client_rows(status.read_text())
    assert len(after) == 1, status.read_text()
    assert after[0].split(",")[2] == real_address, "a replayed or forged packet moved the client"
    assert ping(net.a, inner, count=5).ok
    log = server.text()[mark:]
    assert not re.search(r"new client session", log), "a half-open handshake became a client session"
    assert not re.search(r"(?i)float", log), log[-3000:]


def test_max_clients_reached_under_half_open_handshakes(tmp_path: Path, pki: Pki) -> None:
    """max-clients 2: two stock clients get in, a third waits; a thousand half-open handshakes take
    no slot; when one client leaves, the waiting one gets in and the others keep their tunnels."""
    with Star(tmp_path, 3, base=240) as star:
        conf = server_conf(pki, star.workdir, client_to_client=False, extra="max-clients 2")
        server = star.spawn(star.server, [sys.executable, "-m", "pyovpn", "--config", str(conf)], "server")
        wait_listening(star.server, "udp", 1194, proc=server)
        clients = []
        for i, (cn, cipher) in enumerate(CLIENTS):
            cconf = client_conf(pki, star.workdir, cn, star.server_addr(i), cipher)
            clients.append(star.spawn(star.peers[i], ["openvpn", "--config", str(cconf)], f"client-{cn}"))
            if i < 2:
                wait_for_lines([clients[i]], INIT_LINE, 40)
        server.wait_for_line("max-clients reached", 20)
        resets = (
            "import os, socket, sys\n"
            "for _ in range(1000):\n"
            "    h = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "    h.sendto(bytes([7 << 3]) + os.urandom(8) + bytes(1) + os.urandom(40), (sys.argv[1], 1194))\n"
            "    h.close()\n"
        )
        subprocess.run(
            [*netns_exec(star.peers[2]), sys.executable, "-c", resets, star.server_addr(2)], check=True
        )
        for i in range(2):
            assert ping(star.peers[i], SERVER4, count=5).ok, f"client {i} lost its tunnel"
        assert INIT_LINE not in clients[2].text(), "a third client got in past max-clients 2"
        clients[0].stop()  # explicit-exit-notify: its slot is free at once
        wait_for_lines([clients[2]], INIT_LINE, 60)
        assert ping(star.peers[2], SERVER4, count=3).ok
        assert ping(star.peers[1], SERVER4, count=3).ok
        assert server.running()
