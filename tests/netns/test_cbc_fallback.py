"""`cipher AES-256-CBC` in a pyovpn client's config against a stock OpenVPN 2.6 server with the same
line: the two negotiate an AEAD cipher (the CBC cipher is only the fallback) and traffic flows."""

from __future__ import annotations

import pytest

from pyovpn.tools.pki import Pki
from tests.netns.harness import Netns, TunnelSpec, inner_addrs, ping, spawn_tunnel

pytestmark = pytest.mark.netns


def test_cbc_cipher_line_negotiates_aead_with_stock_server(net: Netns, pki: Pki) -> None:
    spec = TunnelSpec(role="server")
    cbc = "cipher AES-256-CBC\n"
    _server, client = spawn_tunnel(
        net, pki, spec, "openvpn", "pyovpn", server_extra=cbc, client_extra=cbc, init_timeout=40
    )
    assert ping(net.a, inner_addrs(spec).server4).ok
    assert "Data Channel: cipher 'AES-256-GCM'" in client.text(), client.tail()
