"""The edge unit tests need no privilege: they pass in a process that holds no capability at all.

Run as root (as CI does), the edge tests could quietly lean on root; here pytest runs them again
under ``setpriv`` with an empty capability bounding set, so uid 0 keeps no capability (no
CAP_NET_ADMIN for a TUN or a route, no CAP_DAC_OVERRIDE), and as a plain user they simply run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
EDGE_TESTS = ["test_edge_p2p.py", "test_edge_server.py"]


def _without_capabilities(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv  # an ordinary user already holds no capability
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed: cannot drop the capabilities to prove it")
    return [setpriv, "--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all", *argv]


def test_the_child_really_has_no_capability() -> None:
    out = subprocess.run(
        _without_capabilities([sys.executable, "-c", "print(open('/proc/self/status').read())"]),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    effective = next(line.split()[1] for line in out.splitlines() if line.startswith("CapEff:"))
    assert int(effective, 16) == 0


def test_edge_tests_pass_without_any_capability() -> None:
    pytest_argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    argv = [*pytest_argv, *(str(HERE / t) for t in EDGE_TESTS)]
    done = subprocess.run(
        _without_capabilities(argv), capture_output=True, text=True, timeout=300, cwd=HERE.parents[1]
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout
