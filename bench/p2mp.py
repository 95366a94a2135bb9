#!/usr/bin/env python3
"""P2MP server benchmark: connect time, memory per client and idle CPU of pyovpn vs stock OpenVPN 2.6.

Needs root (network namespaces). For each server it builds a fresh namespace pair joined by a
veth (server in ``b``, the load generator in ``a``), starts the server with the same config
(UDP, tls-crypt, ``server 10.80.0.0 255.255.0.0``, ``topology subnet``, ``duplicate-cn``,
``max-clients``, ``keepalive 10 60``; stock OpenVPN with ``disable-dco``, pyovpn with
``dco userspace``) and then runs ``python -m pyovpn.tools.loadgen`` (the same generator for
both) to connect ``-n`` simulated pull clients sharing one client certificate and offering
the TLS groups of a stock OpenVPN 2.6 client on OpenSSL 3.0 (so neither server gets the
costlier hybrid post-quantum key exchange that pyovpn's newer OpenSSL would otherwise pick):

* connect time: first client start until the last client's TunnelUp, plus per-client
  connect-time percentiles (loadgen concurrency ``--concurrency`` handshakes at once);
* memory per client: (server RSS with N clients connected, after ``--settle`` s) minus
  (RSS with 0 clients, before the load generator started), divided by N;
* idle CPU: the server's user+system CPU over ``--idle`` s while the N clients sit idle
  sending keepalive pings every 10 s, as a percentage of one CPU.

Both servers run their stock settings otherwise. (OpenVPN's ``connect-freq-initial 100 10``
default only counts reset packets that do not become sessions, so it does not slow down
legitimate clients.) Each server is measured ``--repeat`` times, alternating, each time on a
fresh server; the table shows medians, the connect time also as min-max.

Prints a Markdown table with ratios (pyovpn / OpenVPN) and writes it into docs/BENCHMARKS.md
between ``<!-- bench/p2mp.py:begin -->`` and ``<!-- bench/p2mp.py:end -->`` (``--no-write``
to skip). ``--engine`` adds pyovpn with ``userspace-engine multiprocess`` (the server on the
multi-process engine; by default it runs on the in-process plane). ``--baseline REV`` adds
the pyovpn server of an earlier commit (its src/ via ``git archive``), with ``--engine`` on
both planes. With either, the table is only printed::

    sudo python3 bench/p2mp.py            # 1000 clients, 30 s idle, 3 rounds
    sudo python3 bench/p2mp.py -n 50 --idle 10 --repeat 1 --no-write
    sudo python3 bench/p2mp.py --baseline 196103e
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from bench.throughput import export_baseline, udp_rcvbuf_errors  # noqa: E402
from tests.netns.harness import Netns, Proc, wait_listening  # noqa: E402

from pyovpn.tools.pki import Pki, make_pki  # noqa: E402

MARK_BEGIN = "<!-- bench/p2mp.py:begin -->"
MARK_END = "<!-- bench/p2mp.py:end -->"
PORT = 1194
EXIT_WAIT = 15.0
EXIT_LINE = {"pyovpn": "client disconnected: peer sent exit notification", "openvpn": "CC-EEN exit message"}
CIPHERS = "AES-256-GCM:AES-128-GCM:CHACHA20-POLY1305"
CLIENT_GROUPS = "X25519:prime256v1:X448:secp521r1:secp384r1"


@dataclass
class Variant:
    name: str
    impl: str  # "openvpn" | "pyovpn" | "pyovpn-baseline" (--baseline REV)
    extra: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        """Whose log lines to look for: "openvpn" or "pyovpn"."""
        return "openvpn" if self.impl == "openvpn" else "pyovpn"


BASELINE_SRC: Path | None = None  # --baseline: the earlier commit's src/


@dataclass
class Measurement:
    n: int
    connected: int = 0
    failed: int = 0
    connect_seconds: float = float("nan")  # first start -> last TunnelUp
    settle_seconds: float = float("nan")
    p50: float | None = None
    p99: float | None = None
    connect_cpu_s: float = float("nan")  # server CPU during the connect phase
    loadgen_connect_cpu_s: float = float("nan")
    rss0_kib: float = float("nan")
    rssn_kib: float = float("nan")
    rss_end_kib: float = float("nan")
    rss0_parts: dict[str, float] = field(default_factory=dict)  # RSS by role (see rss_by_role)
    rssn_parts: dict[str, float] = field(default_factory=dict)
    idle_cpu_pct: float = float("nan")
    idle_seconds: float = 0.0
    loadgen_idle_cpu_pct: float = float("nan")
    lg: dict[str, object] = field(default_factory=dict)
    server_notes: list[str] = field(default_factory=list)
    server_rcvbuf_errors: int = 0  # UDP datagrams the server's kernel dropped (socket buffer full)
    loadgen_rcvbuf_errors: int = 0  # the same on the load generator's side
    exits_seen: int = 0  # clients the server dropped on their EXIT within EXIT_WAIT s of the loadgen stop

    @property
    def kib_per_client(self) -> float:
        return (self.rssn_kib - self.rss0_kib) / self.connected if self.connected else float("nan")


# ---------------------------------------------------------------------------- /proc


def _tree(pid: int) -> list[int]:
    """A process and its descendants."""
    out = [pid]
    for child in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids = child.read_text().split()
        except OSError:
            continue
        for c in kids:
            out += _tree(int(c))
    return out


def rss_kib(pid: int) -> float:
    total = 0
    for p in _tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return float(total)


def rss_by_role(pid: int) -> dict[str, float]:
    """RSS (KiB) of a server's processes by what they are: the server, the engine's controller
    and workers (the engine is ``python -m pyovpn.datachannel.engine``, its workers its children)."""
    out: dict[str, float] = {}
    engine = -1
    for p in _tree(pid):
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes()
            ppid = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
            kib = next(
                int(line.split()[1])
                for line in Path(f"/proc/{p}/status").read_text().splitlines()
                if line.startswith("VmRSS:")
            )
        except (OSError, StopIteration, ValueError):
            continue
        if b"pyovpn.datachannel.engine" in cmd and ppid != engine:
            engine, role = p, "engine controller"
        elif ppid == engine:
            role = "engine workers"
        else:
            role = "server"
        out[role] = out.get(role, 0.0) + kib
    return out


def cpu_seconds(pid: int) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in _tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def rss_steady(pid: int, samples: int = 5, interval: float = 0.2) -> float:
    vals = []
    for _ in range(samples):
        vals.append(rss_kib(pid))
        time.sleep(interval)
    return statistics.median(vals)


# ---------------------------------------------------------------------------- configs


def server_conf(pki: Pki, variant: Variant, n: int, local: str) -> str:
    lines = [
        f"# {variant.name}, generated by bench/p2mp.py",
        "dev tun0",
        "proto udp",
        f"local {local}",
        f"port {PORT}",
        "server 10.80.0.0 255.255.0.0",
        "topology subnet",
        f"ca {pki.ca_crt}",
        f"cert {pki.server_crt}",
        f"key {pki.server_key}",
        "dh none",
        f"tls-crypt {pki.tc_key}",
        "duplicate-cn",
        f"max-clients {n + 50}",
        "keepalive 10 60",
        f"data-ciphers {CIPHERS}",
        "verb 3",
        "disable-dco" if variant.impl == "openvpn" else "dco userspace",
        *variant.extra,
    ]
    return "\n".join(lines) + "\n"


def client_conf(pki: Pki, remote: str) -> str:
    lines = [
        "client",
        "dev tun",
        "proto udp",
        f"remote {remote} {PORT}",
        "nobind",
        f"ca {pki.ca_crt}",
        f"cert {pki.client_crt}",
        f"key {pki.client_key}",
        f"tls-crypt {pki.tc_key}",
        "remote-cert-tls server",
        f"data-ciphers {CIPHERS}",
        # what a stock OpenVPN 2.6 client on OpenSSL 3.0 offers (one X25519 key share), so both
        # servers do the same key exchange; left to its own OpenSSL, the load generator offers
        # the hybrid post-quantum X25519MLKEM768 too, which pyovpn's server would pick and
        # OpenSSL 3.0 in stock OpenVPN cannot
        f"tls-groups {CLIENT_GROUPS}",
        "verb 3",
    ]
    return "\n".join(lines) + "\n"


def server_argv(impl: str, conf: Path) -> list[str]:
    if impl == "openvpn":
        return ["openvpn", "--config", str(conf)]
    # PYTHONPATH names the pyovpn to run, so an installed one elsewhere never stands in for it
    src = BASELINE_SRC if impl == "pyovpn-baseline" else ROOT / "src"
    return ["env", f"PYTHONPATH={src}", sys.executable, "-m", "pyovpn", "--config", str(conf)]


# ---------------------------------------------------------------------------- one run


def _json_line(proc: Proc, tag: str, timeout: float) -> dict[str, object]:
    m = proc.wait_for_line(rf"{tag} (\{{.*\}})\n", timeout)
    return json.loads(m.group(1))


def _server_notes(impl: str, text: str) -> list[str]:
    notes = []
    checks = {
        "pyovpn": [
            ("Traceback", "tracebacks"),
            ("new client session", "sessions created"),
            ("client disconnected", "disconnects"),
            ("session closed", "sessions closed"),
            ("Inactivity timeout", "inactivity timeouts"),
            ("data channel error", "data channel errors"),
            ("max-clients reached", "refused (max-clients)"),
        ],
        "openvpn": [
            ("Peer Connection Initiated", "sessions created"),
            ("Inactivity timeout", "inactivity timeouts"),
            ("TLS Error", "TLS errors"),
            ("MAX_CLIENTS", "refused (max-clients)"),
        ],
    }[impl]
    for needle, label in checks:
        count = text.count(needle)
        if count:
            notes.append(f"{label}: {count}")
    return notes


def run_variant(
    variant: Variant, pki: Pki, workdir: Path, n: int, concurrency: int, settle: float, idle: float
) -> Measurement:
    m = Measurement(n=n)
    with Netns(workdir / "net") as net:
        sconf = workdir / "server.conf"
        cconf = workdir / "client.conf"
        sconf.write_text(server_conf(pki, variant, n, net.outer("b", 4)))
        cconf.write_text(client_conf(pki, net.outer("b", 4)))
        server = net.spawn("b", server_argv(variant.impl, sconf), f"server-{variant.impl}")
        wait_listening(net.b, "udp", PORT, timeout=20, proc=server)
        time.sleep(2.0)  # let the server finish starting up before the 0-client baseline
        m.rss0_kib = rss_steady(server.pid)
        m.rss0_parts = rss_by_role(server.pid)
        cpu0 = cpu_seconds(server.pid)
        lg_argv = [sys.executable, "-m", "pyovpn.tools.loadgen", "--config", str(cconf)]
        lg_argv += ["-n", str(n), "--concurrency", str(concurrency), "--hold", "inf"]
        loadgen = net.spawn("a", lg_argv, "loadgen", cwd=ROOT)
        settled = _json_line(loadgen, "LOADGEN SETTLED", timeout=120 + n * 1.0)
        m.connect_cpu_s = cpu_seconds(server.pid) - cpu0
        m.loadgen_connect_cpu_s = float(settled["connect_cpu_seconds"])  # type: ignore[arg-type]
        m.connected = int(settled["connected"])  # type: ignore[call-overload]
        m.failed = int(settled["failed"])  # type: ignore[call-overload]
        m.connect_seconds = float(settled["total_seconds"])  # type: ignore[arg-type]
        m.settle_seconds = float(settled["settle_seconds"])  # type: ignore[arg-type]
        m.p50 = settled["connect_p50"]  # type: ignore[assignment]
        m.p99 = settled["connect_p99"]  # type: ignore[assignment]
        print(f"    settled: {json.dumps(settled)}", flush=True)
        time.sleep(settle)
        m.rssn_kib = rss_steady(server.pid)
        m.rssn_parts = rss_by_role(server.pid)
        s_cpu, l_cpu, t = cpu_seconds(server.pid), cpu_seconds(loadgen.pid), time.monotonic()
        time.sleep(idle)
        wall = time.monotonic() - t
        m.idle_seconds = wall
        m.idle_cpu_pct = 100.0 * (cpu_seconds(server.pid) - s_cpu) / wall
        m.loadgen_idle_cpu_pct = 100.0 * (cpu_seconds(loadgen.pid) - l_cpu) / wall
        m.rss_end_kib = rss_steady(server.pid)
        m.server_rcvbuf_errors = udp_rcvbuf_errors(net.b)
        m.loadgen_rcvbuf_errors = udp_rcvbuf_errors(net.a)
        m.server_notes = _server_notes(variant.kind, server.text())
        mark = server.mark()
        loadgen.stop(timeout=30)
        try:
            m.lg = _json_line(loadgen, "LOADGEN RESULT", timeout=1)
        except Exception as exc:
            m.lg = {"error": str(exc)}
        deadline = time.monotonic() + EXIT_WAIT
        while time.monotonic() < deadline:
            m.exits_seen = server.text()[mark:].count(EXIT_LINE[variant.kind])
            if m.exits_seen >= m.connected:
                break
            time.sleep(0.5)
        server.stop(timeout=10)
        # keep the logs of this run next to the results
        for p in (server, loadgen):
            if p.log_path.exists():
                (workdir / p.log_path.name).write_bytes(p.log_path.read_bytes())
    return m


# ---------------------------------------------------------------------------- report


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or not b or a != a or b != b:
        return "-"
    return f"{a / b:.2f}x"


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None and v == v]
    return statistics.median(present) if present else None


@dataclass
class Summary:
    """The medians over a variant's rounds."""

    runs: list[Measurement]

    def med(self, attr: str) -> float | None:
        return _median([getattr(m, attr) for m in self.runs])

    @property
    def n(self) -> int:
        return self.runs[0].n


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def table(results: dict[str, Summary], n: int, idle: float, concurrency: int) -> str:
    rounds = max(len(s.runs) for s in results.values())
    lines = [
        f"{n} simulated pull clients (`pyovpn.tools.loadgen`, one process, {concurrency} handshakes "
        "in flight), UDP/IPv4, tls-crypt, TLS 1.3 with EC P-256 certificates, AES-256-GCM, two "
        "namespaces over veth. Same server config for both: `server 10.80.0.0 255.255.0.0`, "
        "`topology subnet`, `duplicate-cn`, `max-clients`, `keepalive 10 60`, `verb 3`; stock "
        "OpenVPN with `disable-dco`, pyovpn with `dco userspace`. The clients offer "
        f"`tls-groups {CLIENT_GROUPS}` (as a stock OpenVPN 2.6 client on OpenSSL 3.0 does), so "
        "both servers do an X25519 key exchange. Medians of "
        f"{rounds} round(s) per server, each on a fresh server.",
        "",
        "Connect = first client start to last TunnelUp (min-max over rounds); per-client p50/p99 = "
        "start to TunnelUp. Memory = (server RSS with all clients connected - RSS with none) / "
        f"clients. Idle CPU = server user+system CPU over {idle:.0f} s while the clients send a "
        "keepalive ping every 10 s (100% = one core).",
        "",
        "| server | connected | connect all (s) | p50 / p99 (ms) | server CPU s for the connects "
        "| RSS 0 → N (MiB) | KiB per client | idle CPU % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in results.items():
        conn = [m.connect_seconds for m in s.runs]
        span = f" ({min(conn):.1f}-{max(conn):.1f})" if len(conn) > 1 else ""
        rss0, rssn = s.med("rss0_kib"), s.med("rssn_kib")
        lines.append(
            f"| {name} | {_f(s.med('connected'), '.0f')}/{s.n} | {_f(s.med('connect_seconds'), '.1f')}{span} "
            f"| {_ms(s.med('p50'))} / {_ms(s.med('p99'))} | {_f(s.med('connect_cpu_s'), '.2f')} "
            f"| {_f(rss0 and rss0 / 1024, '.1f')} → {_f(rssn and rssn / 1024, '.1f')} "
            f"| {_f(s.med('kib_per_client'), '.1f')} | {_f(s.med('idle_cpu_pct'), '.2f')} |"
        )
    ref = next((s for k, s in results.items() if k.startswith("OpenVPN")), None)
    py = next((s for k, s in results.items() if k.startswith("pyovpn")), None)
    if ref is not None and py is not None:

        def r(attr: str) -> str:
            return _ratio(py.med(attr), ref.med(attr))

        lines.append(
            f"| **ratio pyovpn / OpenVPN** | | **{r('connect_seconds')}** | {r('p50')} / {r('p99')} "
            f"| **{r('connect_cpu_s')}** | | **{r('kib_per_client')}** | **{r('idle_cpu_pct')}** |"
        )
    lines.append("")
    for name, s in results.items():
        for i, m in enumerate(s.runs, 1):
            lg = m.lg
            notes = ", ".join(m.server_notes) or "-"
            busy = m.loadgen_connect_cpu_s / m.connect_seconds if m.connect_seconds else 0.0
            lines.append(
                f"- {name}, round {i}: connect {m.connect_seconds:.1f} s, p99 {_ms(m.p99)} ms; "
                f"server log: {notes}; UDP receive-buffer drops: server {m.server_rcvbuf_errors}, "
                f"load generator {m.loadgen_rcvbuf_errors}; "
                f"load generator CPU during the connects {m.loadgen_connect_cpu_s:.1f} s "
                f"({100 * busy:.0f}% of one core); while idle: pings sent {lg.get('pings_sent')}, "
                f"data packets received {lg.get('data_received')} (undecryptable {lg.get('data_bad')}), "
                f"sessions that ended {lg.get('closed_after_up')}, clients silent for a whole "
                f"ping-restart {lg.get('silent_at_end')}; RSS after the idle window "
                f"{m.rss_end_kib / 1024:.1f} MiB; {_parts(m)}"
                f"EXITs acted on within {EXIT_WAIT:.0f} s of closing "
                f"all clients at once: {m.exits_seen}/{m.connected}."
            )
    return "\n".join(lines)


def _parts(m: Measurement) -> str:
    """Per-client memory by process, where the server has more than one."""
    if len(m.rssn_parts) < 2 or not m.connected:
        return ""
    base, n = m.rss0_parts, m.connected
    shares = ", ".join(f"{role} {(kib - base.get(role, 0.0)) / n:.1f}" for role, kib in m.rssn_parts.items())
    return f"KiB per client by process: {shares}; "


def write_doc(text: str, command: str) -> None:
    doc = ROOT / "docs" / "BENCHMARKS.md"
    content = doc.read_text() if doc.exists() else "# Benchmarks\n"
    openvpn = subprocess.run(["openvpn", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    block = (
        f"{MARK_BEGIN}\n## P2MP server: many clients (bench/p2mp.py)\n\n"
        f"Command (as root, from the repository root): `{command}`  \n"
        f"Machine: {os.cpu_count()} vCPU, Linux {platform.release()}, Python {platform.python_version()}, "
        f"{openvpn.split(' [')[0]}  \nDate: {time.strftime('%Y-%m-%d')}\n\n"
        f"{text}\n{MARK_END}"
    )
    if MARK_BEGIN in content:
        content = re.sub(
            re.escape(MARK_BEGIN) + ".*?" + re.escape(MARK_END), lambda _: block, content, flags=re.S
        )
    else:
        content = content.rstrip() + "\n\n" + block + "\n"
    doc.write_text(content)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--clients", type=int, default=1000, help="simulated clients (default 1000)")
    ap.add_argument("--idle", type=float, default=30.0, help="idle CPU window in seconds (default 30)")
    ap.add_argument("--settle", type=float, default=5.0, help="wait after connecting before measuring")
    ap.add_argument("--concurrency", type=int, default=50, help="loadgen handshakes in flight (default 50)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds per server, medians reported (default 3)")
    ap.add_argument("--only", choices=["openvpn", "pyovpn"], help="run one server only")
    ap.add_argument("--no-write", action="store_true", help="do not update docs/BENCHMARKS.md")
    ap.add_argument("--keep", metavar="DIR", help="keep configs and logs in DIR")
    ap.add_argument(
        "--engine", action="store_true", help="also run pyovpn with userspace-engine multiprocess"
    )
    ap.add_argument(
        "--baseline",
        metavar="REV",
        help="also run the pyovpn server of an earlier git commit in the same rounds (printed, not written)",
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/p2mp.py needs root (network namespaces)", file=sys.stderr)
        return 1
    n = args.clients
    variants = [
        Variant("OpenVPN 2.6.14 (userspace, disable-dco)", "openvpn"),
        Variant("pyovpn (userspace data channel)", "pyovpn"),
    ]
    if args.only:
        variants = [v for v in variants if v.impl == args.only]
    if args.engine and args.only != "openvpn":
        variants.append(Variant("pyovpn (multi-process engine)", "pyovpn", ["userspace-engine multiprocess"]))
    if args.baseline:
        variants.append(Variant(f"pyovpn@{args.baseline} (userspace data channel)", "pyovpn-baseline"))
        if args.engine:  # the engine of the earlier commit too: what a change to it did
            variants.append(
                Variant(
                    f"pyovpn@{args.baseline} (multi-process engine)",
                    "pyovpn-baseline",
                    ["userspace-engine multiprocess"],
                )
            )
    results: dict[str, Summary] = {v.name: Summary([]) for v in variants}
    keep = Path(args.keep) if args.keep else None
    with tempfile.TemporaryDirectory(prefix="pov-p2mp-") as tmp:
        base = keep or Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        if args.baseline:
            global BASELINE_SRC
            BASELINE_SRC = export_baseline(args.baseline, base)
        pki = make_pki(base / "pki")
        for rnd in range(1, args.repeat + 1):
            for v in variants:  # alternate, so slow drift of the host's load hits both alike
                print(f"round {rnd}/{args.repeat}: {v.name} with {n} clients", flush=True)
                workdir = base / f"{rnd}-{v.impl}{'-' + str(variants.index(v)) if v.extra else ''}"
                workdir.mkdir(exist_ok=True)
                m = run_variant(v, pki, workdir, n, args.concurrency, args.settle, args.idle)
                results[v.name].runs.append(m)
                print(
                    f"    connected {m.connected}/{n} in {m.connect_seconds:.1f} s (p99 {_ms(m.p99)} ms), "
                    f"server CPU {m.connect_cpu_s:.2f} s, {m.kib_per_client:.1f} KiB/client, "
                    f"idle CPU {m.idle_cpu_pct:.2f} %, rcvbuf drops {m.server_rcvbuf_errors}, "
                    f"EXITs {m.exits_seen}, notes: {m.server_notes}",
                    flush=True,
                )
    text = table(results, n, args.idle, args.concurrency)
    print()
    print(text)
    if not args.no_write and not args.baseline and not args.engine:
        prefix = "sudo " if os.environ.get("SUDO_USER") else ""
        write_doc(text, (f"{prefix}python3 bench/p2mp.py " + shlex.join(sys.argv[1:])).strip())
        print("\nwritten to docs/BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
