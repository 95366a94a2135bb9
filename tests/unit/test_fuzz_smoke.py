"""CI smoke run of the coverage-guided fuzzers: every target, a few thousand inputs each.

The recorded run (a million inputs per target, docs/RELIABILITY.md) uses the same command with
``--runs 1000000``. Here each target starts from its seeds and must survive 3,000 inputs with
nothing but pyovpn's own errors escaping; the whole run takes well under three minutes.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNS = 3000


def test_every_fuzz_target_survives_a_smoke_run(tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris is not installed (scripts/setup.sh installs it)")
    from fuzz.targets import TARGETS

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fuzz.run",
            "--runs",
            str(RUNS),
            "--corpus",
            str(tmp_path),
            "--timeout",
            "120",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reported = dict(re.findall(r"^(\w+): (\d+) inputs", proc.stdout, re.M))
    assert set(reported) == set(TARGETS), proc.stdout
    assert all(int(n) >= RUNS for n in reported.values()), proc.stdout


def test_a_finding_is_reported_with_its_crash_file(tmp_path: Path) -> None:
    # the harness itself must not hide a crash: a target that raises is a finding with exit 1
    pytest.importorskip("atheris", reason="atheris is not installed (scripts/setup.sh installs it)")
    from fuzz import run

    result = run.run_target("harness_self_test", 1000, tmp_path, 64, 60)
    assert "harness_self_test-crash-" in result.finding, result.finding
    assert "harness self test: this exception must be reported" in result.finding, result.finding
