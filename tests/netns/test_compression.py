"""Compression framing against stock OpenVPN 2.6: pushed `comp-lzo no`, a framing pyovpn server,
and a stock peer that really compresses (pyovpn decompresses)."""

from __future__ import annotations

import re

import pytest

from pyovpn.tools.pki import Pki
from tests.netns.harness import (
    INIT_LINE,
    Netns,
    TunnelSpec,
    inner_addrs,
    iperf3_transfer,
    ping,
    spawn_tunnel,
    wait_for_lines,
)

pytestmark = pytest.mark.netns

NBYTES = 8_000_000


def _traffic_both_ways(net: Netns, spec: TunnelSpec) -> None:
    addrs = inner_addrs(spec)
    res = ping(net.a, addrs.server4)
    assert res.ok, res.output
    res = ping(net.b, addrs.client4)
    assert res.ok, res.output
    up = iperf3_transfer(net.a, net.b, addrs.server4, nbytes=NBYTES, log_dir=net.workdir)
    assert up["bytes"] >= NBYTES
    down = iperf3_transfer(net.a, net.b, addrs.server4, nbytes=NBYTES, reverse=True, log_dir=net.workdir)
    assert down["bytes"] >= NBYTES


def test_stock_server_pushing_comp_lzo_no(net: Netns, pki: Pki) -> None:
    """docker-openvpn's default: `comp-lzo no` on the server and pushed; pyovpn (dco auto) frames."""
    spec = TunnelSpec(role="server", dco=None)
    server, client = spawn_tunnel(
        net, pki, spec, "openvpn", "pyovpn", server_extra='comp-lzo no\npush "comp-lzo no"\n'
    )
    wait_for_lines([server, client], INIT_LINE, 40)
    _traffic_both_ways(net, spec)
    log = client.text()
    assert len(re.findall(r"kernel data channel not used: .*comp-lzo no", log)) == 1, client.tail()
    # the stock server saw only well-framed packets
    assert "Bad LZO decompression header" not in server.text()
    assert "bad compression" not in server.text().lower()


@pytest.mark.parametrize("option", ["compress stub-v2", "compress lz4-v2", "comp-lzo", "compress"])
def test_pyovpn_server_with_compression_and_stock_client(net: Netns, pki: Pki, option: str) -> None:
    """A framing pyovpn server and a stock client with the same setting: traffic both ways."""
    spec = TunnelSpec(role="server", dco=None)
    server, client = spawn_tunnel(
        net, pki, spec, "pyovpn", "openvpn", server_extra=f"{option}\n", client_extra=f"{option}\n"
    )
    wait_for_lines([server, client], INIT_LINE, 40)
    _traffic_both_ways(net, spec)
    assert "kernel data channel not used" in server.text()
    stock = client.text().lower()
    assert "bad" not in stock or "decompression header" not in stock, client.tail()


def test_stock_server_that_compresses(net: Netns, pki: Pki) -> None:
    """Stock server with `compress lz4-v2` + `allow-compression yes` really compresses; pyovpn inflates."""
    spec = TunnelSpec(role="server", dco=None)
    server, client = spawn_tunnel(
        net,
        pki,
        spec,
        "openvpn",
        "pyovpn",
        server_extra='compress lz4-v2\nallow-compression yes\npush "compress lz4-v2"\n',
    )
    wait_for_lines([server, client], INIT_LINE, 40)
    addrs = inner_addrs(spec)
    # ping payloads of zeros compress well: the server sends them compressed
    assert ping(net.b, addrs.client4).ok
    down = iperf3_transfer(net.a, net.b, addrs.server4, nbytes=NBYTES, reverse=True, log_dir=net.workdir)
    assert down["bytes"] >= NBYTES
    server.stop()
    # openvpn's exit statistics: what it compressed on the way out (proof that it did)
    m = re.search(r"post-compress bytes,(\d+)", server.text()) or re.search(
        r"compress.*?(\d+)", server.text()
    )
    assert m is not None, server.tail()
