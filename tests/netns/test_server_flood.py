"""Control-packet flood against the pyovpn P2MP server: bounded memory, no sessions for forged packets.

Layout (one namespace per role, each joined to the server namespace ``s`` by its own veth,
172.31.(230+i).1 on the server side, .2 on the other)::

    c0  a stock ``openvpn`` client        -> 172.31.230.1
    c1  one ``pyovpn.tools.loadgen`` client -> 172.31.231.1
    c2  the flood sender (this module run as ``python -m tests.netns.test_server_flood``)
                                           -> 172.31.232.1

The sender is an insider: it holds the tls-crypt key and a client certificate, so its forged
packets pass the control-channel wrap and exercise the stateless cookie check itself. It first
"captures" a real handshake start (its own reset, the server's cookie reply and the client
packet that ACKs the cookie, which it never sends from the address the cookie is bound to),
then sends at most ``--count`` packets within ``--deadline`` seconds, round-robin over
``--sockets`` source ports: forged resets with random session ids (wrapped and unwrapped),
random garbage and DATA_V2 packets, forged cookie ACKs, and replays of the captured reset,
cookie ACK and cookie reply from other source ports. Meanwhile the two real clients connect
and pass traffic. Every packet goes to addresses inside the namespaces this test created.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyovpn.proto.session import Session, SessionConfig
from pyovpn.tools.pki import Pki
from tests.netns import harness
from tests.netns.harness import INIT_LINE, Star, ping, vm_rss_kib, wait_for_lines, wait_listening

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]
PORT = 1194
SERVER_TUN4 = "10.79.0.1"
FLOOD_COUNT = int(os.environ.get("PYOVPN_FLOOD_COUNT", "100000"))
# packets per second; 100k packets take 20 s. PYOVPN_FLOOD_RATE overrides it (e.g. 50000 to saturate)
FLOOD_RATE = float(os.environ.get("PYOVPN_FLOOD_RATE", "5000"))
FLOOD_DEADLINE = 60.0
RSS_BOUND_KIB = 8 * 1024
REAL_CLIENTS = 2  # the stock openvpn client and the loadgen client
SESSION_LINE = "new client session"


# ---------------------------------------------------------------------------- topology


@pytest.fixture
def star(tmp_path: Path) -> Iterator[Star]:
    with Star(tmp_path, 3, base=230, cwd=ROOT) as s:
        yield s


# ---------------------------------------------------------------------------- configs


def server_conf(pki: Pki, workdir: Path) -> Path:
    conf = workdir / "server.conf"
    conf.write_text(
        harness.p2mp_server_config(pki, "10.79.0.0", "duplicate-cn", "dco userspace", "verb 4", port=PORT)
    )
    return conf


def client_conf(pki: Pki, workdir: Path, name: str, remote: str, *, openvpn: bool) -> Path:
    conf = workdir / f"{name}.conf"
    extra = ["verb 4", *(["disable-dco", "explicit-exit-notify 1"] if openvpn else [])]
    conf.write_text(
        harness.p2mp_client_config(pki, remote, pki.client_crt, pki.client_key, *extra, port=PORT)
    )
    return conf


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def udp_counters(ns: str) -> dict[str, int]:
    """The Udp: line of /proc/net/snmp inside ``ns`` (InDatagrams, RcvbufErrors...)."""
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"], capture_output=True, text=True, check=True
    ).stdout
    rows = [line.split()[1:] for line in out.splitlines() if line.startswith("Udp:")]
    return {k: int(v) for k, v in zip(rows[0], rows[1], strict=True)}


# ---------------------------------------------------------------------------- the sender


def _capture(cfg: SessionConfig, server: tuple[str, int]) -> tuple[bytes, bytes, list[bytes]]:
    """A real handshake start: our reset, the server's cookie reply, our packets ACKing the cookie."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(server)
    sock.settimeout(2.0)
    try:
        sess = Session(cfg, rng=os.urandom, now=time.time())
        sess.handle_timer(time.time())
        reset = sess.packets_to_send()[0]
        for _ in range(10):
            sock.send(reset)
            try:
                reply = sock.recv(65535)
                break
            except TimeoutError:
                continue
        else:
            raise SystemExit("flood sender: no cookie reply from the server")
        sess.receive(reply, time.time())
        proof = sess.packets_to_send()  # never sent from this address: no session is created
        if not proof:
            raise SystemExit("flood sender: the session produced no packet after the cookie reply")
        return reset, reply, proof
    finally:
        sock.close()


def flood(
    server: tuple[str, int], config: str, *, count: int, rate: float, deadline: float, sockets: int
) -> dict[str, object]:
    """Send at most ``count`` forged/replayed packets within ``deadline`` s at about ``rate`` pps."""
    from pyovpn.config import parse_args
    from pyovpn.daemon import session_config
    from pyovpn.proto.packets import Opcode, ReliabilityHeader
    from pyovpn.proto.tlswrap import TlsCrypt

    opts = parse_args(["--config", config])
    cfg = session_config(opts)
    assert cfg.tls_crypt_key is not None, "the sender config needs tls-crypt"
    reset, cookie_reply, proof = _capture(cfg, server)
    wrap = TlsCrypt(cfg.tls_crypt_key, is_server=False)
    socks = []
    for _ in range(sockets):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.connect(server)
        socks.append(s)
    rnd = random.Random(1234)

    def forged_reset() -> bytes:
        rh = ReliabilityHeader((), None, 0, b"")
        return wrap.wrap(Opcode.CONTROL_HARD_RESET_CLIENT_V2, 0, os.urandom(8), rh, int(time.time()))

    def unwrapped_reset() -> bytes:
        return bytes([Opcode.CONTROL_HARD_RESET_CLIENT_V2 << 3]) + os.urandom(rnd.randint(14, 80))

    def garbage() -> bytes:
        return os.urandom(rnd.randint(1, 1400))

    def data_v2() -> bytes:
        peer = rnd.choice([0, 1, 2, rnd.randrange(1 << 24)])
        return (
            bytes([(9 << 3) | rnd.randrange(8)]) + peer.to_bytes(3, "big") + os.urandom(rnd.randint(4, 300))
        )

    def forged_ack() -> bytes:
        # a wrapped ACK (or ClientHello) of a cookie we never got: the cookie is a random guess
        if rnd.random() < 0.5:
            rh = ReliabilityHeader((0,), os.urandom(8), None, b"")
            return wrap.wrap(Opcode.ACK_V1, 0, os.urandom(8), rh, int(time.time()))
        rh = ReliabilityHeader((0,), os.urandom(8), 1, os.urandom(200))
        return wrap.wrap(Opcode.CONTROL_V1, 0, os.urandom(8), rh, int(time.time()))

    kinds = {
        "forged_reset": forged_reset,
        "unwrapped_reset": unwrapped_reset,
        "garbage": garbage,
        "data_v2": data_v2,
        "forged_cookie_ack": forged_ack,
        "replayed_reset": lambda: reset,
        "replayed_cookie_ack": lambda: rnd.choice(proof),
        "replayed_cookie_reply": lambda: cookie_reply,
    }
    names = list(kinds)
    sent = dict.fromkeys(names, 0)
    replies = 0
    send_errors = 0
    print("FLOOD START", flush=True)
    t0 = time.monotonic()
    i = 0
    while i < count and time.monotonic() - t0 < deadline:
        batch_end = min(count, i + 100)
        while i < batch_end:
            name = names[i % len(names)]
            try:
                socks[i % len(socks)].send(kinds[name]())
                sent[name] += 1
            except OSError:
                send_errors += 1
            i += 1
        # drain the replies (cookie replies to our forged resets), counting them
        if i % 2000 == 0:
            for s in socks:
                with contextlib.suppress(OSError):
                    while s.recv(65535):
                        replies += 1
            print(f"FLOOD PROGRESS {i}", flush=True)
        ahead = i / rate - (time.monotonic() - t0)
        if ahead > 0:
            time.sleep(ahead)
    elapsed = time.monotonic() - t0
    time.sleep(0.5)
    for s in socks:
        with contextlib.suppress(OSError):
            while s.recv(65535):
                replies += 1
        s.close()
    return {
        "packets": sum(sent.values()),
        "seconds": round(elapsed, 2),
        "by_kind": sent,
        "send_errors": send_errors,
        "server_replies": replies,
        "source_ports": sockets,
    }


def sender_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="control-packet flood sender (netns tests only)")
    ap.add_argument("--server", required=True, help="HOST:PORT (an address inside the test's namespaces)")
    ap.add_argument("--config", required=True, help="a client config with the tls-crypt key")
    ap.add_argument("--count", type=int, default=FLOOD_COUNT)
    ap.add_argument("--rate", type=float, default=FLOOD_RATE)
    ap.add_argument("--deadline", type=float, default=FLOOD_DEADLINE)
    ap.add_argument("--sockets", type=int, default=256)
    args = ap.parse_args(argv)
    host, _, port = args.server.rpartition(":")
    stats = flood(
        (host, int(port)),
        args.config,
        count=args.count,
        rate=args.rate,
        deadline=args.deadline,
        sockets=args.sockets,
    )
    print("FLOOD DONE " + json.dumps(stats), flush=True)
    return 0


# ---------------------------------------------------------------------------- the test


def test_control_flood_costs_no_sessions_and_bounded_memory(star: Star, pki: Pki) -> None:
    conf = server_conf(pki, star.workdir)
    server = star.spawn(star.server, [sys.executable, "-m", "pyovpn", "--config", str(conf)], "server-pyovpn")
    wait_listening(star.server, "udp", PORT, proc=server)
    time.sleep(1.0)
    rss_before = vm_rss_kib(server.pid)
    udp_before = udp_counters(star.server)
    cpu_before = cpu_seconds(server.pid)

    sender_conf = client_conf(pki, star.workdir, "sender", star.server_addr(2), openvpn=False)
    sender = star.spawn(
        star.peers[2],
        [
            sys.executable,
            "-m",
            "tests.netns.test_server_flood",
            "--server",
            f"{star.server_addr(2)}:{PORT}",
            "--config",
            str(sender_conf),
            "--rate",
            str(FLOOD_RATE),
            "--count",
            str(FLOOD_COUNT),
        ],
        "flood-sender",
    )
    sender.wait_for_line(r"FLOOD PROGRESS", 30)  # the flood is under way
    flood_started = time.monotonic()

    ovpn_conf = client_conf(pki, star.workdir, "openvpn-client", star.server_addr(0), openvpn=True)
    ovpn = star.spawn(star.peers[0], ["openvpn", "--config", str(ovpn_conf)], "client-openvpn")
    lg_conf = client_conf(pki, star.workdir, "loadgen-client", star.server_addr(1), openvpn=False)
    loadgen = star.spawn(
        star.peers[1],
        [sys.executable, "-m", "pyovpn.tools.loadgen", "--config", str(lg_conf), "-n", "1", "--hold", "inf"],
        "client-loadgen",
    )
    wait_for_lines([ovpn], INIT_LINE, 45)
    lg_settled = loadgen.wait_for_line(r"LOADGEN SETTLED (\{.*\})\n", 45)
    connected_after = time.monotonic() - flood_started
    lg_up = json.loads(lg_settled.group(1))
    ping_during = ping(star.peers[0], SERVER_TUN4, count=3, timeout=15)
    flood_running_at_ping = "FLOOD DONE" not in sender.text()

    done = sender.wait_for_line(r"FLOOD DONE (\{.*\})\n", FLOOD_DEADLINE + 30)
    stats = json.loads(done.group(1))
    time.sleep(2.0)  # let the server work through what is still queued
    rss_after = vm_rss_kib(server.pid)
    udp_after = udp_counters(star.server)
    cpu_used = cpu_seconds(server.pid) - cpu_before
    ping_after = ping(star.peers[0], SERVER_TUN4, count=3, timeout=10)
    loadgen.stop(timeout=15)
    lg_result = json.loads(re.findall(r"LOADGEN RESULT (\{.*\})\n", loadgen.text())[-1])
    server_log = server.text()
    sessions = server_log.count(SESSION_LINE)
    growth = rss_after - rss_before
    udp_drops = udp_after["RcvbufErrors"] - udp_before["RcvbufErrors"]
    udp_in = udp_after["InDatagrams"] - udp_before["InDatagrams"]

    print(
        f"\nflood: {stats['packets']} packets in {stats['seconds']} s from {stats['source_ports']} ports "
        f"({json.dumps(stats['by_kind'])}), {stats['server_replies']} server replies received by the sender"
        f"\nserver namespace UDP: {udp_in} datagrams delivered, {udp_drops} dropped (socket buffer full)"
        f"\nserver CPU {cpu_used:.1f} s over the flood"
        f"\nserver VmRSS: {rss_before} KiB before, {rss_after} KiB after, growth {growth} KiB"
        f" (bound {RSS_BOUND_KIB} KiB)"
        f"\nsessions created ('{SESSION_LINE}'): {sessions}, real clients: {REAL_CLIENTS}"
        f"\nreal clients connected {connected_after:.1f} s into the flood; loadgen connect "
        f"{lg_up['connect_max']:.3f} s; ping during the flood "
        f"{ping_during.received}/{ping_during.transmitted}"
        f" (flood still running: {flood_running_at_ping}), after {ping_after.received}"
        f"/{ping_after.transmitted}; loadgen pings sent {lg_result['pings_sent']}, data received "
        f"{lg_result['data_received']}"
    )
    assert stats["packets"] == FLOOD_COUNT or stats["seconds"] >= FLOOD_DEADLINE - 1, stats
    assert flood_running_at_ping, (
        f"the real clients connected only after the flood ended ({connected_after:.1f} s)\n{server.tail()}"
    )
    assert lg_up["connected"] == 1, lg_up
    assert ping_during.ok, ping_during.output
    assert ping_after.ok, ping_after.output
    assert lg_result["pings_sent"] > 0 and lg_result["closed_after_up"] == 0, lg_result
    assert sessions == REAL_CLIENTS, f"{sessions} sessions for {REAL_CLIENTS} real clients\n{server.tail(80)}"
    assert growth < RSS_BOUND_KIB, f"server RSS grew {growth} KiB during the flood"
    assert server.running(), server.tail()


if __name__ == "__main__":
    raise SystemExit(sender_main())
