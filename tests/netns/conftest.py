"""Gate and fixtures for the network-namespace tests (this directory only).

Every test here is skipped, with the reason shown by ``pytest -ra``, unless we are root
and ``ip netns``, ``openvpn``, ``iperf3``, ``ping`` and ``ss`` are usable.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyovpn.tools.pki import Pki, make_pki
from tests.netns.harness import Netns

REQUIRED_TOOLS = ("ip", "openvpn", "iperf3", "ping", "ss")


@functools.cache
def missing_requirement() -> str | None:
    """Why the netns tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "not root (network namespaces need CAP_SYS_ADMIN/CAP_NET_ADMIN)"
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)} (scripts/setup.sh installs them)"
    try:
        res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`ip netns` unusable: {e}"
    if res.returncode != 0:
        return f"`ip netns` unusable: {res.stderr.strip()}"
    return None


@pytest.fixture(autouse=True)
def _netns_requirements() -> None:
    reason = missing_requirement()
    if reason is not None:
        pytest.skip(f"netns tests skipped: {reason}")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """One EC test PKI (CA, server, client, ta.key, tc.key) shared by the whole run."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Netns]:
    """A fresh namespace pair; configs and logs stay in the test's tmp_path for debugging."""
    with Netns(tmp_path / "net") as n:
        yield n
