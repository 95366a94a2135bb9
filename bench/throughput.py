#!/usr/bin/env python3
"""Throughput benchmark: iperf3 through pyovpn and through stock OpenVPN, side by side, in one run.

Needs root (network namespaces). For each variant it builds a fresh namespace pair joined by
a veth, starts a P2P tunnel (UDP over IPv4, AES-256-GCM, no control-channel wrap) and runs,
in each direction (a→b = client to server, b→a = server to client):

  tcp1  one TCP iperf3 stream for --seconds
  tcp4  four TCP streams (iperf3 -P 4) for --seconds
  udp   UDP at fixed offered rates (--udp-rates, default 200M,500M,1000M) with --udp-length
        byte datagrams (1400: fits the tunnel without fragmentation) for --udp-seconds each;
        reports what arrived and the loss %

and reads the CPU time each VPN process (with its children: the offload engine's processes)
used during each transfer from /proc. Raw veth (no tunnel) is the ceiling. Results are printed
as Markdown tables with ratios to tuned OpenVPN; ``--write`` puts them into docs/BENCHMARKS.md
and draws docs/throughput.png (needs matplotlib: ``pip install -e '.[bench]'``).

pyovpn runs with `userspace-engine` set explicitly (multiprocess or inprocess), whatever select.py's
default is. The default run (about 5 minutes) covers the variants of issue #5; ``--variants
all`` adds the in-process userspace data channel, ``--only``/``--tests`` narrow it down.

``--profile`` instead runs py-spy (``--subprocesses``, the engine is multi-process) against
the pyovpn client (offload engine) of a pyovpn <-> tuned OpenVPN tunnel during a one-stream
transfer in each direction, and prints the top functions by self time (with ``--write``: the
"Where the time goes" section of docs/BENCHMARKS.md).

``--rounds N`` runs every variant N times, alternating the order round by round (forward,
then backward), and reports the median of each figure with its min-max spread, so a noisy
machine shows up as spread instead of as a lucky number. ``--baseline REV`` compares this
checkout with an earlier commit side by side in the same run: REV's ``src/`` is exported with
``git archive`` into a temporary directory and its pyovpn runs in the same variants, marked
``@REV``.

    sudo python3 bench/throughput.py --write
    sudo python3 bench/throughput.py --baseline HEAD~1 --rounds 3 --tests tcp1,tcp4
    sudo python3 bench/throughput.py --tests tcp1 --only offload --seconds 10
    sudo python3 bench/throughput.py --profile --seconds 8
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from tests.netns.harness import (  # noqa: E402
    INIT_LINE,
    HarnessError,
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
BASELINE_BEGIN = "<!-- bench/throughput.py --baseline:begin -->"
BASELINE_END = "<!-- bench/throughput.py --baseline:end -->"
PROFILE_BEGIN = "<!-- bench/throughput.py --profile:begin -->"
PROFILE_END = "<!-- bench/throughput.py --profile:end -->"
PLOT_PATH = ROOT / "docs" / "throughput.png"
MATPLOTLIB_HINT = (
    "matplotlib is not installed, so no plot: install it with `pip install -e '.[bench]'` "
    "(or `pip install matplotlib`) and run again"
)
DIRECTIONS = (("a->b", False), ("b->a", True))
ALL_TESTS = ("tcp1", "tcp4", "udp")
REF = "OpenVPN 2.6 <-> OpenVPN 2.6 (tuned)"
GUEST_REF = "OpenVPN 2.7 + DCO <-> OpenVPN 2.7 + DCO"
PROFILE_VARIANT = "pyovpn client (offload engine) <-> OpenVPN server"


@dataclass
class Variant:
    name: str
    server: str | None  # "openvpn" | "pyovpn" | "pyovpn-offload" | None for raw veth
    client: str | None
    tuned: bool = False
    default: bool = True  # part of a run without --variants all


VARIANTS = [
    Variant("raw veth (no tunnel)", None, None),
    Variant("OpenVPN 2.6 <-> OpenVPN 2.6 (defaults)", "openvpn", "openvpn"),
    Variant(REF, "openvpn", "openvpn", tuned=True),
    Variant("pyovpn <-> pyovpn (userspace)", "pyovpn", "pyovpn", default=False),
    Variant("pyovpn client <-> OpenVPN server", "openvpn", "pyovpn", tuned=True, default=False),
    Variant("pyovpn <-> pyovpn (offload engine)", "pyovpn-offload", "pyovpn-offload"),
    Variant(PROFILE_VARIANT, "openvpn", "pyovpn-offload", tuned=True),
    Variant("OpenVPN client <-> pyovpn server (offload engine)", "pyovpn-offload", "openvpn", tuned=True),
    # the stock end as most users run it: no sndbuf/rcvbuf, so a 208 KiB receive buffer
    Variant(
        "pyovpn client (offload engine) <-> OpenVPN server (defaults)",
        "openvpn",
        "pyovpn-offload",
        default=False,
    ),
    Variant(
        "OpenVPN client (defaults) <-> pyovpn server (offload engine)",
        "pyovpn-offload",
        "openvpn",
        default=False,
    ),
]


# --guest: inside the scripts/guest kernel (linux 7.3 with ovpn, OpenVPN 2.7.8); TCG-emulated,
# so only the ratios mean anything
GUEST_VARIANTS = [
    Variant("raw veth (no tunnel)", None, None),
    Variant(GUEST_REF, "openvpn-dco", "openvpn-dco"),
    Variant("pyovpn + kernel DCO <-> pyovpn + kernel DCO", "pyovpn-kernel", "pyovpn-kernel"),
    Variant("pyovpn + kernel DCO <-> OpenVPN 2.7 + DCO", "openvpn-dco", "pyovpn-kernel"),
    Variant("OpenVPN 2.7 --disable-dco <-> OpenVPN 2.7 --disable-dco", "openvpn", "openvpn", tuned=True),
    Variant("pyovpn userspace <-> pyovpn userspace", "pyovpn", "pyovpn"),
]


# --baseline: the src/ directory of the earlier commit, exported for this run
BASELINE_SRC: Path | None = None
# --pyovpn-line: config lines for every pyovpn end (e.g. "shaper 30000000")
PYOVPN_LINES: list[str] = []


def _impl(name: str) -> str:
    """The harness implementation behind a variant side."""
    return {
        "pyovpn-offload": "pyovpn",
        "pyovpn-kernel": "pyovpn",
        "openvpn-dco": "openvpn",
        "pyovpn-baseline": "pyovpn",
    }.get(name, name)


def _argv(name: str, config: Path) -> list[str]:
    # `env` execs the daemon, so the pid (and its CPU accounting) is pyovpn's own; PYTHONPATH
    # names the checkout explicitly, so an installed pyovpn elsewhere never stands in for it
    if name == "pyovpn-baseline":
        assert BASELINE_SRC is not None
        return ["env", f"PYTHONPATH={BASELINE_SRC}", *vpn_argv("pyovpn", config)]
    here = ["env", f"PYTHONPATH={ROOT / 'src'}", *vpn_argv("pyovpn", config)]
    if name == "pyovpn-offload":
        return [*here, "--userspace-engine", "multiprocess"]
    if name in ("pyovpn-kernel", "openvpn-dco"):
        return vpn_argv(_impl(name), config)  # type: ignore[arg-type]
    if name == "pyovpn":
        return [*here, "--userspace-engine", "inprocess"]
    return vpn_argv(name, config)  # type: ignore[arg-type]


def _pids(pid: int) -> list[int]:
    """A process and all its descendants (the offload engine and its workers)."""
    out = [pid]
    for child in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids = child.read_text().split()
        except OSError:
            continue
        for c in kids:
            out += _pids(int(c))
    return out


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0  # exited meanwhile
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def _tree_cpu(pid: int) -> float:
    return sum(cpu_seconds(p) for p in _pids(pid))


def udp_snmp(ns: str) -> dict[str, int]:
    """The ``Udp:`` counters of namespace ``ns`` (``/proc/net/snmp``); empty if unreadable."""
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"], capture_output=True, text=True, check=False
    ).stdout
    rows = [line.split()[1:] for line in out.splitlines() if line.startswith("Udp:")]
    if len(rows) < 2:
        return {}
    return dict(zip(rows[0], map(int, rows[1]), strict=False))


def udp_rcvbuf_errors(ns: str) -> int:
    """UdpRcvbufErrors of namespace ``ns`` (datagrams dropped because a socket buffer was full)."""
    return udp_snmp(ns).get("RcvbufErrors", 0)


# ----------------------------------------------------------------------------- one tunnel


class Bed:
    """One variant's namespaces and tunnel (or raw veth), as a context manager."""

    def __init__(self, v: Variant, pki_dir: Path) -> None:
        self.v = v
        self.pki_dir = pki_dir
        self.net = Netns()
        self.procs: list[tuple[str, int]] = []
        self.target = ""

    def __enter__(self) -> Bed:
        v = self.v
        pki = make_pki(self.pki_dir)
        spec = TunnelSpec(role="p2p", cipher="AES-256-GCM", wrap="none", proto="udp", family=4, verb=1)
        sides = {v.server, v.client}
        if "pyovpn-kernel" in sides:
            spec = spec.with_(dco="kernel")
        if "openvpn-dco" in sides:
            spec = spec.with_(openvpn_dco=True)
        net = self.net.__enter__()
        try:
            if v.server is None:
                self.target = net.outer("b", 4)
                return self
            assert v.client is not None
            scfg = server_config(spec, pki, impl=_impl(v.server), local=net.outer("b", 4))  # type: ignore[arg-type]
            ccfg = client_config(spec, pki, impl=_impl(v.client), remote=net.outer("b", 4))  # type: ignore[arg-type]
            if PYOVPN_LINES:
                if _impl(v.server) == "pyovpn":
                    scfg += "\n".join(PYOVPN_LINES) + "\n"
                if _impl(v.client) == "pyovpn":
                    ccfg += "\n".join(PYOVPN_LINES) + "\n"
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
            self.procs = [("server", server.pid), ("client", client.pid)]
            self.target = inner_addrs(spec).server4
            time.sleep(0.5)
        except BaseException:
            self.net.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.net.close()

    def transfer(self, reverse: bool, **iperf: Any) -> dict[str, float]:
        """One iperf3 run; Gbit/s that arrived, loss % (UDP) and CPU s/GB per VPN process."""
        before = {name: _tree_cpu(pid) for name, pid in self.procs}
        receiver = self.net.a if reverse else self.net.b  # where the tunnel's datagrams arrive
        snmp0 = udp_snmp(receiver)
        res = iperf3_transfer(
            self.net.a, self.net.b, self.target, reverse=reverse, log_dir=self.net.workdir, **iperf
        )
        used = {name: _tree_cpu(pid) - before[name] for name, pid in self.procs}
        snmp1 = udp_snmp(receiver)
        out: dict[str, float] = {}
        if self.procs and "RcvbufErrors" in snmp0 and "RcvbufErrors" in snmp1:
            # datagrams the receiving end's kernel dropped because its socket buffer was full
            dropped = snmp1["RcvbufErrors"] - snmp0["RcvbufErrors"]
            arrived = snmp1["InDatagrams"] - snmp0["InDatagrams"] + dropped
            out["rx drops"] = 100 * dropped / arrived if arrived else 0.0
        if "udp" in res:
            moved = res["udp"]["bytes_received"]
            out["gbit"] = moved * 8 / res["udp"]["seconds"] / 1e9
            out["loss"] = res["udp"]["lost_percent"]
        else:
            moved = res["bytes_sent"]
            out["gbit"] = moved * 8 / res["seconds"] / 1e9
        gbytes = moved / 1e9
        for name, cpu in used.items():
            out[f"{name} cpu"] = cpu / gbytes if gbytes else math.nan
        return out


def run_variant(
    v: Variant,
    pki_dir: Path,
    *,
    tests: list[str],
    seconds: float,
    udp_rates: list[str],
    udp_seconds: float,
    udp_length: int,
) -> dict[str, dict[str, float]]:
    """``{"tcp1 a->b": {...}, "udp 500M b->a": {...}, ...}``; a failed run gets ``{"error": 1}``."""
    runs: list[tuple[str, bool, dict[str, Any]]] = []
    for direction, reverse in DIRECTIONS:
        if "tcp1" in tests:
            runs.append((f"tcp1 {direction}", reverse, {"seconds": seconds}))
        if "tcp4" in tests:
            runs.append((f"tcp4 {direction}", reverse, {"seconds": seconds, "parallel": 4}))
        if "udp" in tests:
            for rate in udp_rates:
                kw = {"seconds": udp_seconds, "udp_rate": rate, "length": udp_length}
                runs.append((f"udp {rate} {direction}", reverse, kw))
    out: dict[str, dict[str, float]] = {}
    with Bed(v, pki_dir) as bed:
        for key, reverse, kw in runs:
            try:
                out[key] = bed.transfer(reverse, **kw)
            except HarnessError as e:
                print(f"    {key}: FAILED: {str(e).splitlines()[0]}", flush=True)
                out[key] = {"error": 1.0}
                continue
            r = out[key]
            loss = f", loss {r['loss']:.2f}%" if "loss" in r else ""
            cpu = ", ".join(f"{k} {x:.2f} s/GB" for k, x in r.items() if k.endswith(" cpu"))
            print(f"    {key}: {r['gbit']:.3f} Gbit/s{loss}{', ' + cpu if cpu else ''}", flush=True)
            time.sleep(0.3)
    return out


def baseline_variants(rev: str) -> list[Variant]:
    """This checkout's engine and REV's, each against itself and against tuned OpenVPN, plus the reference."""
    here, base = "pyovpn-offload", "pyovpn-baseline"
    return [
        Variant(REF, "openvpn", "openvpn", tuned=True),
        Variant("pyovpn <-> pyovpn", here, here),
        Variant(f"pyovpn@{rev} <-> pyovpn@{rev}", base, base),
        Variant("pyovpn client <-> OpenVPN server", "openvpn", here, tuned=True),
        Variant(f"pyovpn@{rev} client <-> OpenVPN server", "openvpn", base, tuned=True),
        Variant("OpenVPN client <-> pyovpn server", here, "openvpn", tuned=True),
        Variant(f"OpenVPN client <-> pyovpn@{rev} server", base, "openvpn", tuned=True),
    ]


def export_baseline(rev: str, into: Path) -> Path:
    """``git archive`` REV's src/ into ``into``; the directory to put on PYTHONPATH."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", rev, "src"], capture_output=True, check=False
    )
    if archive.returncode != 0:
        raise SystemExit(f"--baseline {rev}: git archive failed: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / "src"


def median_results(
    rounds: dict[str, list[dict[str, dict[str, float]]]],
) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, dict[str, tuple[float, float, int]]]]:
    """Per variant and run: the median of every figure over the rounds that did not fail, and
    (min, max, rounds counted) of Gbit/s; a run that failed in every round stays an error."""
    medians: dict[str, dict[str, dict[str, float]]] = {}
    spread: dict[str, dict[str, tuple[float, float, int]]] = {}
    for name, runs in rounds.items():
        keys = {k for r in runs for k in r}
        medians[name], spread[name] = {}, {}
        for key in sorted(keys):
            ok = [r[key] for r in runs if key in r and "error" not in r[key]]
            if not ok:
                medians[name][key] = {"error": 1.0}
                continue
            fields = set.intersection(*(set(r) for r in ok))
            medians[name][key] = {f: statistics.median(r[f] for r in ok) for f in fields}
            gbits = [r["gbit"] for r in ok]
            spread[name][key] = (min(gbits), max(gbits), len(ok))
    return medians, spread


def spread_table(spread: dict[str, dict[str, tuple[float, float, int]]], rounds: int) -> list[str]:
    lines = [
        f"Spread over {rounds} alternating rounds (Gbit/s, min-max, rounds that completed):",
        "",
        "| variant | run | min | max | rounds |",
        "|---|---|---:|---:|---:|",
    ]
    for name, runs in spread.items():
        for key, (lo, hi, n) in runs.items():
            lines.append(f"| {name} | {key} | {lo:.2f} | {hi:.2f} | {n}/{rounds} |")
    return lines


# ----------------------------------------------------------------------------- tables


def _fmt(r: dict[str, float] | None, field: str, spec: str = ".2f") -> str:
    if r is None:
        return "-"
    if "error" in r:
        return "fail"
    return format(r[field], spec) if field in r else "-"


def _cpu(r: dict[str, float] | None) -> str:
    if r is None or "error" in r or "server cpu" not in r:
        return "fail" if r is not None and "error" in r else "-"
    return f"{r['server cpu']:.2f} / {r['client cpu']:.2f}"


def _drops(r: dict[str, float] | None) -> str:
    return _fmt(r, "rx drops", ".1f")


def _ratio(r: dict[str, float] | None, ref: dict[str, float] | None) -> str:
    if not r or not ref or "error" in r or "error" in ref or not ref["gbit"]:
        return "-"
    return f"{r['gbit'] / ref['gbit']:.2f}"


def tcp_table(results: dict[str, dict[str, dict[str, float]]], test: str, ref_name: str) -> list[str]:
    ref = results.get(ref_name, {})
    lines = [
        f"| variant | a→b Gbit/s | b→a Gbit/s | ratio to {ref_name} (a→b / b→a) "
        "| CPU s/GB a→b (srv/cli) | CPU s/GB b→a (srv/cli) | receiver socket drops % (a→b / b→a) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        ab, ba = r.get(f"{test} a->b"), r.get(f"{test} b->a")
        if ab is None and ba is None:
            continue
        ratio = f"{_ratio(ab, ref.get(f'{test} a->b'))} / {_ratio(ba, ref.get(f'{test} b->a'))}"
        if not ref:
            ratio = "-"
        lines.append(
            f"| {name} | {_fmt(ab, 'gbit')} | {_fmt(ba, 'gbit')} | {ratio} | {_cpu(ab)} | {_cpu(ba)} "
            f"| {_drops(ab)} / {_drops(ba)} |"
        )
    return lines


def udp_table(results: dict[str, dict[str, dict[str, float]]], rates: list[str], ref_name: str) -> list[str]:
    ref = results.get(ref_name, {})
    lines = [
        f"| variant | offered | a→b Gbit/s (loss %) | b→a Gbit/s (loss %) | ratio to {ref_name} "
        "(a→b / b→a) | CPU s/GB a→b (srv/cli) | CPU s/GB b→a (srv/cli) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        for rate in rates:
            ab, ba = r.get(f"udp {rate} a->b"), r.get(f"udp {rate} b->a")
            if ab is None and ba is None:
                continue

            def cell(x: dict[str, float] | None) -> str:
                if x is None or "error" in x:
                    return _fmt(x, "gbit")
                return f"{x['gbit']:.2f} ({x['loss']:.1f})"

            ratio = (
                f"{_ratio(ab, ref.get(f'udp {rate} a->b'))} / {_ratio(ba, ref.get(f'udp {rate} b->a'))}"
                if ref
                else "-"
            )
            lines.append(f"| {name} | {rate} | {cell(ab)} | {cell(ba)} | {ratio} | {_cpu(ab)} | {_cpu(ba)} |")
    return lines


def tables(results: dict[str, dict[str, dict[str, float]]], args: argparse.Namespace, ref_name: str) -> str:
    parts: list[str] = []
    common = "P2P UDP/IPv4, AES-256-GCM, two namespaces over veth"
    cpu_note = (
        "CPU = user+system seconds of the VPN process (with its child processes) per GB that "
        "arrived (server / client). Receiver socket drops = tunnel datagrams that the receiving "
        "end's kernel dropped because that VPN process's UDP receive buffer was full (UdpRcvbufErrors)."
    )
    if "tcp1" in args.tests:
        parts += [
            f"One TCP stream, {args.seconds:.0f} s per direction, {common}.",
            cpu_note,
            "",
            *tcp_table(results, "tcp1", ref_name),
        ]
    if "tcp4" in args.tests:
        parts += [
            "",
            f"Four TCP streams (`iperf3 -P 4`), {args.seconds:.0f} s per direction, {common}.",
            "",
            *tcp_table(results, "tcp4", ref_name),
        ]
    if "udp" in args.tests:
        parts += [
            "",
            f"UDP at a fixed offered rate (`iperf3 -u -b RATE -l {args.udp_length}`), "
            f"{args.udp_seconds:.0f} s per rate and direction, {common}. Gbit/s = what arrived; "
            "loss % as the receiving iperf3 counted it.",
            "",
            *udp_table(results, args.udp_rates, ref_name),
        ]
    return "\n".join(parts).lstrip("\n")


# ----------------------------------------------------------------------------- plot


def plot(results: dict[str, dict[str, dict[str, float]]], args: argparse.Namespace, path: Path) -> bool:
    """Bar chart of Gbit/s per variant and direction, one panel per test; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(MATPLOTLIB_HINT, file=sys.stderr)
        return False
    panels: list[tuple[str, str]] = []
    if "tcp1" in args.tests:
        panels.append(("tcp1", "TCP, 1 stream"))
    if "tcp4" in args.tests:
        panels.append(("tcp4", "TCP, 4 streams"))
    if "udp" in args.tests:
        top = args.udp_rates[-1]
        panels.append((f"udp {top}", f"UDP offered {top}bit/s per direction (arrived)"))
    names = [n for n in results if not n.startswith("raw veth")]
    raw = next((r for n, r in results.items() if n.startswith("raw veth")), None)
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.2 * len(panels) + 1.2), squeeze=False)
    width = 0.38
    for ax, (test, title) in zip(axes[:, 0], panels, strict=True):
        for i, (direction, _) in enumerate(DIRECTIONS):
            vals = []
            for n in names:
                r = results[n].get(f"{test} {direction}")
                vals.append(r["gbit"] if r and "gbit" in r else 0.0)
            xs = [j + (i - 0.5) * width for j in range(len(names))]
            bars = ax.bar(xs, vals, width, label=direction.replace("->", "→"))
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
        if raw is not None:
            ceil = [raw.get(f"{test} {d}", {}).get("gbit") for d, _ in DIRECTIONS]
            if all(c is not None for c in ceil):
                title += f"  (raw veth, not drawn: {ceil[0]:.1f} / {ceil[1]:.1f} Gbit/s)"
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("Gbit/s")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([_short(n) for n in names], fontsize=7)
        ax.margins(y=0.15)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"bench/throughput.py, {time.strftime('%Y-%m-%d')}, AES-256-GCM P2P over veth", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot written to {path}")
    return True


def _short(name: str) -> str:
    """Two-line axis label for a variant name."""
    name = name.replace("OpenVPN 2.6 <-> OpenVPN 2.6", "OpenVPN <-> OpenVPN")
    if " <-> " in name:
        a, b = name.split(" <-> ", 1)
        return f"{a} <->\n{b}"
    return name


# ----------------------------------------------------------------------------- profile


def _frame_name(frame: str) -> str:
    """``func (path/file.py:123)`` -> ``func (file.py)``: self time summed over line numbers."""
    m = re.fullmatch(r"(.*) \((.*?)(?::\d+)?\)", frame)
    if not m:
        return frame
    return f"{m.group(1)} ({Path(m.group(2)).name})"


def summarize_profile(
    raw_path: Path, roles: dict[int, str] | None = None
) -> tuple[int, Counter[str], dict[str, Counter[str]]]:
    """Parse py-spy ``--format raw`` output: total samples, self samples per frame, per process.

    ``roles`` names known pids (daemon, controller); an engine worker is named by what its
    samples show it doing: reading the TUN (send side) or the UDP socket (receive side).
    """
    total = 0
    by_frame: Counter[str] = Counter()
    by_pid: dict[int, Counter[str]] = defaultdict(Counter)
    evidence: dict[int, Counter[str]] = defaultdict(Counter)
    for line in raw_path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        leaf = _frame_name(stack.rsplit(";", 1)[-1])
        by_frame[leaf] += n
        # process frames: `process PID:"cmdline"`, outermost first; the innermost is the sampled one
        pids = re.findall(r'(?:^|;)process (\d+):"', stack)
        pid = int(pids[-1]) if pids else 0
        by_pid[pid][leaf] += n
        if "_on_tun " in stack:
            evidence[pid]["send"] += n
        if "_on_udp " in stack or "_rx_datagrams " in stack:
            evidence[pid]["receive"] += n
    names = dict(roles or {})
    by_proc: dict[str, Counter[str]] = {name: Counter() for name in names.values()}
    for pid, c in by_pid.items():
        name = names.get(pid)
        if name is None:
            side = evidence[pid].most_common(1)
            if side and side[0][0] == "send":
                name = f"engine worker (pid {pid}): TUN -> segment -> encrypt -> UDP (send side)"
            elif side:
                name = f"engine worker (pid {pid}): UDP -> decrypt -> GRO -> TUN (receive side)"
            else:
                name = f"process {pid}"
        by_proc.setdefault(name, Counter()).update(c)
    return total, by_frame, by_proc


def profile_text(
    direction: str,
    gbit: float,
    total: int,
    by_frame: Counter[str],
    by_proc: dict[str, Counter[str]],
    top: int,
) -> str:
    lines = [
        f"**{direction}** ({gbit:.2f} Gbit/s while sampled; {total} samples of non-idle threads)",
        "",
        "| # | function (file) | self % |",
        "|---:|---|---:|",
    ]
    total = max(total, 1)
    for i, (frame, n) in enumerate(by_frame.most_common(top), 1):
        lines.append(f"| {i} | `{frame}` | {100 * n / total:.1f} |")
    lines += ["", "Per process (share of all samples; its top 3 frames):", ""]
    for role, c in sorted(by_proc.items(), key=lambda kv: -sum(kv[1].values())):
        share = 100 * sum(c.values()) / total
        tops = ", ".join(f"`{f}` {100 * n / total:.1f}%" for f, n in c.most_common(3))
        lines.append(f"- {role}: {share:.1f}%" + (f" — {tops}" if tops else " (idle: no samples)"))
    return "\n".join(lines)


def run_profile(args: argparse.Namespace, tmp: Path) -> str:
    spy = shutil.which("py-spy")
    if spy is None:
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    v = next(x for x in VARIANTS if x.name == PROFILE_VARIANT)
    parts = [
        f"py-spy {subprocess.run([spy, '--version'], capture_output=True, text=True).stdout.split()[-1]} "
        f"(`record --subprocesses --rate {args.profile_rate} --format raw"
        f"{' --native' if args.profile_native else ' --nonblocking'}`) on the pyovpn "
        f"client (offload engine: daemon, controller and two workers) of `{PROFILE_VARIANT}` "
        f"(OpenVPN tuned), one TCP stream, {args.seconds:.0f} s per direction. "
        + (
            "Self time = samples whose innermost frame, C frames included, is that function."
            if args.profile_native
            else "Self time = samples whose innermost Python frame is that function (time in C code "
            "it calls, e.g. OpenSSL via `cryptography`, numpy, syscalls, counts to the calling Python "
            "function)."
        ),
    ]
    with Bed(v, tmp / "pki-profile") as bed:
        client_pid = dict(bed.procs)["client"]
        roles = {client_pid: "pyovpn daemon (control plane, asyncio)"}
        for pid in _pids(client_pid)[1:]:
            if Path(f"/proc/{pid}/cmdline").read_bytes().find(b"pyovpn.datachannel.engine") < 0:
                continue
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == client_pid:
                roles[pid] = "engine controller"
        for direction, reverse in DIRECTIONS:
            what = "pyovpn sends" if not reverse else "pyovpn receives"
            raw = tmp / f"profile-{direction.replace('>', '')}.txt"
            spy_argv = [
                spy,
                "record",
                "--subprocesses",
                # py-spy cannot read native stacks without pausing the process
                *([] if args.profile_native else ["--nonblocking"]),
                "--rate",
                str(args.profile_rate),
                "--format",
                "raw",
                "--duration",
                str(int(args.seconds)),
                "-o",
                str(raw),
                "--pid",
                str(client_pid),
                *(["--native"] if args.profile_native else []),
            ]
            print(f"profiling {direction} ({what}): {' '.join(spy_argv)}", flush=True)
            spy_proc = subprocess.Popen(spy_argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            time.sleep(0.5)
            try:
                r = bed.transfer(reverse, seconds=args.seconds)
            finally:
                out, _ = spy_proc.communicate(timeout=args.seconds + 60)
            if not raw.exists():
                raise SystemExit(f"py-spy wrote no profile:\n{out}")
            if args.profile_keep:
                keep = Path(args.profile_keep) / raw.name
                keep.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(raw, keep)
                print(f"raw py-spy samples kept in {keep}")
            total, by_frame, by_proc = summarize_profile(raw, roles)
            text = profile_text(
                f"{direction} ({what})", r["gbit"], total, by_frame, by_proc, args.profile_top
            )
            print(text, flush=True)
            parts += ["", text]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- docs


def _machine() -> str:
    try:
        openvpn = subprocess.run(
            ["openvpn", "--version"], capture_output=True, text=True
        ).stdout.splitlines()[0]
    except (OSError, IndexError):
        openvpn = "openvpn: not found"
    load = os.getloadavg()
    return (
        f"Machine: {os.cpu_count()} vCPU, Linux {platform.release()}, Python {platform.python_version()}, "
        f"{openvpn.split(' [')[0]}; load average at the start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}"
    )


def write_doc(
    text: str, command: str, *, begin: str, end: str, title: str, note: str = "", machine: str = ""
) -> None:
    doc = ROOT / "docs" / "BENCHMARKS.md"
    content = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = (
        f"{begin}\n## {title}\n\n{note}"
        f"Command: `{command}`  \n"
        f"{machine or _machine()}  \nDate: {time.strftime('%Y-%m-%d')}\n\n"
        f"{text}\n{end}"
    )
    if begin in content:
        content = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, content, flags=re.S)
    else:
        content = content.rstrip() + "\n\n" + block + "\n"
    doc.write_text(content)
    print(f"{doc} updated ({title})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="per TCP run and direction (default 5)")
    ap.add_argument(
        "--tests",
        default=None,
        help=f"comma-separated subset of {','.join(ALL_TESTS)} (default: all; --guest: tcp1)",
    )
    ap.add_argument("--udp-rates", default="200M,500M,1000M", help="offered UDP rates (iperf3 -b)")
    ap.add_argument("--udp-seconds", type=float, default=3.0, help="per UDP rate and direction (default 3)")
    ap.add_argument(
        "--udp-length", type=int, default=1400, help="UDP datagram size, iperf3 -l (default 1400)"
    )
    ap.add_argument(
        "--variants",
        choices=("default", "all"),
        default="default",
        help="all: also the in-process userspace data channel (userspace-engine inprocess)",
    )
    ap.add_argument(
        "--only", help="substring filter on variant names; several, comma-separated, keep any that matches"
    )
    ap.add_argument(
        "--rounds", type=int, default=1, help="run the variants N times in alternating order; report medians"
    )
    ap.add_argument(
        "--baseline",
        metavar="REV",
        help="compare with the pyovpn of an earlier git commit, side by side (its src/ via git archive)",
    )
    ap.add_argument(
        "--write", action="store_true", help="update docs/BENCHMARKS.md (and docs/throughput.png)"
    )
    ap.add_argument(
        "--plot", metavar="PNG", help=f"write the bar chart here (--write: {PLOT_PATH.relative_to(ROOT)})"
    )
    ap.add_argument(
        "--guest", action="store_true", help="kernel DCO variants (run inside scripts/guest/run.sh)"
    )
    ap.add_argument(
        "--pyovpn-line",
        action="append",
        default=[],
        metavar="LINE",
        help="a config line for every pyovpn end, e.g. 'shaper 30000000' (repeatable)",
    )
    ap.add_argument("--profile", action="store_true", help="py-spy profile of pyovpn instead of the tables")
    ap.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second (default 100)")
    ap.add_argument("--profile-top", type=int, default=12, help="frames to list (default 12)")
    ap.add_argument("--profile-keep", metavar="DIR", help="keep the raw py-spy samples in DIR")
    ap.add_argument(
        "--profile-native", action="store_true", help="py-spy --native: C frames too (slower sampling)"
    )
    args = ap.parse_args()
    tests = (args.tests or ("tcp1" if args.guest else ",".join(ALL_TESTS))).split(",")
    bad = [t for t in tests if t not in ALL_TESTS]
    if bad:
        ap.error(f"--tests: unknown {','.join(bad)}; choose from {','.join(ALL_TESTS)}")
    args.tests = tests
    args.udp_rates = [r.strip() for r in args.udp_rates.split(",") if r.strip()]
    if os.geteuid() != 0:
        print("bench/throughput.py needs root (network namespaces)", file=sys.stderr)
        return 1
    machine = _machine()  # the load before this run starts
    print(machine, flush=True)
    command = "sudo python3 bench/throughput.py " + " ".join(sys.argv[1:])
    if args.guest:
        command = f"sudo scripts/guest/run.sh -- python3 bench/throughput.py {' '.join(sys.argv[1:])}"
    if args.profile:
        with tempfile.TemporaryDirectory() as tmp:
            text = run_profile(args, Path(tmp))
        if args.write:
            write_doc(
                text,
                command,
                begin=PROFILE_BEGIN,
                end=PROFILE_END,
                title="Where the time goes (bench/throughput.py --profile)",
                machine=machine,
            )
        return 0
    if args.write and not args.guest and (args.only or args.variants != "default"):
        print("note: --write with --only/--variants replaces the whole table with this subset", flush=True)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    started = time.monotonic()
    per_round: dict[str, list[dict[str, dict[str, float]]]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        PYOVPN_LINES[:] = args.pyovpn_line
        if args.baseline:
            global BASELINE_SRC
            BASELINE_SRC = export_baseline(args.baseline, Path(tmp))
            variants = baseline_variants(args.baseline)
        else:
            variants = GUEST_VARIANTS if args.guest else VARIANTS
        chosen = [
            v
            for v in variants
            if not (args.only and not any(o in v.name for o in args.only.split(",")))
            and (args.guest or args.only or args.baseline or args.variants != "default" or v.default)
        ]
        for rnd in range(args.rounds):
            # alternate the order, so drift in the machine's load does not favour one variant
            order = chosen if rnd % 2 == 0 else chosen[::-1]
            for v in order:
                label = f" (round {rnd + 1}/{args.rounds})" if args.rounds > 1 else ""
                print(f"running: {v.name}{label}", flush=True)
                try:
                    per_round[v.name].append(
                        run_variant(
                            v,
                            Path(tmp) / f"{v.name.replace(' ', '_')}-{rnd}",
                            tests=args.tests,
                            seconds=args.seconds,
                            udp_rates=args.udp_rates,
                            udp_seconds=args.udp_seconds,
                            udp_length=args.udp_length,
                        )
                    )
                except HarnessError as e:
                    print(f"    variant FAILED: {e}", flush=True)
    # keep the variants' own order in the tables
    results, spread = median_results({v.name: per_round[v.name] for v in chosen if per_round[v.name]})
    print(f"(ran {time.monotonic() - started:.0f} s)")
    ref = GUEST_REF if args.guest else REF
    text = tables(results, args, ref)
    if args.rounds > 1:
        text = (
            f"Medians of {args.rounds} rounds, variants alternating in order.\n\n"
            + text
            + "\n\n"
            + "\n".join(spread_table(spread, args.rounds))
        )
    print(text)
    default_plot = args.write and not args.guest and not args.baseline
    plot_path = Path(args.plot) if args.plot else (PLOT_PATH if default_plot else None)
    plotted = plot(results, args, plot_path) if plot_path else False
    if args.write:
        if plotted and plot_path is not None and plot_path.resolve().parent == (ROOT / "docs").resolve():
            text += f"\n\n![Gbit/s per variant and direction]({plot_path.name})\n"
        elif not plotted and default_plot:
            text += "\n\n(No plot: matplotlib was not installed; `pip install -e '.[bench]'`.)\n"
        if args.baseline:
            write_doc(
                text,
                command,
                begin=BASELINE_BEGIN,
                end=BASELINE_END,
                title=f"This checkout against {args.baseline}, side by side (bench/throughput.py --baseline)",
                machine=machine,
            )
        elif args.guest:
            write_doc(
                text,
                command,
                begin=GUEST_BEGIN,
                end=GUEST_END,
                title="Kernel DCO in the qemu guest (bench/throughput.py --guest)",
                note="The guest runs under TCG emulation (this machine's /dev/kvm cannot run a stock "
                "kernel), so only ratios within this table mean anything.\n\n",
                machine=machine,
            )
        else:
            write_doc(
                text,
                command,
                begin=MARK_BEGIN,
                end=MARK_END,
                title="Throughput (bench/throughput.py)",
                machine=machine,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
