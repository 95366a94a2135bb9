#!/usr/bin/env python3
"""P2MP aggregate throughput: one server, several stock OpenVPN 2.6 clients transferring at once.

Needs root (network namespaces). A ``harness.Star``: the server in its own namespace with one
veth to each client namespace. For each server variant (stock OpenVPN 2.6 tuned as in
bench/throughput.py, and pyovpn on its userspace data plane), alternating over ``--rounds``,
every client runs one iperf3 TCP stream to the server's tunnel address for ``--seconds`` at
the same time, first clients -> server, then server -> clients (``-R``). Reports the median
aggregate (sum of the clients' rates) with its min-max, the ratio to stock OpenVPN, and the
server's CPU seconds per GB moved. ``--proto tcp`` runs the tunnels over TCP instead of UDP.
``--baseline REV`` adds the pyovpn of an earlier commit (its src/ via ``git archive``) as a
third server variant in the same alternating rounds. ``--engine`` adds pyovpn with
``userspace-engine multiprocess`` (the server on the multi-process engine; by default a
server runs on the in-process plane). ``--idle N`` (UDP) also keeps N simulated
clients connected during the transfers (``pyovpn.tools.loadgen`` in the first client's
namespace, a keepalive ping every 10 s each; the server gets ``duplicate-cn``), so "100
connected, 10 transferring" is ``--clients 10 --idle 90``.

All of it (server, clients, iperf3, the kernel's network work) shares this machine's cores, so
the run also reads the whole machine's busy time (``/proc/stat``) over each transfer. What was
spent outside the server, per GB, bounds what any server could reach here: with a server that
cost nothing, the rest could move at most ``cores / (rest s/GB)``. That bound is printed as the
"ceiling", and beside it as a multiple of stock OpenVPN's aggregate: a target above it cannot be
met on this machine by the server alone.

    sudo python3 bench/p2mp_throughput.py --clients 3 --seconds 8 --rounds 3
    sudo python3 bench/p2mp_throughput.py --proto tcp --rounds 3
    sudo python3 bench/p2mp_throughput.py --baseline HEAD~1 --rounds 5
    sudo python3 bench/p2mp_throughput.py --clients 10 --idle 90 --rounds 3
    sudo python3 bench/p2mp_throughput.py --engine --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from bench.throughput import OPENVPN_TUNED, _tree_cpu, export_baseline  # noqa: E402
from tests.netns.harness import (  # noqa: E402
    INIT_LINE,
    Star,
    netns_exec,
    p2mp_client_config,
    p2mp_server_config,
    wait_for_lines,
    wait_listening,
)

from pyovpn.tools.pki import Pki, issue_client, make_pki  # noqa: E402

SERVER_IP = "10.79.0.1"
IPERF_BASE_PORT = 5301
VARIANTS = {"openvpn": "OpenVPN 2.6 server (tuned)", "pyovpn": "pyovpn server (userspace, default plane)"}
BASELINE_SRC: Path | None = None  # --baseline: the earlier commit's src/


def _server_conf(impl: str, pki: Pki, proto: str, idle: int) -> str:
    extra = [f"proto {proto}", "data-ciphers AES-256-GCM", "verb 1"]
    if idle:
        extra.append("duplicate-cn")  # the simulated clients share one certificate
    if impl == "openvpn":
        extra += ["disable-dco", *OPENVPN_TUNED]
    else:
        extra += ["dco userspace"]
    if impl == "pyovpn-engine":
        extra += ["userspace-engine multiprocess"]
    return p2mp_server_config(pki, "10.79.0.0", *extra)


def _connect_idle(star: Star, pki: Pki, idle: int) -> Any:
    """``idle`` simulated clients from the first client's namespace; returns the loadgen process."""
    crt, key = issue_client(pki, "idle")
    conf = star.workdir / "idle.conf"
    conf.write_text(
        p2mp_client_config(pki, star.server_addr(0), crt, key, "data-ciphers AES-256-GCM", "verb 1")
    )
    argv = [sys.executable, "-m", "pyovpn.tools.loadgen", "--config", str(conf)]
    argv += ["-n", str(idle), "--concurrency", "20", "--hold", "inf"]
    loadgen = star.spawn(star.peers[0], ["env", f"PYTHONPATH={ROOT / 'src'}", *argv], "loadgen")
    m = loadgen.wait_for_line(r"LOADGEN SETTLED (\{.*\})\n", 120 + idle)
    settled = json.loads(m.group(1))
    if int(settled["connected"]) != idle:
        raise SystemExit(f"only {settled['connected']} of {idle} simulated clients connected: {settled}")
    return loadgen


def machine_cpu() -> tuple[float, float]:
    """(busy, stolen) CPU seconds of the whole machine so far, all cores, from ``/proc/stat``."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def one(impl: str, pki_dir: Path, n: int, seconds: float, proto: str, idle: int = 0) -> dict[str, float]:
    pki = make_pki(pki_dir)
    with Star(pki_dir, n, base=230) as star:
        conf = star.workdir / "server.conf"
        conf.write_text(_server_conf(impl, pki, proto, idle))
        # PYTHONPATH names the pyovpn to run, so an installed one elsewhere never stands in for it
        src = BASELINE_SRC if impl == "pyovpn-baseline" else ROOT / "src"
        argv = (
            ["openvpn", "--config", str(conf)]
            if impl == "openvpn"
            else ["env", f"PYTHONPATH={src}", sys.executable, "-m", "pyovpn", "--config", str(conf)]
        )
        server = star.spawn(star.server, argv, f"server-{impl}")
        wait_listening(star.server, "tcp" if proto == "tcp" else "udp", 1194, proc=server)
        clients = []
        for i in range(n):
            crt, key = issue_client(pki, f"c{i}")
            cconf = star.workdir / f"c{i}.conf"
            cconf.write_text(
                p2mp_client_config(
                    pki,
                    star.server_addr(i),
                    crt,
                    key,
                    f"proto {'tcp-client' if proto == 'tcp' else 'udp'}",
                    "data-ciphers AES-256-GCM",
                    "disable-dco",
                    "verb 1",
                    *OPENVPN_TUNED,
                )
            )
            clients.append(star.spawn(star.peers[i], ["openvpn", "--config", str(cconf)], f"client-{i}"))
        wait_for_lines([server, *clients], INIT_LINE, 60)
        loadgen = _connect_idle(star, pki, idle) if idle else None
        iperf_servers = [
            subprocess.Popen(
                [*netns_exec(star.server), "iperf3", "-s", "-p", str(IPERF_BASE_PORT + i)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for i in range(n)
        ]
        out: dict[str, float] = {}
        try:
            for direction, flag in (("up", []), ("down", ["-R"])):
                time.sleep(1.0)  # an iperf3 server needs a moment between tests ("server is busy")
                cpu0 = _tree_cpu(server.pid)
                busy0, steal0 = machine_cpu()
                wall0 = time.monotonic()
                runs = [
                    subprocess.Popen(
                        [
                            *netns_exec(star.peers[i]),
                            "iperf3",
                            "-c",
                            SERVER_IP,
                            "-p",
                            str(IPERF_BASE_PORT + i),
                            "-t",
                            str(seconds),
                            "-J",
                            *flag,
                        ],
                        stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL,
                        text=True,
                    )
                    for i in range(n)
                ]
                total_bps = 0.0
                total_bytes = 0.0
                for r in runs:
                    stdout, _ = r.communicate(timeout=seconds + 60)
                    report = json.loads(stdout)
                    if "error" in report:
                        raise SystemExit(f"{impl}: iperf3 failed: {report['error']}\n{server.tail(20)}")
                    end = report["end"]
                    total_bps += end["sum_received"]["bits_per_second"]
                    total_bytes += end["sum_received"]["bytes"]
                cpu = _tree_cpu(server.pid) - cpu0
                busy1, steal1 = machine_cpu()
                wall = time.monotonic() - wall0
                cores = os.cpu_count() or 1
                gb = total_bytes / 1e9
                rest = max(busy1 - busy0 - cpu, 0.0)  # clients, iperf3, the kernel's softirqs
                out[f"{direction}_gbps"] = total_bps / 1e9
                out[f"{direction}_cpu_s_per_gb"] = cpu / gb if gb else float("nan")
                out[f"{direction}_busy_pct"] = 100 * (busy1 - busy0) / (wall * cores - (steal1 - steal0))
                out[f"{direction}_rest_s_per_gb"] = rest / gb if gb else float("nan")
                out[f"{direction}_ceiling_gbps"] = 8 * cores / (rest / gb) if gb and rest else float("nan")
            if loadgen is not None and not loadgen.running():
                raise SystemExit(f"the load generator died during the transfers:\n{loadgen.tail(20)}")
        finally:
            for p in iperf_servers:
                p.kill()
                p.wait()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--proto", choices=["udp", "tcp"], default="udp")
    ap.add_argument("--baseline", metavar="REV", help="also run the pyovpn of an earlier git commit")
    ap.add_argument("--idle", type=int, default=0, help="also keep N simulated clients connected (UDP)")
    ap.add_argument(
        "--engine", action="store_true", help="also run pyovpn with userspace-engine multiprocess"
    )
    args = ap.parse_args()
    if args.idle and args.proto != "udp":
        ap.error("--idle: the load generator speaks UDP only")
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces)")
    if args.engine:
        VARIANTS["pyovpn-engine"] = "pyovpn server (userspace, multi-process engine)"
    with tempfile.TemporaryDirectory() as td:
        if args.baseline:
            global BASELINE_SRC
            BASELINE_SRC = export_baseline(args.baseline, Path(td))
            VARIANTS["pyovpn-baseline"] = f"pyovpn@{args.baseline} server (userspace)"
        res: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
        for r in range(args.rounds):
            order = list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]
            for impl in order:
                x = one(impl, Path(td) / f"{impl}{r}", args.clients, args.seconds, args.proto, args.idle)
                res[impl].append(x)
                print(f"round {r + 1} {impl}: {x}", flush=True)
    ref = {k: statistics.median(x[k] for x in res["openvpn"]) for k in res["openvpn"][0]}
    print(
        f"\n{args.clients} stock OpenVPN 2.6 clients, one TCP stream each at once"
        + (f" ({args.idle} simulated clients connected besides)" if args.idle else "")
        + f", {args.seconds:.0f} s, "
        f"tunnels over {args.proto.upper()}, medians of {args.rounds} rounds (min-max)\n"
    )
    print(
        "| server | clients -> server, Gbit/s | ratio | server -> clients, Gbit/s | ratio "
        "| server CPU s/GB up / down |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for impl, rows in res.items():
        cells = []
        for d in ("up", "down"):
            vals = [x[f"{d}_gbps"] for x in rows]
            med = statistics.median(vals)
            cells.append(f"{med:.2f} ({min(vals):.2f}-{max(vals):.2f})")
            cells.append(f"{med / ref[f'{d}_gbps']:.2f}x" if ref[f"{d}_gbps"] else "-")
        cpu = [statistics.median(x[f"{d}_cpu_s_per_gb"] for x in rows) for d in ("up", "down")]
        print(f"| {VARIANTS[impl]} | {' | '.join(cells)} | {cpu[0]:.1f} / {cpu[1]:.1f} |")
    print(
        "\nThe machine during the transfers: busy = all cores' busy time over the transfer window"
        " (100 % = every core); rest = CPU seconds per GB spent outside the server (clients, iperf3,"
        " kernel); ceiling = what the rest allows with a server that cost nothing"
        " (cores / rest s/GB), and that ceiling over stock OpenVPN's median aggregate.\n"
    )
    print(
        "| server | busy % up / down | rest s/GB up / down | ceiling Gbit/s up / down | ceiling / OpenVPN |"
    )
    print("|---|---:|---:|---:|---:|")
    for impl, rows in res.items():
        med = {
            k: [statistics.median(x[f"{d}_{k}"] for x in rows) for d in ("up", "down")]
            for k in ("busy_pct", "rest_s_per_gb", "ceiling_gbps")
        }
        ratio = [med["ceiling_gbps"][i] / ref[f"{d}_gbps"] for i, d in enumerate(("up", "down"))]
        print(
            f"| {VARIANTS[impl]} | {med['busy_pct'][0]:.0f} / {med['busy_pct'][1]:.0f}"
            f" | {med['rest_s_per_gb'][0]:.1f} / {med['rest_s_per_gb'][1]:.1f}"
            f" | {med['ceiling_gbps'][0]:.2f} / {med['ceiling_gbps'][1]:.2f}"
            f" | {ratio[0]:.2f}x / {ratio[1]:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
