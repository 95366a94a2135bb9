"""OpenVPN's `shaper` on pyovpn's userspace engine, against stock OpenVPN 2.6 (P2P, UDP).

The pyovpn client runs `shaper 250000` (bytes per second), configured or pushed by a stock P2MP
server; the stock end does not shape. An nftables counter in the server's namespace counts the
tunnel bytes that arrive while an iperf3 TCP stream pushes as hard as it can from the client:
they stay at the rate (plus a little for what was queued when the counting started), and not far
below it. The other way, which nothing shapes, moves many times more: the limit is the
shaper's, not the machine's.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from pyovpn.tools.pki import Pki, issue_client
from tests.netns import harness as h
from tests.netns.harness import Netns, Star, TunnelSpec, p2mp_client_config, p2mp_server_config
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


def _check_shaped(client_ns: str, server_ns: str, server_vpn: str, workdir: Path) -> None:
    """What the client sends stays at RATE on the wire; what it receives is not held to it."""
    before = _outer_bytes(server_ns)
    t0 = time.monotonic()
    h.iperf3_transfer(client_ns, server_ns, server_vpn, seconds=SECONDS, log_dir=workdir)
    elapsed = time.monotonic() - t0
    moved = _outer_bytes(server_ns) - before
    # IP and UDP headers count here (28 bytes a datagram), not in the shaper's budget: 3 % more
    assert moved <= RATE * 1.03 * elapsed + 200_000, (moved, elapsed)
    assert moved >= RATE * 0.6 * SECONDS, (moved, elapsed)
    unshaped = h.iperf3_transfer(
        client_ns,
        server_ns,
        server_vpn,
        seconds=2,
        reverse=True,
        log_dir=workdir,
    )
    assert unshaped["bits_per_second"] / 8 > 10 * RATE, unshaped["bits_per_second"]


def test_shaper_holds_what_pyovpn_sends_to_its_rate(net: Netns, pki: Pki) -> None:
    spec = TunnelSpec(role="p2p", dco=None)
    count_outer(net.b, "dport", {}, "shaper")  # what arrives at the server, IP headers included
    server, client = h.spawn_tunnel(net, pki, spec, "openvpn", "pyovpn", client_extra=f"shaper {RATE}\n")
    h.wait_for_lines([server, client], h.INIT_LINE, 40)
    assert "kernel data channel not used: `shaper`" in client.text(), client.tail()
    assert "offload engine" in client.text(), client.tail()
    _check_shaped(net.a, net.b, h.inner_addrs(spec).server4, net.workdir)
    assert client.running() and server.running()


def test_a_shaper_pushed_by_a_stock_server_is_kept(tmp_path: Path, pki: Pki) -> None:
    """A stock OpenVPN 2.6 P2MP server pushes `shaper`; the pyovpn client (no shaper of its own,
    so the backend is the engine's as for any client here) keeps it, as a stock client would."""
    with Star(tmp_path, 1, base=214) as star:
        conf = star.workdir / "server.conf"
        conf.write_text(
            p2mp_server_config(pki, "10.74.0.0", "disable-dco", f'push "shaper {RATE}"', "verb 3")
        )
        server = star.start_server("openvpn", conf)
        crt, key = issue_client(pki, "shaped")
        cconf = star.workdir / "client.conf"
        cconf.write_text(p2mp_client_config(pki, star.server_addr(0), crt, key, "dco userspace", "verb 4"))
        client = star.spawn(star.peers[0], h.vpn_argv("pyovpn", cconf), "client-pyovpn")
        h.wait_for_lines([server, client], h.INIT_LINE, 40)
        assert f"shaper {RATE} bytes per second, pushed by the server" in client.text(), client.tail()
        count_outer(star.server, "dport", {}, "shaper")
        _check_shaped(star.peers[0], star.server, "10.74.0.1", star.workdir)
        assert client.running() and server.running()
