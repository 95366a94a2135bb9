#!/usr/bin/env python3
"""Soak a pyovpn P2MP server: does its memory, or its count of descriptors or threads, grow?

Needs root (network namespaces). A pyovpn P2MP server (which runs on the in-process userspace
backend: the engine does not do multipoint yet) in one namespace, two stock
OpenVPN 2.6 clients in two others, for ``--minutes``:
- the steady client carries an iperf3 UDP stream at ``--rate`` to the server, in 30 s runs;
- the churning client connects, pings once, and is killed (SIGKILL, so the server has to time
  it out) or stopped (SIGTERM, exit-notify) in turn, over and over;
- with ``--loadgen N``, N simulated clients (``pyovpn.tools.loadgen``, one process, each with its
  own socket and session) connect, send keepalives for 20 s and leave, over and over; every fifth
  round leaves without EXIT, so the server times those out;
- the server renegotiates every ``--reneg`` seconds.
Every 5 s the server's process tree is sampled: RSS (sum over the pyovpn process and its engine),
open descriptors and threads. After a warm-up of ``--warmup`` minutes a least-squares line is
fitted to each; the report gives each slope per minute with its 95 % interval, so a slope is
"indistinguishable from zero" when the interval contains 0. At the end the churn stops and the
server must come back to one session (the steady client) once its timeouts have run: no stuck
sessions (the exit code says whether it did). ``--smaps`` also lists the memory mappings that
grew, ``--heapwatch-malloc OUT`` records the allocators' own counts and ``--heapwatch-gc OUT``
what each full collection frees (bench/heapwatch.py).

    sudo python3 bench/soak.py --minutes 40 --warmup 5 --pause 0.3 --loadgen 100 --smaps
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from bench.throughput import _pids  # noqa: E402
from tests.netns.harness import (  # noqa: E402
    INIT_LINE,
    HarnessError,
    Star,
    iperf3_transfer,
    p2mp_client_config,
    p2mp_server_config,
    ping,
    wait_for_lines,
    wait_listening,
)

from pyovpn.mgmt.protocol import CONTROL_DIR  # noqa: E402
from pyovpn.tools.pki import issue_client, make_pki  # noqa: E402
from pyovpn.tools.show import query  # noqa: E402

SERVER_INNER = "10.79.0.1"


def sample(pid: int) -> tuple[float, int, int]:
    """RSS in MiB, open descriptors and threads of ``pid`` and its descendants."""
    rss_kib = fds = threads = 0
    for p in _pids(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss_kib += int(line.split()[1])
                elif line.startswith("Threads:"):
                    threads += int(line.split()[1])
            fds += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            continue
    return rss_kib / 1024, fds, threads


def smaps(pid: int) -> dict[str, int]:
    """Resident KiB of each mapping of ``pid``, keyed by address range and what is mapped there."""
    out: dict[str, int] = {}
    key = ""
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        head = line.split(None, 5)
        if "-" in head[0] and not head[0].endswith(":"):
            name = head[5] if len(head) > 5 else "[anon]"
            # the heap and the stack move their ends as they grow: keyed by name alone
            key = name if name in ("[heap]", "[stack]") else f"{head[0]} {name}"
        elif head[0] == "Rss:":
            out[key] = int(head[1])
    return out


def smaps_growth(first: dict[str, int], last: dict[str, int], top: int = 12) -> list[str]:
    """The mappings whose resident size changed most between two ``smaps`` samples."""
    keys = set(first) | set(last)
    diffs = sorted(((last.get(k, 0) - first.get(k, 0), k) for k in keys), key=lambda d: -abs(d[0]))
    total = sum(d for d, _ in diffs)
    lines = [f"resident change over all mappings: {total:+d} KiB; largest:"]
    lines += [f"  {d:+7d} KiB  {k}" for d, k in diffs[:top] if d]
    return lines


def slope(ts: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope per minute and the half-width of its 95 % interval."""
    n = len(ts)
    mt, my = sum(ts) / n, sum(ys) / n
    sxx = sum((t - mt) ** 2 for t in ts)
    b = sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / sxx
    resid = sum((y - my - b * (t - mt)) ** 2 for t, y in zip(ts, ys, strict=True))
    se = math.sqrt(resid / (n - 2) / sxx) if n > 2 else float("inf")
    # samples 5 s apart are not independent: widen by the lag-1 autocorrelation of the residuals
    r = [y - my - b * (t - mt) for t, y in zip(ts, ys, strict=True)]
    num = sum(r[i] * r[i - 1] for i in range(1, n))
    den = sum(x * x for x in r) or 1.0
    rho = max(0.0, min(0.95, num / den))
    se *= math.sqrt((1 + rho) / (1 - rho))
    return b * 60, 1.96 * se * 60


def server_sessions(pid: int) -> int | None:
    """How many client sessions the pyovpn daemon ``pid`` reports (``pyovpn show``), None if it
    does not answer."""
    for path in glob.glob(os.path.join(CONTROL_DIR, "*.sock")):
        info = query(path)
        if info is not None and info.get("pid") == pid:
            return len(info.get("peers", []))
    return None


def settle_sessions(pid: int, expected: int, timeout: float) -> tuple[int | None, float]:
    """Wait until the server reports ``expected`` sessions; (sessions, seconds waited)."""
    start = time.monotonic()
    while True:
        n = server_sessions(pid)
        waited = time.monotonic() - start
        if n == expected or waited > timeout:
            return n, waited
        time.sleep(2)


def rss_by_kind(maps: dict[str, int]) -> dict[str, float]:
    """Resident MiB by kind of mapping: malloc's main heap, anonymous (CPython's arenas, malloc's
    other arenas and large blocks, thread stacks), mapped files (code, libraries)."""
    kinds = {"heap": 0, "anon": 0, "file": 0}
    for key, kib in maps.items():
        name = key.rsplit(" ", 1)[-1]
        kind = "heap" if name == "[heap]" else "file" if name.startswith("/") else "anon"
        kinds[kind] += kib
    return {k: v / 1024 for k, v in kinds.items()}


KIND_NAMES = {"heap": "RSS in malloc's heap, MiB", "anon": "RSS anonymous, MiB", "file": "RSS of files, MiB"}


class Sampler:
    """Samples a process tree every few seconds and reports the slopes after a warm-up."""

    def __init__(self, pid: int, warmup_minutes: float, *, with_smaps: bool = False) -> None:
        self.pid = pid
        self.warmup_s = warmup_minutes * 60
        self.with_smaps = with_smaps
        self.rows: list[tuple[float, float, int, int]] = []
        self.kinds: list[dict[str, float]] = []
        self.maps_first: dict[str, int] = {}
        self.maps_last: dict[str, int] = {}

    def take(self, elapsed: float) -> tuple[float, int, int]:
        rss, fds, threads = sample(self.pid)
        self.rows.append((elapsed, rss, fds, threads))
        if self.with_smaps:
            maps = {f"{p} {k}": v for p in _pids(self.pid) for k, v in smaps(p).items()}
            self.kinds.append(rss_by_kind(maps))
            if elapsed >= self.warmup_s:
                self.maps_last = maps
                self.maps_first = self.maps_first or maps
        return rss, fds, threads

    def series(self) -> list[dict[str, float]]:
        """Every sample: seconds, RSS, descriptors, threads (and the RSS by kind with smaps)."""
        out = []
        for i, (t, rss, fds, threads) in enumerate(self.rows):
            row = {"seconds": t, "rss_mib": rss, "fds": float(fds), "threads": float(threads)}
            if i < len(self.kinds):
                row.update({f"rss_{k}_mib": v for k, v in self.kinds[i].items()})
            out.append(row)
        return out

    def report(self, since_minutes: float | None = None) -> None:
        """Print the slope table (and, with smaps, which mappings grew) from ``since_minutes``
        (default: the end of the warm-up)."""
        since = self.warmup_s if since_minutes is None else since_minutes * 60
        keep = [i for i, r in enumerate(self.rows) if r[0] >= since]
        ts = [self.rows[i][0] for i in keep]
        columns: list[tuple[str, list[float]]] = [
            (name, [float(self.rows[i][col]) for i in keep])
            for col, name in ((1, "RSS, MiB"), (2, "open descriptors"), (3, "threads"))
        ]
        if self.with_smaps and len(self.kinds) == len(self.rows):
            columns += [(label, [self.kinds[i][k] for i in keep]) for k, label in KIND_NAMES.items()]
        print("| measure | first | last | slope per minute (95 % interval) |")
        print("|---|---:|---:|---:|")
        for name, ys in columns:
            b, half = slope(ts, ys)
            print(f"| {name} | {ys[0]:.1f} | {ys[-1]:.1f} | {b:+.3f} ± {half:.3f} |")
        if self.with_smaps:
            print("\n" + "\n".join(smaps_growth(self.maps_first, self.maps_last)))


def add_heapwatch_options(ap: argparse.ArgumentParser) -> None:
    """--heapwatch OUT / --heapwatch-malloc OUT: run the pyovpn server under bench/heapwatch.py."""
    ap.add_argument(
        "--heapwatch",
        metavar="OUT",
        help="run the server under bench/heapwatch.py (tracemalloc), writing its heap growth to OUT",
    )
    ap.add_argument(
        "--heapwatch-malloc",
        metavar="OUT",
        help="run the server under bench/heapwatch.py --malloc-only (glibc's counts, no tracemalloc)",
    )
    ap.add_argument(
        "--heapwatch-gc",
        metavar="OUT",
        help="run the server under bench/heapwatch.py --gc-census (what each full collection frees)",
    )
    ap.add_argument(
        "--heapwatch-lengths",
        metavar="OUT",
        help="run the server under bench/heapwatch.py --lengths (which dicts, lists, sets and deques grew)",
    )
    ap.add_argument(
        "--heapwatch-untracked",
        metavar="OUT",
        help="run the server under bench/heapwatch.py --untracked (a census of untracked objects)",
    )


_HEAPWATCH_MODES = {  # option (as argparse names it) -> bench/heapwatch.py's mode
    "heapwatch": [],
    "heapwatch_malloc": ["--malloc-only"],
    "heapwatch_gc": ["--gc-census"],
    "heapwatch_lengths": ["--lengths"],
    "heapwatch_untracked": ["--untracked"],
}


def heapwatch_argv(args: argparse.Namespace, config: Path) -> list[str] | None:
    """How to run pyovpn on ``config`` under bench/heapwatch.py as the options ask; None if not asked."""
    chosen = [(getattr(args, name), flags) for name, flags in _HEAPWATCH_MODES.items() if getattr(args, name)]
    if not chosen:
        return None
    watch_out, flags = chosen[0]
    watch = [sys.executable, str(ROOT / "bench" / "heapwatch.py"), *flags]
    return [*watch, str(Path(watch_out).resolve()), "60", "--", "--config", str(config)]


def add_soak_options(ap: argparse.ArgumentParser, *, reneg: int) -> None:
    """What both soaks take: duration, warm-up, traffic rate, reneg-sec, sample output, memory probes."""
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--warmup", type=float, default=3)
    ap.add_argument("--rate", default="20M")
    ap.add_argument("--reneg", type=int, default=reneg)
    ap.add_argument("--series", metavar="OUT", help="write every sample to OUT (JSON lines)")
    add_heapwatch_options(ap)
    ap.add_argument(
        "--smaps",
        action="store_true",
        help="also report which memory mappings of the server's processes grew (from /proc/PID/smaps)",
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_soak_options(ap, reneg=20)
    ap.add_argument("--pause", type=float, default=2.0, help="seconds between churned connections")
    ap.add_argument(
        "--loadgen",
        type=int,
        default=0,
        metavar="N",
        help="also churn N simulated clients (pyovpn.tools.loadgen): connect all, hold 20 s, leave, repeat",
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces)")
    stop = threading.Event()
    churns = {"connected": 0, "killed": 0, "stopped": 0, "simulated": 0, "simulated failed": 0}
    with tempfile.TemporaryDirectory() as td, Star(Path(td), 2, base=90) as star:
        pki = make_pki(Path(td) / "pki")
        server_conf = Path(td) / "server.conf"
        # duplicate-cn: the simulated clients share one certificate
        server_conf.write_text(
            p2mp_server_config(
                pki, "10.79.0.0", "verb 3", f"reneg-sec {args.reneg}", "duplicate-cn", netmask="255.255.0.0"
            )
        )
        plain = [sys.executable, "-m", "pyovpn", "--config", str(server_conf)]
        argv = heapwatch_argv(args, server_conf) or plain
        server = star.spawn(star.server, argv, "server")
        # tracemalloc makes the start (imports) several times slower
        wait_listening(star.server, "udp", 1194, timeout=120 if args.heapwatch else 10, proc=server)
        confs = []
        for i, cn in enumerate(("steady", "churn")):
            cert, key = issue_client(pki, cn)
            conf = Path(td) / f"{cn}.conf"
            conf.write_text(p2mp_client_config(pki, star.server_addr(i), cert, key, "verb 3"))
            confs.append(conf)
        steady = star.spawn(star.peers[0], ["openvpn", "--config", str(confs[0])], "steady")
        wait_for_lines([steady], INIT_LINE, 30)

        def traffic() -> None:
            while not stop.is_set():
                try:
                    iperf3_transfer(star.peers[0], star.server, SERVER_INNER, seconds=30, udp_rate=args.rate)
                except HarnessError as e:
                    print(f"iperf3: {e}".splitlines()[0], flush=True)
                    time.sleep(1)

        def churn() -> None:
            n = 0
            while not stop.is_set():
                c = star.spawn(star.peers[1], ["openvpn", "--config", str(confs[1])], f"churn-{n}")
                try:
                    wait_for_lines([c], INIT_LINE, 30)
                    churns["connected"] += 1
                    ping(star.peers[1], SERVER_INNER, count=1)
                except HarnessError:
                    pass
                if n % 2:
                    os.kill(c.pid, signal.SIGKILL)
                    churns["killed"] += 1
                else:
                    c.stop(timeout=10)
                    churns["stopped"] += 1
                c.wait(10)
                star.procs.remove(c)
                n += 1
                time.sleep(args.pause)

        def churn_simulated() -> None:
            # every fifth round leaves without EXIT, so the server also times clients out
            n = 0
            while not stop.is_set():
                argv = [sys.executable, "-m", "pyovpn.tools.loadgen", "--config", str(confs[1])]
                argv += ["-n", str(args.loadgen), "--concurrency", "50", "--hold", "20"]
                argv += ["--no-exit-notify"] if n % 5 == 4 else []
                lg = star.spawn(star.peers[1], argv, f"loadgen-{n}")
                try:
                    lg.wait(180)
                except subprocess.TimeoutExpired:
                    print("loadgen: no result within 180 s; stopped", flush=True)
                    lg.stop(timeout=10)
                m = re.search(r"LOADGEN RESULT (\{.*\})", lg.text())
                res = json.loads(m.group(1)) if m else {}
                churns["simulated"] += int(res.get("connected", 0))
                churns["simulated failed"] += args.loadgen - int(res.get("connected", 0))
                star.procs.remove(lg)
                n += 1

        workers = [threading.Thread(target=traffic, daemon=True), threading.Thread(target=churn, daemon=True)]
        if args.loadgen:
            workers.append(threading.Thread(target=churn_simulated, daemon=True))
        for w in workers:
            w.start()
        start = time.monotonic()
        sampler = Sampler(server.pid, args.warmup, with_smaps=args.smaps)
        while (elapsed := time.monotonic() - start) < args.minutes * 60:
            if not server.running():
                print(server.tail(), flush=True)
                raise SystemExit("the pyovpn server exited during the soak")
            rss, fds, threads = sampler.take(elapsed)
            if len(sampler.rows) % 12 == 1:
                print(
                    f"{elapsed / 60:5.1f} min: rss {rss:.1f} MiB, fds {fds}, threads {threads}, {churns}",
                    flush=True,
                )
            time.sleep(5)
        stop.set()
        for w in workers:
            w.join(200)
        # killed clients and simulated ones that left without EXIT are timed out by the server
        # (ping-restart 120 s for keepalive 10 60): then only the steady client may be left
        sessions, waited = settle_sessions(server.pid, 1, timeout=180)
    print(
        f"\npyovpn P2MP server (in-process backend), {args.minutes:.0f} min, "
        f"slopes after {args.warmup:.0f} min warm-up,"
    )
    print(
        f"{churns['connected']} client connections ({churns['killed']} killed, {churns['stopped']} stopped); "
        f"{churns['simulated']} simulated ({churns['simulated failed']} failed to connect)\n"
    )
    sampler.report()
    if args.series:
        Path(args.series).write_text("".join(json.dumps(r) + "\n" for r in sampler.series()))
    print(
        f"\nsessions after the churn stopped: {sessions} (expected 1, the steady client; "
        f"waited {waited:.0f} s for the server's timeouts)"
    )
    return 0 if sessions == 1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
