#!/usr/bin/env python3
"""Network faults other than plain loss: stock OpenVPN and pyovpn side by side.

Needs root (network namespaces). A P2MP server (tls-crypt, UDP) in namespace b and one client in
namespace a. For the relayed faults the client talks to bench/faultrelay.py in its own namespace,
which forwards to the server with the fault applied both ways: loss (5 %, 15 %), reordering (a
quarter of the datagrams held back 20 ms), duplication (a fifth sent twice) and 200 ms delay with
±50 ms jitter. For "link down 20 s" the client talks to the server directly and the veth goes
down for 20 s once the tunnel is up. Variants (alternating, ``--tries`` each): stock client and
server; pyovpn client with a stock server; stock client with a pyovpn server.

Figures per fault and variant: tunnels up within 60 s and the median time to up; the share of
30 pings through the tunnel answered; whether the client completed a renegotiation
(``reneg-sec 8``) within 25 s of coming up; and, for the link outage, how long after the link
came back the tunnel carried pings again (keepalive 10/60 keeps the session through it).

    sudo python3 bench/faults.py --tries 2
"""

from __future__ import annotations

import argparse
import os
import re
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
    inner_addrs,
    netns_exec,
    server_config,
    vpn_argv,
    wait_listening,
)

from pyovpn.tools.pki import make_pki  # noqa: E402

VARIANTS = {
    "stock client, stock server": ("openvpn", "openvpn"),
    "pyovpn client, stock server": ("pyovpn", "openvpn"),
    "stock client, pyovpn server": ("openvpn", "pyovpn"),
}
# relay arguments per fault; None: the link-down fault (no relay)
FAULTS: dict[str, list[str] | None] = {
    "loss 5 %": ["--loss", "0.05"],
    "loss 15 %": ["--loss", "0.15"],
    "reordering": ["--delay", "2", "--reorder", "0.25", "--reorder-extra", "20"],
    "duplication": ["--duplicate", "0.2"],
    "delay 200 ms ± 50 ms": ["--delay", "200", "--jitter", "50"],
    "link down 20 s": None,
}
PYOVPN_REKEY = re.compile(r"renegotiated data channel key_id")
# OpenVPN 2.6 logs this line at the end of every TLS handshake, the first one and each renegotiation
OPENVPN_HANDSHAKE = re.compile(r"Control Channel: TLSv")
BUDGET = 60.0


def _ping(ns: str, addr: str, count: int, interval: float = 0.2) -> int:
    out = subprocess.run(
        [*netns_exec(ns), "ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", "2", addr],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    m = re.search(r"(\d+) received", out)
    return int(m.group(1)) if m else 0


def _rekeys(impl: str, log_after_up: str) -> int:
    """Renegotiations completed in the client's log after its tunnel came up."""
    return len((OPENVPN_HANDSHAKE if impl == "openvpn" else PYOVPN_REKEY).findall(log_after_up))


def one_try(fault: str, client_impl: str, server_impl: str, pki_dir: Path, seed: int) -> dict[str, float]:
    relay_args = FAULTS[fault]
    spec = TunnelSpec(role="server", cipher="AES-256-GCM", wrap="tls-crypt", proto="udp", family=4, verb=3)
    pki = make_pki(pki_dir)
    res: dict[str, float] = {
        "up": 0.0,
        "seconds": float("nan"),
        "pings": 0.0,
        "rekeyed": 0.0,
        "recovery": float("nan"),
    }
    with Netns() as net:
        server_conf = server_config(spec, pki, impl=server_impl, local=net.outer("b", 4))  # type: ignore[arg-type]
        (net.workdir / "s.conf").write_text(server_conf)
        remote = "127.0.0.1" if relay_args is not None else net.outer("b", 4)
        client_conf = client_config(spec, pki, impl=client_impl, remote=remote)  # type: ignore[arg-type]
        (net.workdir / "c.conf").write_text(client_conf + "reneg-sec 8\n")
        server = net.spawn("b", vpn_argv(server_impl, net.workdir / "s.conf"), f"server-{server_impl}")  # type: ignore[arg-type]
        wait_listening(net.b, "udp", spec.port, proc=server)
        if relay_args is not None:
            relay = [sys.executable, str(ROOT / "bench" / "faultrelay.py"), str(spec.port), net.outer("b", 4)]
            relay += [str(spec.port), *relay_args, "--seed", str(seed)]
            net.spawn("a", relay, "relay").wait_for_line("relay listening", 10)
        start = time.monotonic()
        client = net.spawn("a", vpn_argv(client_impl, net.workdir / "c.conf"), f"client-{client_impl}")  # type: ignore[arg-type]
        try:
            client.wait_for_line(INIT_LINE, BUDGET)
        except (WaitTimeout, ProcessDied):
            return res
        res["up"], res["seconds"] = 1.0, time.monotonic() - start
        target = inner_addrs(spec).server4
        mark = client.mark()
        if relay_args is None:
            _ping(net.a, target, 5)
            subprocess.run(["ip", "-n", net.a, "link", "set", "veth0", "down"], check=True)
            time.sleep(20)
            subprocess.run(["ip", "-n", net.a, "link", "set", "veth0", "up"], check=True)
            back = time.monotonic()
            while time.monotonic() - back < 90:
                if _ping(net.a, target, 1) == 1:
                    res["recovery"] = time.monotonic() - back
                    break
        res["pings"] = _ping(net.a, target, 30) / 30
        deadline = start + res["seconds"] + 25
        while time.monotonic() < deadline and not _rekeys(client_impl, client.text()[mark:]):
            time.sleep(0.5)
        res["rekeyed"] = 1.0 if _rekeys(client_impl, client.text()[mark:]) else 0.0
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tries", type=int, default=2)
    ap.add_argument("--faults", nargs="+", choices=list(FAULTS), default=list(FAULTS))
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces)")
    rows: dict[tuple[str, str], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as td:
        for fault in args.faults:
            for t in range(args.tries):
                order = list(VARIANTS) if t % 2 == 0 else list(reversed(VARIANTS))
                for name in order:
                    client_impl, server_impl = VARIANTS[name]
                    pki_dir = Path(td) / f"{len(rows)}-{t}-{client_impl}-{server_impl}"
                    x = one_try(fault, client_impl, server_impl, pki_dir, seed=1000 * t + len(rows))
                    rows.setdefault((fault, name), []).append(x)
                    print(f"{fault}, try {t + 1}, {name}: {x}", flush=True)
    print(f"\n{args.tries} tries per fault and variant\n")
    print(
        "| fault | variant | up within 60 s | median time to up | pings answered | renegotiated "
        "| back after the link |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for (fault, name), xs in rows.items():
        ups = [x["seconds"] for x in xs if x["up"]]
        med = f"{statistics.median(ups):.1f} s" if ups else "-"
        pings = statistics.mean(x["pings"] for x in xs if x["up"]) if ups else 0.0
        rekeyed = sum(int(x["rekeyed"]) for x in xs)
        rec = [x["recovery"] for x in xs if x["recovery"] == x["recovery"]]
        back = f"{statistics.median(rec):.1f} s" if rec else ("-" if FAULTS[fault] is not None else "never")
        print(
            f"| {fault} | {name} | {len(ups)}/{len(xs)} | {med} | {100 * pings:.0f} % | "
            f"{rekeyed}/{len(xs)} | {back} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
