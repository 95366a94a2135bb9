#!/usr/bin/env python3
"""Throughput benchmark: iperf3 through pyovpn and through stock OpenVPN, side by side, in one run.

Needs root (network namespaces). For each variant it builds a fresh namespace pair joined by
a veth, starts a P2P tunnel (UDP over IPv4, AES-256-GCM, no control-channel wrap), runs one
TCP iperf3 stream for ``--seconds`` in each direction and reads the CPU time each VPN process
used during the transfer from /proc. Raw veth (no tunnel) is the ceiling. Results are printed
as a Markdown table with ratios to OpenVPN; ``--write`` puts them into docs/BENCHMARKS.md.

    sudo python3 bench/throughput.py --seconds 10 --write
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from tests.netns.harness import (  # noqa: E402
    INIT_LINE,
    Netns,
    TunnelSpec,
    client_config,
    inner_addrs,
    iperf3_transfer,
    server_config,
    vpn_argv,
    wait_for_lines,
    wait_listening,
)

from pyovpn.tools.pki import make_pki  # noqa: E402

OPENVPN_TUNED = ["sndbuf 4194304", "rcvbuf 4194304", "txqueuelen 1000", "fast-io"]
MARK_BEGIN = "<!-- bench/throughput.py:begin -->"
MARK_END = "<!-- bench/throughput.py:end -->"
GUEST_BEGIN = "<!-- bench/throughput.py --guest:begin -->"
GUEST_END = "<!-- bench/throughput.py --guest:end -->"


@dataclass
class Variant:
    name: str
    server: str | None  # "openvpn" | "pyovpn" | "pyovpn-offload" | None for raw veth
    client: str | None
    tuned: bool = False


VARIANTS = [
    Variant("raw veth (no tunnel)", None, None),
    Variant("OpenVPN 2.6 <-> OpenVPN 2.6 (defaults)", "openvpn", "openvpn"),
    Variant("OpenVPN 2.6 <-> OpenVPN 2.6 (tuned)", "openvpn", "openvpn", tuned=True),
    Variant("pyovpn <-> pyovpn (userspace)", "pyovpn", "pyovpn"),
    Variant("pyovpn client <-> OpenVPN server", "openvpn", "pyovpn", tuned=True),
    Variant("pyovpn <-> pyovpn (offload engine)", "pyovpn-offload", "pyovpn-offload"),
    Variant("pyovpn client (offload engine) <-> OpenVPN server", "openvpn", "pyovpn-offload", tuned=True),
    Variant("OpenVPN client <-> pyovpn server (offload engine)", "pyovpn-offload", "openvpn", tuned=True),
]


# --guest: inside the scripts/guest kernel (linux 7.3 with ovpn, OpenVPN 2.7.8); TCG-emulated,
# so only the ratios mean anything
GUEST_VARIANTS = [
    Variant("raw veth (no tunnel)", None, None),
    Variant("OpenVPN 2.7 + DCO <-> OpenVPN 2.7 + DCO", "openvpn-dco", "openvpn-dco"),
    Variant("pyovpn + kernel DCO <-> pyovpn + kernel DCO", "pyovpn-kernel", "pyovpn-kernel"),
    Variant("pyovpn + kernel DCO <-> OpenVPN 2.7 + DCO", "openvpn-dco", "pyovpn-kernel"),
    Variant("OpenVPN 2.7 --disable-dco <-> OpenVPN 2.7 --disable-dco", "openvpn", "openvpn", tuned=True),
    Variant("pyovpn userspace <-> pyovpn userspace", "pyovpn", "pyovpn"),
]


def _impl(name: str) -> str:
    """The harness implementation behind a variant side."""
    return {"pyovpn-offload": "pyovpn", "pyovpn-kernel": "pyovpn", "openvpn-dco": "openvpn"}.get(name, name)


def _argv(name: str, config: Path) -> list[str]:
    # `env` execs the daemon, so the pid (and its CPU accounting) is pyovpn's own
    if name == "pyovpn-offload":
        return ["env", "PYOVPN_ENGINE=offload", *vpn_argv("pyovpn", config)]
    if name in ("pyovpn-kernel", "openvpn-dco"):
        return vpn_argv(_impl(name), config)  # type: ignore[arg-type]
    if name == "pyovpn":
        return ["env", "PYOVPN_ENGINE=inprocess", *vpn_argv("pyovpn", config)]
    return vpn_argv(name, config)  # type: ignore[arg-type]


def _pids(pid: int) -> list[int]:
    """A process and all its descendants (the offload engine and its workers)."""
    out = [pid]
    for child in Path(f"/proc/{pid}/task").glob("*/children"):
        for c in child.read_text().split():
            out += _pids(int(c))
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def run_variant(v: Variant, pki_dir: Path, seconds: float) -> dict[str, float]:
    pki = make_pki(pki_dir)
    spec = TunnelSpec(role="p2p", cipher="AES-256-GCM", wrap="none", proto="udp", family=4, verb=1)
    sides = {v.server, v.client}
    if "pyovpn-kernel" in sides:
        spec = spec.with_(dco="kernel")
    if "openvpn-dco" in sides:
        spec = spec.with_(openvpn_dco=True)
    out: dict[str, float] = {}
    with Netns() as net:
        if v.server is None:
            target = net.outer("b", 4)
            procs = []
        else:
            assert v.client is not None
            scfg = server_config(spec, pki, impl=_impl(v.server), local=net.outer("b", 4))  # type: ignore[arg-type]
            ccfg = client_config(spec, pki, impl=_impl(v.client), remote=net.outer("b", 4))  # type: ignore[arg-type]
            if v.tuned:
                if v.server == "openvpn":
                    scfg += "\n".join(OPENVPN_TUNED) + "\n"
                if v.client == "openvpn":
                    ccfg += "\n".join(OPENVPN_TUNED) + "\n"
            (net.workdir / "s.conf").write_text(scfg)
            (net.workdir / "c.conf").write_text(ccfg)
            server = net.spawn("b", _argv(v.server, net.workdir / "s.conf"), f"server-{v.server}")
            wait_listening(net.b, "udp", spec.port, proc=server)
            client = net.spawn("a", _argv(v.client, net.workdir / "c.conf"), f"client-{v.client}")
            wait_for_lines([server, client], INIT_LINE, 30)
            procs = [("server", server.pid), ("client", client.pid)]
            target = inner_addrs(spec).server4
            time.sleep(0.5)
        for direction, reverse in (("a->b", False), ("b->a", True)):
            # CPU of the VPN process and its children (an offload engine's processes)
            before = {name: sum(cpu_seconds(p) for p in _pids(pid)) for name, pid in procs}
            res = iperf3_transfer(net.a, net.b, target, seconds=seconds, reverse=reverse, log_dir=net.workdir)
            gbit = res["bytes_sent"] * 8 / res["seconds"] / 1e9
            out[f"{direction} Gbit/s"] = gbit
            gbytes = res["bytes_sent"] / 1e9
            for name, pid in procs:
                used = sum(cpu_seconds(p) for p in _pids(pid)) - before[name]
                out[f"{direction} {name} CPU s/GB"] = used / gbytes if gbytes else float("nan")
    return out


def table(results: dict[str, dict[str, float]], seconds: float, ref_name: str) -> str:
    ref = results.get(ref_name)
    lines = [
        f"One TCP stream, {seconds:.0f} s per direction, P2P UDP/IPv4, AES-256-GCM, "
        "two namespaces over veth.",
        "CPU = user+system seconds of the VPN process per GB moved (server / client).",
        "",
        f"| variant | a→b Gbit/s | b→a Gbit/s | ratio to {ref_name} (a→b / b→a) "
        "| CPU s/GB a→b (srv/cli) | CPU s/GB b→a (srv/cli) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        ab, ba = r["a->b Gbit/s"], r["b->a Gbit/s"]
        ratio = f"{ab / ref['a->b Gbit/s']:.2f} / {ba / ref['b->a Gbit/s']:.2f}" if ref else "-"

        def cpu(d: str, r: dict[str, float] = r) -> str:
            if f"{d} server CPU s/GB" not in r:
                return "-"
            return f"{r[f'{d} server CPU s/GB']:.2f} / {r[f'{d} client CPU s/GB']:.2f}"

        lines.append(f"| {name} | {ab:.2f} | {ba:.2f} | {ratio} | {cpu('a->b')} | {cpu('b->a')} |")
    return "\n".join(lines)


def write_doc(text: str, command: str, *, guest: bool = False) -> None:
    doc = ROOT / "docs" / "BENCHMARKS.md"
    content = doc.read_text() if doc.exists() else "# Benchmarks\n"
    openvpn = subprocess.run(["openvpn", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    begin, end = (GUEST_BEGIN, GUEST_END) if guest else (MARK_BEGIN, MARK_END)
    title = (
        "Kernel DCO in the qemu guest (bench/throughput.py --guest)"
        if guest
        else "Throughput (bench/throughput.py)"
    )
    note = (
        "The guest runs under TCG emulation (this machine's /dev/kvm cannot run a stock kernel), so only "
        "ratios within this table mean anything.\n\n"
        if guest
        else ""
    )
    block = (
        f"{begin}\n## {title}\n\n{note}"
        f"Command: `{command}`  \n"
        f"Machine: {os.cpu_count()} vCPU, Linux {platform.release()}, Python {platform.python_version()}, "
        f"{openvpn.split(' [')[0]}  \nDate: {time.strftime('%Y-%m-%d')}\n\n"
        f"{text}\n{end}"
    )
    if begin in content:
        content = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, content, flags=re.S)
    else:
        content = content.rstrip() + "\n\n" + block + "\n"
    doc.write_text(content)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--write", action="store_true", help="update docs/BENCHMARKS.md")
    ap.add_argument("--only", help="substring filter on variant names")
    ap.add_argument(
        "--guest", action="store_true", help="kernel DCO variants (run inside scripts/guest/run.sh)"
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/throughput.py needs root (network namespaces)", file=sys.stderr)
        return 1
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in GUEST_VARIANTS if args.guest else VARIANTS:
            if args.only and args.only not in v.name:
                continue
            print(f"running: {v.name}", flush=True)
            results[v.name] = run_variant(v, Path(tmp) / v.name.replace(" ", "_"), args.seconds)
            print("   ", {k: round(x, 3) for k, x in results[v.name].items()}, flush=True)
    ref = "OpenVPN 2.7 + DCO <-> OpenVPN 2.7 + DCO" if args.guest else "OpenVPN 2.6 <-> OpenVPN 2.6 (tuned)"
    text = table(results, args.seconds, ref)
    print(text)
    if args.write:
        command = "sudo python3 bench/throughput.py " + " ".join(sys.argv[1:])
        if args.guest:
            command = f"sudo scripts/guest/run.sh -- python3 bench/throughput.py {' '.join(sys.argv[1:])}"
        write_doc(text, command, guest=args.guest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
