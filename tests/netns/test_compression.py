"""Compression framing against stock OpenVPN 2.6: pushed `comp-lzo no`, a framing pyovpn server,
and a stock peer that really compresses (pyovpn decompresses)."""

from __future__ import annotations

import re
import subprocess

import pytest

from pyovpn.tools.pki import Pki
from tests.netns.harness import (
    Impl,
    Netns,
    Proc,
    TunnelSpec,
    inner_addrs,
    iperf3_transfer,
    netns_exec,
    ping,
    spawn_tunnel,
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


def _assert_well_framed(stock: Proc) -> None:
    """The stock end saw only well-framed packets."""
    assert not re.search(r"Bad .*decompression header", stock.text()), stock.tail()


def _same_option_both_ends(
    net: Netns, pki: Pki, spec: TunnelSpec, server_impl: Impl, client_impl: Impl, option: str
) -> tuple[Proc, Proc]:
    """Both ends configured with the same compression line: traffic both ways, well framed."""
    extra = f"{option}\n"
    server, client = spawn_tunnel(
        net, pki, spec, server_impl, client_impl, server_extra=extra, client_extra=extra, init_timeout=40
    )
    _traffic_both_ways(net, spec)
    _assert_well_framed(server if server_impl == "openvpn" else client)
    return server, client


def test_stock_server_pushing_comp_lzo_no(net: Netns, pki: Pki) -> None:
    """docker-openvpn's default: `comp-lzo no` on the server and pushed; pyovpn (dco auto) frames."""
    spec = TunnelSpec(role="server", dco=None)
    server, client = spawn_tunnel(
        net, pki, spec, "openvpn", "pyovpn", server_extra='comp-lzo no\npush "comp-lzo no"\n', init_timeout=40
    )
    _traffic_both_ways(net, spec)
    log = client.text()
    assert len(re.findall(r"kernel data channel not used: .*comp-lzo no", log)) == 1, client.tail()
    # the stock server saw only well-framed packets
    _assert_well_framed(server)


@pytest.mark.parametrize("option", ["compress stub-v2", "compress lz4-v2", "comp-lzo", "compress"])
def test_pyovpn_server_with_compression_and_stock_client(net: Netns, pki: Pki, option: str) -> None:
    """A framing pyovpn server and a stock client with the same setting: traffic both ways."""
    spec = TunnelSpec(role="server", dco=None)
    server, _ = _same_option_both_ends(net, pki, spec, "pyovpn", "openvpn", option)
    # stub-v2 adds nothing to IP packets: like OpenVPN's DCO it does not rule the kernel out
    assert ("kernel data channel not used" in server.text()) == (option != "compress stub-v2")
    if option != "compress stub-v2":  # the line gives the reason: this option needs framing
        why = f"kernel data channel not used: `{option}` needs compression framing"
        assert server.text().count(why) == 1, server.tail()


def test_stock_server_that_compresses(net: Netns, pki: Pki) -> None:
    """Stock server with `compress lz4-v2` + `allow-compression yes` really compresses; pyovpn inflates.

    The server logs each compression at verb 9; large zero-filled pings (above OpenVPN's
    100-byte threshold) come back only if pyovpn decompressed the echo requests exactly.
    """
    spec = TunnelSpec(role="server", dco=None)
    server_extra = 'compress lz4-v2\nallow-compression yes\npush "compress lz4-v2"\nverb 9\n'
    server, client = spawn_tunnel(
        net, pki, spec, "openvpn", "pyovpn", server_extra=server_extra, init_timeout=40
    )
    addrs = inner_addrs(spec)
    argv = [*netns_exec(net.b), "ping", "-n", "-c", "5", "-i", "0.2", "-w", "15", "-s", "1200", "-p", "00"]
    res = subprocess.run([*argv, addrs.client4], capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0 and " 0% packet loss" in res.stdout, res.stdout + res.stderr
    assert "wrong data byte" not in res.stdout
    sizes = [(int(a), int(b)) for a, b in re.findall(r"LZ4 compress (\d+) -> (\d+)", server.text())]
    assert any(before > 1200 and after < before // 4 for before, after in sizes), server.tail()
    assert "kernel data channel not used: the server pushed `compress lz4-v2`" in client.text()


@pytest.mark.parametrize("option", ["comp-lzo", "compress lz4"])
def test_p2p_pyovpn_client_and_stock_server_with_compression(net: Netns, pki: Pki, option: str) -> None:
    """P2P (no pull): the framing comes from each side's own config; pyovpn runs it on the engine."""
    spec = TunnelSpec(role="p2p", dco=None)
    _, client = _same_option_both_ends(net, pki, spec, "openvpn", "pyovpn", option)
    assert "kernel data channel not used" in client.text()


def test_pyovpn_server_pushing_comp_lzo_no_to_pyovpn_client(net: Netns, pki: Pki) -> None:
    """Both ends pyovpn: the server frames all clients and pushes `comp-lzo no`; the client follows."""
    spec = TunnelSpec(role="server", dco=None)
    _server, client = spawn_tunnel(
        net, pki, spec, "pyovpn", "pyovpn", server_extra='comp-lzo no\npush "comp-lzo no"\n', init_timeout=40
    )
    _traffic_both_ways(net, spec)
    assert "the server pushed `comp-lzo no`" in client.text()


def test_stock_server_framing_without_push_is_reported(net: Netns, pki: Pki) -> None:
    """`comp-lzo no` on the server but not pushed: pyovpn cannot know, but says what is wrong."""
    spec = TunnelSpec(role="server", dco=None)
    _server, client = spawn_tunnel(
        net, pki, spec, "openvpn", "pyovpn", server_extra="comp-lzo no\n", init_timeout=40
    )
    assert "its options string says comp-lzo" in client.text(), client.tail()
