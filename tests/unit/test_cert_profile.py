"""tls-cert-profile sets OpenSSL's security level as OpenVPN does: a 1024-bit RSA certificate passes at
legacy (OpenVPN's default) and is refused at preferred; suiteb leaves only Suite B ciphers."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from OpenSSL import SSL

from pyovpn.config import parse_config_text
from pyovpn.errors import ConfigError
from pyovpn.proto.tls import build_context
from tests.unit.certbuild import self_signed


def _weak_self_signed() -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    cert = self_signed(key, cn="weak", serial=1)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@pytest.fixture(scope="module")
def weak() -> tuple[bytes, bytes]:
    return _weak_self_signed()


@pytest.mark.parametrize("profile", ["insecure", "legacy"])
def test_weak_key_accepted_at_low_levels(weak: tuple[bytes, bytes], profile: str) -> None:
    cert, key = weak
    build_context(ca=cert, cert=cert, key=key, is_server=False, cert_profile=profile)


@pytest.mark.parametrize("profile", ["preferred", "suiteb"])
def test_weak_key_refused_at_preferred(weak: tuple[bytes, bytes], profile: str) -> None:
    cert, key = weak
    with pytest.raises(ConfigError, match=f"tls-cert-profile {profile}"):
        build_context(ca=cert, cert=cert, key=key, is_server=False, cert_profile=profile)


def test_suiteb_restricts_ciphers(weak: tuple[bytes, bytes]) -> None:
    cert, _ = weak
    ctx = build_context(ca=cert, cert=None, key=None, is_server=False, cert_profile="suiteb")
    names = SSL.Connection(ctx).get_cipher_list()
    assert names and all("ECDHE-ECDSA" in n or n.startswith("TLS_") for n in names), names


def test_option_is_carried_into_options() -> None:
    o = parse_config_text(
        "client\ndev tun\nremote 192.0.2.1\n<ca>\nCA\n</ca>\nauth-user-pass\ntls-cert-profile suiteb\n"
    )
    assert o.tls_cert_profile == "suiteb"
