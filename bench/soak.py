#!/usr/bin/env python3
"""Soak a pyovpn P2MP server: does its memory, or its count of descriptors or threads, grow?

Needs root (network namespaces). A pyovpn P2MP server (which runs on the in-process userspace
backend: the engine does not do multipoint yet) in one namespace, two stock
OpenVPN 2.6 clients in two others, for ``--minutes``:
- the steady client carries an iperf3 UDP stream at ``--rate`` to the server, in 30 s runs;
- the churning client connects, pings once, and is killed (SIGKILL, so the server has to time
  it out) or stopped (SIGTERM, exit-notify) in turn, over and over;
- the server renegotiates every ``--reneg`` seconds.
Every 5 s the server's process tree is sampled: RSS (sum over the pyovpn process and its engine),
open descriptors and threads. After a warm-up of ``--warmup`` minutes a least-squares line is
fitted to each; the report gives each slope per minute with its 95 % interval, so a slope is
"indistinguishable from zero" when the interval contains 0.

    sudo python3 bench/soak.py --minutes 30
"""

from __future__ import annotations

import argparse
import math
import os
import signal
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

from pyovpn.tools.pki import issue_client, make_pki  # noqa: E402

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--warmup", type=float, default=3)
    ap.add_argument("--rate", default="20M")
    ap.add_argument("--reneg", type=int, default=20)
    ap.add_argument("--pause", type=float, default=2.0, help="seconds between churned connections")
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
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces)")
    stop = threading.Event()
    churns = {"connected": 0, "killed": 0, "stopped": 0}
    with tempfile.TemporaryDirectory() as td, Star(Path(td), 2, base=90) as star:
        pki = make_pki(Path(td) / "pki")
        server_conf = Path(td) / "server.conf"
        server_conf.write_text(p2mp_server_config(pki, "10.79.0.0", "verb 3", f"reneg-sec {args.reneg}"))
        argv = [sys.executable, "-m", "pyovpn", "--config", str(server_conf)]
        watch_out = args.heapwatch or args.heapwatch_malloc
        if watch_out:
            watch = [sys.executable, str(ROOT / "bench" / "heapwatch.py")]
            watch += [] if args.heapwatch else ["--malloc-only"]
            argv = [*watch, str(Path(watch_out).resolve()), "60", "--", "--config", str(server_conf)]
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

        workers = [threading.Thread(target=traffic, daemon=True), threading.Thread(target=churn, daemon=True)]
        for w in workers:
            w.start()
        start = time.monotonic()
        rows: list[tuple[float, float, int, int]] = []
        while (elapsed := time.monotonic() - start) < args.minutes * 60:
            if not server.running():
                print(server.tail(), flush=True)
                raise SystemExit("the pyovpn server exited during the soak")
            rss, fds, threads = sample(server.pid)
            rows.append((elapsed, rss, fds, threads))
            if len(rows) % 12 == 1:
                print(
                    f"{elapsed / 60:5.1f} min: rss {rss:.1f} MiB, fds {fds}, threads {threads}, {churns}",
                    flush=True,
                )
            time.sleep(5)
        stop.set()
        for w in workers:
            w.join(60)
    kept = [r for r in rows if r[0] >= args.warmup * 60]
    ts = [r[0] for r in kept]
    print(
        f"\npyovpn P2MP server (in-process backend), {args.minutes:.0f} min, "
        f"slopes after {args.warmup:.0f} min warm-up,"
    )
    print(
        f"{churns['connected']} client connections ({churns['killed']} killed, {churns['stopped']} stopped)\n"
    )
    print("| measure | first | last | slope per minute (95 % interval) |")
    print("|---|---:|---:|---:|")
    for i, name in ((1, "RSS, MiB"), (2, "open descriptors"), (3, "threads")):
        ys = [float(r[i]) for r in kept]
        b, half = slope(ts, ys)
        print(f"| {name} | {ys[0]:.1f} | {ys[-1]:.1f} | {b:+.3f} ± {half:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
