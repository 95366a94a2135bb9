"""A pyovpn P2MP server with `topology net30` (OpenVPN's default, used by kylemanna/docker-openvpn)
against stock OpenVPN 2.6 clients: each client takes a /30, traffic flows both ways on the
userspace data plane, and the log says in one line why the kernel data channel is not used."""

from __future__ import annotations

import subprocess

import pytest

from pyovpn.tools.pki import Pki
from tests.netns import harness as h
from tests.netns.harness import Impl, Netns, TunnelSpec

pytestmark = pytest.mark.netns


@pytest.mark.parametrize("client_impl", ["openvpn", "pyovpn"])
def test_net30_server(net: Netns, pki: Pki, client_impl: Impl) -> None:
    spec = TunnelSpec(role="server", dco=None)
    # the harness writes `topology subnet`; the later line wins, in OpenVPN as in pyovpn
    server, client = h.spawn_tunnel(net, pki, spec, "pyovpn", client_impl, server_extra="topology net30\n")
    h.wait_for_lines([server, client], h.INIT_LINE, 40)
    # the server is .1 (peer .2); the first client's /30 is .4: it is .6 with peer .5
    shown = subprocess.run(
        ["ip", "-n", net.a, "-4", "addr", "show", "dev", "tun0"], capture_output=True, text=True
    )
    assert "inet 10.77.0.6 peer 10.77.0.5/32" in shown.stdout, shown.stdout + shown.stderr + client.tail()
    for ns, addr in (
        (net.a, "10.77.0.1"),
        (net.b, "10.77.0.6"),
        (net.a, "fd00:77::1"),
        (net.b, "fd00:77::1000"),
    ):
        res = h.ping(ns, addr)
        assert res.ok, f"{addr}: {res.output}\n{server.tail()}"
    log = server.text()
    assert log.count("kernel data channel not used: `topology net30` on a P2MP server") == 1, server.tail()
