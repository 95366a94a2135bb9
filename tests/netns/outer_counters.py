"""Counting the tunnel's outer UDP packets in a namespace with nftables, and pings that must all pass.

``count_outer`` installs one counter per named match (plus "all") on the packets arriving in a
namespace from or to the tunnel port; ``outer_counts`` reads them back. The table is the test's
own, in a namespace the harness created, so nothing outside it is touched.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.netns.harness import DEFAULT_PORT, netns_exec

TABLE = "pyovpn_outer"


def count_outer(ns: str, direction: str, matches: dict[str, str], why: str) -> None:
    """Count arriving tunnel packets (``direction``: dport or sport) matching each nft expression."""
    if shutil.which("nft") is None:
        pytest.skip(f"{why} test skipped: nft (nftables) is missing; scripts/setup.sh installs it")
    rules = [
        f'udp {direction} {DEFAULT_PORT} {expr} counter comment "{name}"' for name, expr in matches.items()
    ]
    rules.append(f'udp {direction} {DEFAULT_PORT} counter comment "all"')
    chain = ["type filter hook prerouting priority -300; policy accept;", *rules]
    text = f"table ip {TABLE} {{\n  chain pre {{\n" + "".join(f"    {r}\n" for r in chain) + "  }\n}\n"
    subprocess.run([*netns_exec(ns), "nft", "-f", "-"], input=text, text=True, check=True)


def outer_counts(ns: str) -> dict[str, int]:
    out = subprocess.run(
        [*netns_exec(ns), "nft", "list", "table", "ip", TABLE], capture_output=True, text=True, check=True
    ).stdout
    return {name: int(n) for n, name in re.findall(r'counter packets (\d+) bytes \d+ comment "(\w+)"', out)}


def pings_pass(ns: str, addr: str, count: int, *options: str) -> None:
    """``count`` pings from ``ns`` (with ping's ``options``), none lost."""
    argv = [*netns_exec(ns), "ping", "-n", "-c", str(count), "-i", "0.2", "-w", "15", *options, addr]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0 and " 0% packet loss" in res.stdout, res.stdout + res.stderr
