"""`tls-cipher` / `tls-ciphersuites`: OpenVPN's names translated, and what a real handshake picks."""

from __future__ import annotations

from pathlib import Path

import pytest
from OpenSSL import SSL

from pyovpn.config import parse_config_text
from pyovpn.errors import ConfigError
from pyovpn.proto.tls import build_context
from pyovpn.proto.tls_ciphers import openssl_cipher_list, openssl_name
from pyovpn.tools.pki import Pki, make_pki


@pytest.mark.parametrize(
    ("openvpn", "openssl"),
    [
        ("TLS-ECDHE-ECDSA-WITH-AES-128-GCM-SHA256", "ECDHE-ECDSA-AES128-GCM-SHA256"),
        ("TLS-ECDHE-RSA-WITH-AES-256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384"),
        ("TLS-ECDHE-ECDSA-WITH-CHACHA20-POLY1305-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"),
        ("TLS-DHE-RSA-WITH-AES-256-CBC-SHA", "DHE-RSA-AES256-SHA"),
        ("TLS-DHE-DSS-WITH-AES-256-CBC-SHA", "DHE-DSS-AES256-SHA"),
        ("TLS-RSA-WITH-AES-256-CBC-SHA", "AES256-SHA"),
        ("TLS-DHE-RSA-WITH-AES-256-CBC-SHA256", "DHE-RSA-AES256-SHA256"),
        ("TLS-DHE-RSA-WITH-3DES-EDE-CBC-SHA", "EDH-RSA-DES-CBC3-SHA"),
        ("DEFAULT", "DEFAULT"),
        ("@SECLEVEL=0", "@SECLEVEL=0"),
        ("ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256"),
    ],
)
def test_openvpn_names_become_openssl_names(openvpn: str, openssl: str) -> None:
    assert openssl_name(openvpn) == openssl


def test_lists_keep_their_order_and_pass_unknown_entries() -> None:
    text = "TLS-DHE-RSA-WITH-AES-256-CBC-SHA:DEFAULT:@SECLEVEL=0"
    assert openssl_cipher_list(text) == "DHE-RSA-AES256-SHA:DEFAULT:@SECLEVEL=0"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _pair(pki: Pki, **server_kwargs: str) -> tuple[SSL.Context, SSL.Context]:
    server = build_context(
        ca=pki.ca_crt.read_bytes(),
        cert=pki.server_crt.read_bytes(),
        key=pki.server_key.read_bytes(),
        is_server=True,
        **server_kwargs,  # type: ignore[arg-type]
    )
    client = build_context(
        ca=pki.ca_crt.read_bytes(),
        cert=pki.client_crt.read_bytes(),
        key=pki.client_key.read_bytes(),
        is_server=False,
    )
    return server, client


def _handshake(server_ctx: SSL.Context, client_ctx: SSL.Context) -> tuple[str, str]:
    """An in-memory handshake; (protocol version, cipher) as the client sees them."""
    server, client = SSL.Connection(server_ctx, None), SSL.Connection(client_ctx, None)
    server.set_accept_state()
    client.set_connect_state()
    done = {id(server): False, id(client): False}
    for _ in range(20):
        for conn, peer in ((client, server), (server, client)):
            if not done[id(conn)]:
                try:
                    conn.do_handshake()
                    done[id(conn)] = True
                except SSL.WantReadError:
                    pass
            try:
                peer.bio_write(conn.bio_read(65536))
            except SSL.WantReadError:
                pass
        if all(done.values()):
            break
    assert all(done.values()), "the handshake did not finish"
    return str(client.get_protocol_version_name()), str(client.get_cipher_name())


def test_tls_cipher_decides_the_tls12_suite(pki: Pki) -> None:
    for openvpn_name, expected in (
        ("TLS-ECDHE-ECDSA-WITH-AES-128-GCM-SHA256", "ECDHE-ECDSA-AES128-GCM-SHA256"),
        ("TLS-ECDHE-ECDSA-WITH-CHACHA20-POLY1305-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"),
    ):
        server, client = _pair(pki, tls_cipher=openvpn_name)
        client.set_max_proto_version(SSL.TLS1_2_VERSION)  # tls-cipher is about TLS <= 1.2
        assert _handshake(server, client) == ("TLSv1.2", expected)


def test_tls_ciphersuites_decides_the_tls13_suite(pki: Pki) -> None:
    server, client = _pair(pki, tls_ciphersuites="TLS_CHACHA20_POLY1305_SHA256")
    assert _handshake(server, client) == ("TLSv1.3", "TLS_CHACHA20_POLY1305_SHA256")
    server, client = _pair(pki, tls_ciphersuites="TLS_AES_128_GCM_SHA256")
    assert _handshake(server, client) == ("TLSv1.3", "TLS_AES_128_GCM_SHA256")


def test_unknown_suites_are_a_config_error(pki: Pki) -> None:
    with pytest.raises(ConfigError, match="tls-cipher: OpenSSL accepts none of 'TLS-NOPE-WITH-X'"):
        _pair(pki, tls_cipher="TLS-NOPE-WITH-X")
    with pytest.raises(ConfigError, match="tls-ciphersuites: OpenSSL accepts none of 'TLS_NOPE'"):
        _pair(pki, tls_ciphersuites="TLS_NOPE")


def test_options_reach_the_config(tmp_path: Path) -> None:
    for name in ("ca.crt", "c.crt", "c.key"):
        (tmp_path / name).write_text("placeholder\n")
    o = parse_config_text(
        "client\ndev tun\nremote 192.0.2.1\nca ca.crt\ncert c.crt\nkey c.key\n"
        "tls-cipher TLS-ECDHE-ECDSA-WITH-AES-128-GCM-SHA256\n"
        "tls-ciphersuites TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256\n",
        cwd=str(tmp_path),
    )
    assert o.tls_cipher == "TLS-ECDHE-ECDSA-WITH-AES-128-GCM-SHA256"
    assert o.tls_ciphersuites == "TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256"
    assert not o.ignored
