"""OpenVPN's `shaper` on pyovpn's userspace engine, against stock OpenVPN 2.6 (P2P, UDP).

The pyovpn client runs `shaper 250000` (bytes per second); the stock server does not. An
nftables counter in the server's namespace counts the tunnel bytes that arrive while an iperf3
TCP stream pushes as hard as it can from the client: they stay at the rate (plus a little for
what was queued when the counting started), and not far below it. The other way, which nothing
shapes, moves many times more: the limit is the shaper's, not the machine's.
"""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from pyovpn.tools.pki import Pki
from tests.netns import harness as h
from tests.netns.harness import Netns, TunnelSpec
from tests.netns.outer_counters import TABLE, count_outer

pytestmark = pytest.mark.netns

RATE = 250_000  # bytes per second
SECONDS = 4


def _outer_bytes(ns: str) -> int:
    out = subprocess.run(
        [*h.netns_exec(ns), "nft", "list", "table", "ip", TABLE], capture_output=True, text=True, check=True
    ).stdout
    m = re.search(r'counter packets \d+ bytes (\d+) comment "all"', out)
    assert m, out
    return int(m.group(1))


def test_shaper_holds_what_pyovpn_sends_to_its_rate(net: Netns, pki: Pki) -> None:
    spec = TunnelSpec(role="p2p", dco=None)
    count_outer(net.b, "dport", {}, "shaper")  # what arrives at the server, IP headers included
    server, client = h.spawn_tunnel(net, pki, spec, "openvpn", "pyovpn", client_extra=f"shaper {RATE}\n")
    h.wait_for_lines([server, client], h.INIT_LINE, 40)
    assert "kernel data channel not used: `shaper`" in client.text(), client.tail()
    assert "offload engine" in client.text(), client.tail()
    addrs = h.inner_addrs(spec)

    before = _outer_bytes(net.b)
    t0 = time.monotonic()
    h.iperf3_transfer(net.a, net.b, addrs.server4, seconds=SECONDS, log_dir=net.workdir)
    elapsed = time.monotonic() - t0
    moved = _outer_bytes(net.b) - before
    # IP and UDP headers count here (28 bytes a datagram), not in the shaper's budget: 3 % more
    assert moved <= RATE * 1.03 * elapsed + 200_000, (moved, elapsed)
    assert moved >= RATE * 0.6 * SECONDS, (moved, elapsed)

    unshaped = h.iperf3_transfer(net.a, net.b, addrs.server4, seconds=2, reverse=True, log_dir=net.workdir)
    assert unshaped["bits_per_second"] / 8 > 10 * RATE, unshaped["bits_per_second"]
    assert client.running() and server.running()
