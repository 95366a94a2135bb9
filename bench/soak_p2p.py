#!/usr/bin/env python3
"""Soak a pyovpn P2P tunnel: a compressed day of rekeys under traffic. Does anything grow?

Needs root (network namespaces). A pyovpn P2P server (its default userspace engine, so the
engine's controller and workers are sampled too) and a stock OpenVPN 2.6 client, tls-crypt.
The server renegotiates every ``--reneg`` seconds while the client sends an iperf3 UDP stream
at ``--rate`` through the tunnel in 30 s runs, for ``--minutes``. Every 5 s the server's
process tree is sampled (RSS, open descriptors, threads, as bench/soak.py does); after
``--warmup`` minutes a least-squares slope per minute is fitted with its 95 % interval. Also
reports the renegotiations the server completed and the iperf3 loss. ``--smaps`` splits RSS by
mapping; ``--heapwatch OUT`` / ``--heapwatch-malloc OUT`` / ``--heapwatch-gc OUT`` run the server
under bench/heapwatch.py (tracemalloc, the allocators' own counts, or a census of what each full
collection frees), as bench/soak.py does.

    sudo python3 bench/soak_p2p.py --minutes 30 --reneg 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from bench.soak import Sampler, add_soak_options, heapwatch_argv  # noqa: E402
from tests.netns.harness import (  # noqa: E402
    HarnessError,
    Netns,
    Proc,
    TunnelSpec,
    inner_addrs,
    iperf3_transfer,
    spawn_tunnel,
)

from pyovpn.tools.pki import Pki, make_pki  # noqa: E402

REKEYED = re.compile(r"renegotiated data channel key_id")


def _start(net: Netns, pki: Pki, spec: TunnelSpec, args: argparse.Namespace) -> Proc:
    """The pyovpn server (under bench/heapwatch.py if asked) and the stock client, both up."""
    watch = heapwatch_argv(args, net.workdir / "s.conf")
    server, _client = spawn_tunnel(
        net,
        pki,
        spec,
        "pyovpn",
        "openvpn",
        server_extra=f"reneg-sec {args.reneg}\n",
        init_timeout=30 if watch is None else 60,
        server_argv=watch,
        # tracemalloc makes the start (imports) several times slower
        listen_timeout=10 if watch is None else 120,
    )
    return server


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_soak_options(ap, reneg=2)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces)")
    stop = threading.Event()
    udp = {"packets": 0, "lost": 0, "runs": 0}
    spec = TunnelSpec(role="p2p", cipher="AES-256-GCM", wrap="tls-crypt", proto="udp", family=4, verb=3)
    with tempfile.TemporaryDirectory() as td, Netns() as net:
        pki = make_pki(Path(td) / "pki")
        server = _start(net, pki, spec, args)
        target = inner_addrs(spec).server4

        def traffic() -> None:
            while not stop.is_set():
                try:
                    res = iperf3_transfer(net.a, net.b, target, seconds=30, udp_rate=args.rate, length=1300)
                    udp["packets"] += res["udp"]["packets"]
                    udp["lost"] += res["udp"]["lost_packets"]
                    udp["runs"] += 1
                except HarnessError as e:
                    print(f"iperf3: {e}".splitlines()[0], flush=True)
                    time.sleep(1)

        worker = threading.Thread(target=traffic, daemon=True)
        worker.start()
        start = time.monotonic()
        sampler = Sampler(server.pid, args.warmup, with_smaps=args.smaps)
        while (elapsed := time.monotonic() - start) < args.minutes * 60:
            if not server.running():
                print(server.tail(), flush=True)
                raise SystemExit("the pyovpn server exited during the soak")
            rss, fds, threads = sampler.take(elapsed)
            if len(sampler.rows) % 12 == 1:
                rekeys = len(REKEYED.findall(server.text()))
                print(
                    f"{elapsed / 60:5.1f} min: rss {rss:.1f} MiB, fds {fds}, threads {threads}, "
                    f"rekeys {rekeys}"
                )
            time.sleep(5)
        stop.set()
        worker.join(60)
        rekeys = len(REKEYED.findall(server.text()))
    print(
        f"\npyovpn P2P server (engine), {args.minutes:.0f} min, reneg-sec {args.reneg}, "
        f"iperf3 UDP {args.rate}; "
        f"slopes after {args.warmup:.0f} min warm-up"
    )
    loss = 100 * udp["lost"] / udp["packets"] if udp["packets"] else float("nan")
    print(
        f"{rekeys} renegotiations completed; "
        f"{udp['lost']} of {udp['packets']} datagrams lost ({loss:.3f} %)\n"
    )
    sampler.report()
    if args.series:
        Path(args.series).write_text("".join(json.dumps(r) + "\n" for r in sampler.series()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
