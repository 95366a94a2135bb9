#!/usr/bin/env python3
"""Handshakes over a lossy link: how often and how fast a tunnel comes up at N % loss each way.

Needs root (network namespaces, nftables). For each variant, alternating over ``--tries``, a
P2MP server and one client start in two namespaces whose link drops ``--loss`` percent of the
tunnel's UDP datagrams in each direction (an nftables ``numgen random`` rule on the client's
side, input and output). A try succeeds when the client logs "Initialization Sequence
Completed" within ``--budget`` seconds (default 60: OpenVPN's own `hand-window`). Variants:
stock client and stock server; pyovpn client with a stock server (with its TLS library's
default groups, and with the stock client's classic groups); stock client with a pyovpn
server. Reports successes and the median and worst time to come up.

    sudo python3 bench/lossy.py --loss 30 --tries 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from tests.netns.harness import (  # noqa: E402
    INIT_LINE,
    Netns,
    ProcessDied,
    TunnelSpec,
    WaitTimeout,
    client_config,
    netns_exec,
    server_config,
    vpn_argv,
    wait_listening,
)

from pyovpn.tools.pki import make_pki  # noqa: E402

# pyovpn's TLS library (OpenSSL 3.5 and later) offers a post-quantum hybrid key share by
# default, which makes its ClientHello about 1.5 kB: two control packets where the stock client
# (OpenSSL 3.0 here) needs one. The "classic groups" variant asks for the stock client's groups.
CLASSIC_GROUPS = "tls-groups X25519:prime256v1:X448:secp521r1:secp384r1\n"
VARIANTS = {
    "stock client, stock server": ("openvpn", "openvpn", ""),
    "pyovpn client, stock server": ("pyovpn", "openvpn", ""),
    "pyovpn client (classic TLS groups), stock server": ("pyovpn", "openvpn", CLASSIC_GROUPS),
    "stock client, pyovpn server": ("openvpn", "pyovpn", ""),
}


def lossy_link(ns: str, port: int, loss: int) -> None:
    """Drop ``loss`` % of the tunnel's datagrams each way, on the client's side of the link."""
    rules = f"""
table inet pyovpn_loss {{
    chain in {{ type filter hook input priority 0; udp sport {port} numgen random mod 100 < {loss} drop; }}
    chain out {{ type filter hook output priority 0; udp dport {port} numgen random mod 100 < {loss} drop; }}
}}
"""
    subprocess.run([*netns_exec(ns), "nft", "-f", "-"], input=rules, text=True, check=True)


def one_try(
    client_impl: str, server_impl: str, pki_dir: Path, loss: int, budget: float, client_extra: str = ""
) -> float | None:
    """Seconds until the client is up, or None when it did not come up within ``budget``."""
    spec = TunnelSpec(role="server", cipher="AES-256-GCM", wrap="tls-crypt", proto="udp", family=4, verb=3)
    pki = make_pki(pki_dir)
    with Netns() as net:
        server_conf = server_config(spec, pki, impl=server_impl, local=net.outer("b", 4))  # type: ignore[arg-type]
        (net.workdir / "s.conf").write_text(server_conf)
        client_conf = client_config(spec, pki, impl=client_impl, remote=net.outer("b", 4))  # type: ignore[arg-type]
        (net.workdir / "c.conf").write_text(client_conf + client_extra)
        server = net.spawn("b", vpn_argv(server_impl, net.workdir / "s.conf"), f"server-{server_impl}")  # type: ignore[arg-type]
        wait_listening(net.b, "udp", spec.port, proc=server)
        lossy_link(net.a, spec.port, loss)
        start = time.monotonic()
        client = net.spawn("a", vpn_argv(client_impl, net.workdir / "c.conf"), f"client-{client_impl}")  # type: ignore[arg-type]
        try:
            client.wait_for_line(INIT_LINE, budget)
        except (WaitTimeout, ProcessDied):
            return None
        return time.monotonic() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loss", type=int, default=30, help="percent of datagrams dropped each way")
    ap.add_argument("--tries", type=int, default=20)
    ap.add_argument("--budget", type=float, default=60.0, help="seconds a handshake may take")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces, nftables)")
    times: dict[str, list[float | None]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as td:
        for t in range(args.tries):
            order = list(VARIANTS) if t % 2 == 0 else list(reversed(VARIANTS))
            for name in order:
                client_impl, server_impl, client_extra = VARIANTS[name]
                took = one_try(
                    client_impl,
                    server_impl,
                    Path(td) / f"{t}-{client_impl}-{server_impl}",
                    args.loss,
                    args.budget,
                    client_extra,
                )
                times[name].append(took)
                print(f"try {t + 1} {name}: {f'{took:.1f} s' if took is not None else 'not up'}", flush=True)
    print(f"\n{args.loss} % loss each way, {args.tries} tries, budget {args.budget:.0f} s\n")
    print("| variant | up within budget | median time to up | slowest |")
    print("|---|---:|---:|---:|")
    for name, rows in times.items():
        ok = [x for x in rows if x is not None]
        med = f"{statistics.median(ok):.1f} s" if ok else "-"
        worst = f"{max(ok):.1f} s" if ok else "-"
        print(f"| {name} | {len(ok)}/{len(rows)} | {med} | {worst} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
