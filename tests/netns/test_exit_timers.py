"""`inactive` and `ping-exit` on a pyovpn client against a stock OpenVPN server: both end the
process (exit 0, like OpenVPN's SIGTERM) instead of restarting it."""

from __future__ import annotations

import time

from pyovpn.tools.pki import Pki
from tests.netns.harness import INIT_LINE, Netns, TunnelSpec, ping, spawn_tunnel, wait_for_lines


def test_inactive_exits_when_the_tunnel_carries_no_traffic(net: Netns, pki: Pki) -> None:
    # the server's pushed keepalive keeps pinging: pings are not traffic for `inactive`
    spec = TunnelSpec(role="server", keepalive=(1, 10))
    server, client = spawn_tunnel(net, pki, spec, "openvpn", "pyovpn", client_extra="inactive 4\n")
    wait_for_lines([client, server], INIT_LINE, 40)
    up = time.monotonic()
    rc = client.wait(40)
    quiet = time.monotonic() - up
    assert rc == 0, client.tail()
    assert "Inactivity timeout (--inactive), exiting" in client.text()
    assert quiet < 30, f"exited {quiet:.1f} s after the tunnel came up"


def test_inactive_is_kept_alive_by_traffic(net: Netns, pki: Pki) -> None:
    spec = TunnelSpec(role="server", keepalive=(1, 10))
    server, client = spawn_tunnel(net, pki, spec, "openvpn", "pyovpn", client_extra="inactive 5\n")
    wait_for_lines([client, server], INIT_LINE, 40)
    # pinging through the tunnel for longer than 2 periods keeps the client running
    result = ping(net.a, "10.77.0.1", count=12, timeout=30)
    assert result.received > 0
    assert client.running(), client.tail()
    rc = client.wait(40)  # then, left alone, it goes
    assert rc == 0 and "Inactivity timeout (--inactive)" in client.text()


def test_ping_exit_exits_when_the_peer_goes_silent(net: Netns, pki: Pki) -> None:
    spec = TunnelSpec(role="p2p", keepalive=None, openvpn_extra=("ping 1",))
    server, client = spawn_tunnel(net, pki, spec, "openvpn", "pyovpn", client_extra="ping 1\nping-exit 4\n")
    wait_for_lines([client, server], INIT_LINE, 40)
    server.stop()  # a P2P stock server says no goodbye: the client just stops hearing from it
    rc = client.wait(40)
    log = client.text()
    assert rc == 0, log
    assert "Inactivity timeout (--ping-exit), exiting" in log
    assert "restarting" not in log.split(INIT_LINE, 1)[1]
