#!/usr/bin/env python3
"""Garbage at a P2P server's port: how much of the tunnel survives, and what each datagram costs.

Needs root (network namespaces). For stock OpenVPN 2.6 and pyovpn (its engine, and its
in-process backend) as the P2P UDP server (a stock client on the other end, tls-crypt),
alternating over ``--rounds``: while a sender in the client's namespace fires ``--rate`` random
datagrams per second (random bytes, 20-200 long, from a port that is not the client's) at the
server's port for ``--seconds``, the client pings the server through the tunnel every 50 ms.
Reports the ping loss with and without the flood, the server's CPU time (process and children)
per garbage datagram and its resident memory growth during the flood, medians over rounds.

    sudo python3 bench/garbage.py --rate 20000 --seconds 8 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from bench.throughput import _pids, _tree_cpu  # noqa: E402
from tests.netns.harness import (  # noqa: E402
    INIT_LINE,
    Netns,
    TunnelSpec,
    client_config,
    inner_addrs,
    netns_exec,
    server_config,
    vpn_argv,
    wait_for_lines,
    wait_listening,
)

from pyovpn.tools.pki import make_pki  # noqa: E402

FLOOD = r"""
import os, random, socket, sys, time
host, port, rate, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
pool = [os.urandom(random.randint(20, 200)) for _ in range(4096)]
sent, start = 0, time.monotonic()
while (now := time.monotonic()) - start < seconds:
    due = int((now - start) * rate)
    while sent < due:
        try:
            s.sendto(pool[sent & 4095], (host, port))
        except OSError:
            pass
        sent += 1
    time.sleep(0.001)
print(sent)
"""


def ping_loss(ns: str, addr: str, seconds: float) -> float:
    count = int(seconds / 0.05)
    out = subprocess.run(
        [*netns_exec(ns), "ping", "-n", "-q", "-i", "0.05", "-c", str(count), "-W", "1", addr],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    if not m:
        return 100.0
    tx, rx = int(m.group(1)), int(m.group(2))
    return 100.0 * (tx - rx) / tx if tx else 100.0


def _tree_rss_kib(pid: int) -> int:
    """Resident memory of a process and its descendants, KiB."""
    total = 0
    for p in _pids(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        total += int(m.group(1)) if m else 0
    return total


# the variants: the implementation, and what its server config adds
VARIANTS = {
    "openvpn": ("openvpn", ""),
    "pyovpn": ("pyovpn", ""),  # the multi-process engine, pyovpn's default for P2P
    "pyovpn-inprocess": ("pyovpn", "userspace-engine inprocess\n"),
}
NAMES = {"openvpn": "OpenVPN 2.6", "pyovpn": "pyovpn (engine)", "pyovpn-inprocess": "pyovpn (in-process)"}


def one(variant: str, pki_dir: Path, rate: int, seconds: float) -> dict[str, float]:
    impl, extra = VARIANTS[variant]
    spec = TunnelSpec(role="p2p", cipher="AES-256-GCM", wrap="tls-crypt", proto="udp", family=4, verb=1)
    pki = make_pki(pki_dir)
    with Netns() as net:
        config = server_config(spec, pki, impl=impl, local=net.outer("b", 4))  # type: ignore[arg-type]
        (net.workdir / "s.conf").write_text(config + extra)
        (net.workdir / "c.conf").write_text(
            client_config(spec, pki, impl="openvpn", remote=net.outer("b", 4))
        )
        server = net.spawn("b", vpn_argv(impl, net.workdir / "s.conf"), f"server-{impl}")  # type: ignore[arg-type]
        wait_listening(net.b, "udp", spec.port, proc=server)
        client = net.spawn("a", vpn_argv("openvpn", net.workdir / "c.conf"), "client-openvpn")
        wait_for_lines([server, client], INIT_LINE, 30)
        target = inner_addrs(spec).server4
        quiet = ping_loss(net.a, target, 3)
        cpu0 = _tree_cpu(server.pid)
        rss0 = _tree_rss_kib(server.pid)
        target_args = [net.outer("b", 4), str(spec.port), str(rate), str(seconds)]
        flood = subprocess.Popen(
            [*netns_exec(net.a), sys.executable, "-c", FLOOD, *target_args],
            stdout=subprocess.PIPE,
            text=True,
        )
        loss = ping_loss(net.a, target, seconds - 1)
        sent = int((flood.communicate()[0] or "0").strip() or 0)
        cpu = _tree_cpu(server.pid) - cpu0
        rss1 = _tree_rss_kib(server.pid)
        alive = server.running()
    return {
        "quiet_loss": quiet,
        "flood_loss": loss,
        "sent": sent,
        "us_per_dgram": 1e6 * cpu / sent if sent else float("nan"),
        "alive": 1.0 if alive else 0.0,
        "rss_growth_kib": float(rss1 - rss0),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=int, default=20000)
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces)")
    res: dict[str, list[dict[str, float]]] = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory() as td:
        for r in range(args.rounds):
            order = args.variants if r % 2 == 0 else args.variants[::-1]
            for variant in order:
                x = one(variant, Path(td) / f"{variant}{r}", args.rate, args.seconds)
                res[variant].append(x)
                print(f"round {r + 1} {variant}: {x}", flush=True)
    print(f"\n{args.rate} garbage datagrams/s for {args.seconds:.0f} s, medians of {args.rounds} rounds\n")
    print(
        "| server | ping loss, quiet | ping loss, flood | server CPU µs per garbage datagram "
        "(min-max) | RSS growth during the flood, KiB | running |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for variant, rows in res.items():
        med = {k: statistics.median(x[k] for x in rows) for k in rows[0]}
        us = [x["us_per_dgram"] for x in rows]
        print(
            f"| {NAMES[variant]} | {med['quiet_loss']:.1f} % | {med['flood_loss']:.1f} % | "
            f"{med['us_per_dgram']:.1f} ({min(us):.1f}-{max(us):.1f}) | {med['rss_growth_kib']:+.0f} | "
            f"{sum(x['alive'] for x in rows):.0f}/{len(rows)} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
