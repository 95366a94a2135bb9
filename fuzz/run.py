"""Run every fuzz target for a number of inputs and report: ``python3 -m fuzz.run --runs N``.

Each target runs in its own process (``fuzz.one``), with its corpus kept under ``--corpus``
(seeded with real inputs, e.g. the public configs of tests/corpus) so later runs start from what earlier
ones found. The report gives, per target, the inputs tried, the seconds, the coverage libFuzzer
reached and whether anything escaped; ``--markdown`` prints the table for docs/RELIABILITY.md.
Exit status 1 when any target found something (its crash file is named in the report).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fuzz.targets import TARGETS, seeds

ROOT = Path(__file__).resolve().parent
_DONE = re.compile(r"Done (\d+) runs in (\d+) second")
_COV = re.compile(r"cov: (\d+)")


@dataclass
class Result:
    target: str
    runs: int
    seconds: float
    coverage: int
    finding: str  # "" when nothing escaped


def run_target(name: str, runs: int, corpus: Path, max_len: int, timeout: float) -> Result:
    work = corpus / name
    work.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(seeds(name)):
        (work / f"seed-{i}").write_bytes(seed)
    artifacts = corpus / "crashes"
    artifacts.mkdir(exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "fuzz.one",
        name,
        f"-runs={runs}",
        f"-max_len={max_len}",
        f"-artifact_prefix={artifacts}/{name}-",
        "-print_final_stats=1",
        str(work),
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT.parent), str(ROOT.parent / "src")]))
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT.parent)
    except subprocess.TimeoutExpired:
        return Result(name, 0, time.monotonic() - start, 0, f"did not finish in {timeout:.0f} s")
    seconds = time.monotonic() - start
    log = proc.stderr + proc.stdout
    done = _DONE.search(log)
    covs = _COV.findall(log)
    finding = ""
    if proc.returncode != 0 or done is None:
        crash = re.search(r"Test unit written to (\S+)", log)
        tail = [ln for ln in log.splitlines() if ln.strip()][-12:]
        finding = (crash.group(1) if crash else f"exit {proc.returncode}") + "\n" + "\n".join(tail)
    return Result(name, int(done.group(1)) if done else 0, seconds, int(covs[-1]) if covs else 0, finding)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("targets", nargs="*", help=f"default: all ({', '.join(TARGETS)})")
    ap.add_argument("--runs", type=int, default=1_000_000, help="inputs per target")
    ap.add_argument("--corpus", type=Path, default=Path("/var/tmp/pyovpn-fuzz"), help="corpus directory")
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--timeout", type=float, default=7200.0, help="seconds per target")
    ap.add_argument("--markdown", action="store_true", help="print the table for docs/RELIABILITY.md")
    args = ap.parse_args(argv)
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown:
        ap.error(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(TARGETS)}")
    results = []
    for name in args.targets or list(TARGETS):
        r = run_target(name, args.runs, args.corpus, args.max_len, args.timeout)
        results.append(r)
        state = "no finding" if not r.finding else "FINDING: " + r.finding
        print(f"{name}: {r.runs} inputs in {r.seconds:.0f} s, cov {r.coverage}: {state}", flush=True)
    if args.markdown:
        print("\n| target | inputs | seconds | coverage (libFuzzer cov) | unhandled exceptions |")
        print("|---|---:|---:|---:|---:|")
        for r in results:
            print(f"| `{r.target}` | {r.runs:,} | {r.seconds:.0f} | {r.coverage} | {1 if r.finding else 0} |")
    return 1 if any(r.finding for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
