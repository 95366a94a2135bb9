"""Host side of the kernel tests: build the qemu guest and run tests/kernel and tests/contract inside it.

The guest boots Debian's linux 7.3 (which has the ``ovpn`` driver) because the host kernel does not;
scripts/guest/build.sh caches the image, so after the first build this costs one guest boot plus the
kernel suite. Needs root; skipped when the guest cannot be built here (no root, or qemu/debootstrap
cannot be installed) and inside the guest itself.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import warnings
from collections import deque
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[1]
BUILD = CHECKOUT / "scripts" / "guest" / "build.sh"
RUN = CHECKOUT / "scripts" / "guest" / "run.sh"
GUEST_TIMEOUT_S = 1500
BUILD_TIMEOUT_S = 1800
RETRY_WITHIN_S = 900  # a guest that died sooner than this gets one more boot
EX_UNAVAILABLE = 69  # build.sh / run.sh: cannot build or boot the guest on this machine


def stream(argv: list[str], timeout: float) -> tuple[int, str]:
    """Run argv, echoing its output as it comes (pytest shows it on failure); return (status, output).

    The process is killed after `timeout` seconds (its status is then negative).
    """
    lines: deque[str] = deque(maxlen=5000)
    with subprocess.Popen(
        argv, cwd=CHECKOUT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as proc:
        assert proc.stdout is not None
        watchdog = threading.Timer(timeout, proc.kill)
        watchdog.start()
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                lines.append(line)
            status = proc.wait()
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
    return status, "".join(lines)


def console_tail(out: str, lines: int = 40) -> str:
    """The last `lines` non-empty lines of the guest's console, each cut to 200 characters."""
    kept = [line[:200] for line in out.splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def _guest_pytest(args: list[str], what: str, env: tuple[str, ...] = ()) -> None:
    if os.environ.get("PYOVPN_GUEST") == "1":
        pytest.skip("already inside the guest")
    if os.geteuid() != 0:
        pytest.skip("building and booting the kernel guest needs root")

    status, out = stream([str(BUILD)], timeout=BUILD_TIMEOUT_S)
    if status == EX_UNAVAILABLE:
        pytest.skip(f"the kernel guest cannot be built here: {out.strip().splitlines()[-1:]}")
    assert status == 0, "scripts/guest/build.sh failed"

    run = [
        str(RUN),
        "-t",
        str(GUEST_TIMEOUT_S),
        *[a for e in env for a in ("-e", e)],
        "--",
        "python3",
        "-m",
        "pytest",
        "-q",
        "-ra",
        *args,
    ]
    started = time.monotonic()
    status, out = stream(run, timeout=GUEST_TIMEOUT_S + 600)
    if status == 125 and time.monotonic() - started < RETRY_WITHIN_S:
        # The emulated guest died with no exit status (once in CI, 2026-12-05, with no console kept).
        # One more boot, loudly: the console's end goes into the warnings summary, and a guest that
        # dies twice fails below. Not after a hang that ran into the host's limit: CI has no time.
        warnings.warn(
            f"{what}: the guest died with no exit status; booting once more. Its console ended with:\n"
            f"{console_tail(out)}",
            stacklevel=1,
        )
        status, out = stream(run, timeout=GUEST_TIMEOUT_S + 600)
    if status == EX_UNAVAILABLE:
        pytest.skip(f"the kernel guest cannot boot here: {out.strip().splitlines()[-1:]}")
    # CI shows an assertion's message but may cut the captured output: the console's end (a panic's
    # trace, the test that hung, run.sh's verdict) goes into the message itself
    tail = console_tail(out)
    assert status != 124, f"{what} timed out inside the guest; the console ended with:\n{tail}"
    assert status != 125, (
        f"the guest returned no exit status (boot failure, kernel panic or host-side timeout); "
        f"the console ended with:\n{tail}"
    )
    assert status == 0, f"{what} failed in the guest (exit status {status}); the console ended with:\n{tail}"
    assert "no tests ran" not in out
    assert re.search(r"\b\d+ passed\b", out), f"no test of {what} passed"


@pytest.mark.guest
def test_kernel_suite_passes_in_the_guest() -> None:
    """tests/kernel and the backend contract suite (tests/contract, there on the kernel backend), one boot."""
    _guest_pytest(["tests/kernel", "tests/contract"], "tests/kernel and tests/contract")


@pytest.mark.guest
def test_interop_matrix_on_the_kernel_backend_in_the_guest() -> None:
    """One scenario suite, two backends: the interop matrix and the P2MP server tests (UDP and TCP) again,
    pyovpn on the kernel driver (the P2MP server's stock clients use OpenVPN 2.7.8's DCO too)."""
    _guest_pytest(
        [
            "-p",
            "no:cacheprovider",
            "tests/netns/test_interop.py",
            "tests/netns/test_server.py",
            "tests/netns/test_server_tcp.py",
            "-k",
            "not soak and not pairwise",
        ],
        "the interop matrix with PYOVPN_TEST_DCO=kernel",
        env=("PYOVPN_TEST_DCO=kernel",),
    )
