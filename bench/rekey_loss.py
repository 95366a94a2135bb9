#!/usr/bin/env python3
"""Rekeys under UDP load: does a key renegotiation lose data?

Needs root (network namespaces). A client and a stock OpenVPN 2.6 server (P2MP, AES-256-GCM,
tls-crypt) carry an iperf3 UDP stream at ``--rate`` from client to server for ``--seconds``.
Each variant runs twice, alternating: once with ``reneg-sec --reneg`` on the client (about
seconds/reneg renegotiations) and once without renegotiation, so loss that the rekeys cause
shows as the difference between the two. Variants: the stock client, and pyovpn's client on
each userspace backend (the multi-process engine and the in-process plane), and inside the
kernel guest pyovpn's client on the kernel ovpn driver. Reports the lost datagrams (iperf3's
receiver count), the rekeys the client logged and the longest stretch with no data.
With ``--tcp`` the stream is one iperf3 TCP stream instead, and the dip a rekey causes shows in
the 1 s intervals: their median, their 10th percentile and the lowest one, with and without
renegotiation.

    sudo python3 bench/rekey_loss.py --seconds 105 --reneg 5 --rate 100M
    sudo python3 bench/rekey_loss.py --seconds 60 --reneg 5 --tcp
    scripts/guest/run.sh -t 900 -- python3 bench/rekey_loss.py --seconds 60 --reneg 5 --rate 10M \
        --variants "stock client" "pyovpn client, kernel"
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from tests.netns.harness import (  # noqa: E402
    INIT_LINE,
    Netns,
    TunnelSpec,
    client_config,
    count_rekeys,
    inner_addrs,
    iperf3_transfer,
    server_config,
    vpn_argv,
    wait_for_lines,
    wait_listening,
)

from pyovpn.tools.pki import make_pki  # noqa: E402

VARIANTS = {
    "stock client": ("openvpn", ()),
    "pyovpn client, engine": ("pyovpn", ("userspace-engine multiprocess",)),
    "pyovpn client, in-process": ("pyovpn", ("userspace-engine inprocess",)),
    # inside the guest of scripts/guest/run.sh (a kernel with the ovpn driver) only
    "pyovpn client, kernel": ("pyovpn", ("dco kernel",)),
}
DEFAULT_VARIANTS = [v for v in VARIANTS if not v.endswith("kernel")]
PYOVPN_REKEY = re.compile(r"renegotiated data channel key_id", re.M)


def rekeys_in(impl: str, log: str) -> int:
    """Completed renegotiations the client logged."""
    return count_rekeys(log) if impl == "openvpn" else len(PYOVPN_REKEY.findall(log))


def one(name: str, reneg: int, pki_dir: Path, rate: str | None, seconds: float) -> dict[str, float]:
    """One run of variant ``name``; UDP at ``rate``, or TCP if ``rate`` is None."""
    impl, pyovpn_extra = VARIANTS[name]
    spec = TunnelSpec(
        role="server",
        cipher="AES-256-GCM",
        wrap="tls-crypt",
        proto="udp",
        family=4,
        verb=4,
        pyovpn_extra=pyovpn_extra,
    )
    pki = make_pki(pki_dir)
    with Netns() as net:
        (net.workdir / "s.conf").write_text(server_config(spec, pki, impl="openvpn", local=net.outer("b", 4)))
        client_conf = client_config(spec, pki, impl=impl, remote=net.outer("b", 4))  # type: ignore[arg-type]
        (net.workdir / "c.conf").write_text(
            client_conf + (f"reneg-sec {reneg}\n" if reneg else "reneg-sec 0\n")
        )
        server = net.spawn("b", vpn_argv("openvpn", net.workdir / "s.conf"), "server-openvpn")
        wait_listening(net.b, "udp", spec.port, proc=server)
        client = net.spawn("a", vpn_argv(impl, net.workdir / "c.conf"), f"client-{impl}")  # type: ignore[arg-type]
        wait_for_lines([server, client], INIT_LINE, 30)
        before = rekeys_in(impl, client.text())
        res = iperf3_transfer(
            net.a,
            net.b,
            inner_addrs(spec).server4,
            seconds=seconds,
            udp_rate=rate,
            length=1300 if rate else None,
        )
        rekeys = rekeys_in(impl, client.text()) - before
    if rate is None:
        # the first second is TCP's slow start, not a rekey
        per_second = sorted(i["bytes"] * 8 / (i["end"] - i["start"]) / 1e6 for i in res["intervals"][1:])
        return {
            "mbits": res["bits_per_second"] / 1e6,
            "median": statistics.median(per_second),
            "p10": per_second[len(per_second) // 10],
            "lowest": per_second[0],
            "rekeys": float(rekeys),
            "max_stall": float(res["max_stall"]),
        }
    udp = res["udp"]
    return {
        "lost": float(udp["lost_packets"]),
        "packets": float(udp["packets"]),
        "lost_percent": float(udp["lost_percent"]),
        "rekeys": float(rekeys),
        "max_stall": float(res["max_stall"]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=105)
    ap.add_argument("--reneg", type=int, default=5, help="reneg-sec of the rekeying runs")
    ap.add_argument("--rate", default="100M", help="iperf3 UDP offered rate")
    ap.add_argument("--tcp", action="store_true", help="one TCP stream instead of UDP: the dips at rekeys")
    ap.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=DEFAULT_VARIANTS,
        help="default: userspace ones",
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces)")
    rows = []
    with tempfile.TemporaryDirectory() as td:
        for i, name in enumerate(args.variants):
            order = [args.reneg, 0] if i % 2 == 0 else [0, args.reneg]
            for reneg in order:
                x = one(name, reneg, Path(td) / f"{i}-{reneg}", None if args.tcp else args.rate, args.seconds)
                rows.append((name, reneg, x))
                print(f"{name}, reneg-sec {reneg or 'off'}: {x}", flush=True)
    if args.tcp:
        print(f"\niperf3 TCP, one stream, client -> stock server for {args.seconds:.0f} s; Mbit/s\n")
        print("| client | renegotiation | rekeys | whole run | 1 s: median | 10th percentile | lowest |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for name, reneg, x in rows:
            print(
                f"| {name} | {f'every {reneg} s' if reneg else 'off'} | {x['rekeys']:.0f} | "
                f"{x['mbits']:.0f} | {x['median']:.0f} | {x['p10']:.0f} | {x['lowest']:.0f} |"
            )
        return 0
    print(f"\niperf3 UDP {args.rate} client -> stock server for {args.seconds:.0f} s\n")
    print("| client | renegotiation | rekeys logged | datagrams lost / sent | loss | longest stall |")
    print("|---|---|---:|---:|---:|---:|")
    for name, reneg, x in rows:
        print(
            f"| {name} | {f'every {reneg} s' if reneg else 'off'} | {x['rekeys']:.0f} | "
            f"{x['lost']:.0f} / {x['packets']:.0f} | {x['lost_percent']:.3f} % | {x['max_stall']:.0f} s |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
