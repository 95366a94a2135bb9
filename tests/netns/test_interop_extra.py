"""Interop cases outside the main matrix: TLS 1.2, username/password auth, AUTH_FAILED."""

from __future__ import annotations

import pytest

from pyovpn.tools.pki import Pki
from tests.netns.harness import (
    Impl,
    Netns,
    TunnelSpec,
    inner_addrs,
    ping,
    spawn_tunnel,
    vpn_argv,
)

pytestmark = pytest.mark.netns


@pytest.mark.parametrize("pyovpn_side", ["client", "server"])
def test_tls_1_2_with_ekm(net: Netns, pki: Pki, pyovpn_side: str) -> None:
    """OpenVPN capped at TLS 1.2: the RFC 5705 exporter without context must still match."""
    spec = TunnelSpec(role="p2p", cipher="AES-256-GCM", wrap="tls-auth", proto="udp", family=4)
    impls: tuple[Impl, Impl] = ("openvpn", "pyovpn") if pyovpn_side == "client" else ("pyovpn", "openvpn")
    cap = "tls-version-max 1.2\n"
    server_extra, client_extra = (cap if impl == "openvpn" else "" for impl in impls)
    server, client = spawn_tunnel(
        net, pki, spec, *impls, server_extra=server_extra, client_extra=client_extra, init_timeout=30
    )
    py = client if pyovpn_side == "client" else server
    assert "TLSv1.2" in py.text()
    assert ping(net.a, inner_addrs(spec).server4).ok
    assert py.stop() == 0


def test_username_password_accepted_and_rejected(net: Netns, pki: Pki) -> None:
    """auth-user-pass vs openvpn's auth-user-pass-verify: good password connects, bad one: AUTH_FAILED."""
    script = net.workdir / "verify.sh"
    script.write_text('#!/bin/sh\n[ "$(sed -n 1p "$1")" = alice ] && [ "$(sed -n 2p "$1")" = s3cret ]\n')
    script.chmod(0o755)
    spec = TunnelSpec(role="server", cipher="AES-128-GCM", wrap="tls-crypt", proto="udp", family=4)
    verify = f"script-security 2\nauth-user-pass-verify {script} via-file\n"
    creds = net.workdir / "creds.txt"
    creds.write_text("alice\ns3cret\n")
    login = f"auth-user-pass {creds}\n"
    _server, client = spawn_tunnel(
        net, pki, spec, "openvpn", "pyovpn", server_extra=verify, client_extra=login, init_timeout=30
    )
    assert ping(net.a, inner_addrs(spec).server4).ok
    assert client.stop() == 0

    creds.write_text("alice\nwrong\n")
    bad = net.spawn("a", vpn_argv("pyovpn", net.workdir / "c.conf"), "client-bad")
    assert bad.wait(40) == 1, bad.tail()
    assert "AUTH_FAILED" in bad.text()
