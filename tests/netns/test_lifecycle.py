"""pyovpn's process lifecycle against real peers: demo, restart on SIGUSR1, keepalive expiry, exit notify."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from pyovpn.tools.pki import Pki
from tests.netns.harness import INIT_LINE, Netns, TunnelSpec, ping, start_tunnel

pytestmark = pytest.mark.netns


def test_readme_demo_command_works() -> None:
    """`pyovpn demo` (what scripts/demo.sh runs after setup) brings up a tunnel and pings through it."""
    res = subprocess.run(
        [sys.executable, "-m", "pyovpn", "demo"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "demo OK" in res.stdout
    assert res.stdout.count("0% packet loss") == 2
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "pov-demo" not in left, "the demo must remove its namespaces"


def test_sigusr1_restarts_and_reconnects(net: Netns, pki: Pki) -> None:
    spec = TunnelSpec(role="p2p", cipher="AES-128-GCM", wrap="tls-crypt", proto="udp", family=4)
    tunnel = start_tunnel(net, pki, spec, server_impl="openvpn", client_impl="pyovpn")
    mark = tunnel.client.mark()
    os.kill(tunnel.client.pid, signal.SIGUSR1)
    tunnel.client.wait_for_line("SIGUSR1.*restarting", 10, since=mark)
    tunnel.client.wait_for_line(INIT_LINE, 40, since=mark)
    assert ping(net.a, tunnel.addrs.server4).ok
    assert tunnel.stop()["client"] == 0


def test_keepalive_expiry_restarts_then_recovers(net: Netns, pki: Pki) -> None:
    """The peer goes silent: the data channel's keepalive expires and pyovpn restarts the session."""
    spec = TunnelSpec(
        role="p2p", cipher="CHACHA20-POLY1305", wrap="tls-auth", proto="udp", family=4, keepalive=(1, 4)
    )
    tunnel = start_tunnel(net, pki, spec, server_impl="pyovpn", client_impl="openvpn")
    mark = tunnel.server.mark()
    os.kill(tunnel.client.pid, signal.SIGSTOP)
    try:
        tunnel.server.wait_for_line("Inactivity timeout", 15, since=mark)
    finally:
        os.kill(tunnel.client.pid, signal.SIGCONT)
    # openvpn wakes up, its own ping-restart or our silence makes it reconnect; pyovpn accepts it again
    tunnel.server.wait_for_line(INIT_LINE, 60, since=mark)
    assert ping(net.a, tunnel.addrs.server4, count=3, timeout=20).ok
    assert tunnel.stop()["server"] == 0


def test_exit_notification_reaches_openvpn(net: Netns, pki: Pki) -> None:
    spec = TunnelSpec(role="p2p", cipher="AES-256-GCM", wrap="none", proto="udp", family=6)
    tunnel = start_tunnel(net, pki, spec, server_impl="openvpn", client_impl="pyovpn")
    assert tunnel.stop()["client"] == 0  # SIGTERM to pyovpn first
    assert "exit message received by peer" in tunnel.server.text() or "remote-exit" in tunnel.server.text()


@pytest.mark.parametrize("pyovpn_side", ["server", "client"])
def test_rekeys_with_control_packets_through_the_data_channel(net: Netns, pki: Pki, pyovpn_side: str) -> None:
    """After the hand-over every control packet reaches the session via the data channel backend.

    Short reneg-sec on both ends; pyovpn itself must log several completed send-key switches and the
    tunnel must still carry pings on the newest key.
    """
    spec = TunnelSpec(role="p2p", cipher="AES-128-GCM", wrap="tls-crypt", proto="udp", family=4, reneg_sec=5)
    impls = ("pyovpn", "openvpn") if pyovpn_side == "server" else ("openvpn", "pyovpn")
    tunnel = start_tunnel(net, pki, spec, server_impl=impls[0], client_impl=impls[1])
    py = tunnel.server if pyovpn_side == "server" else tunnel.client
    for n in range(1, 4):
        py.wait_for_line(f"data channel now sends with key_id={n}", 30)
    assert ping(net.a, tunnel.addrs.server4).ok
    assert "Inactivity timeout" not in py.text()
    assert tunnel.stop()[pyovpn_side] == 0
