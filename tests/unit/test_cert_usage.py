"""`remote-cert-ku` / `remote-cert-eku`: the peer certificate checks, and the options that set them."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from pyovpn.config import parse_config_text
from pyovpn.errors import ConfigError, ProtocolError
from pyovpn.proto.cert_usage import check_extended_key_usage, check_key_usage, key_usage_bits
from pyovpn.proto.tls import PeerCheck, check_peer_certificate
from tests.unit.certbuild import key_usage, self_signed


def _cert(ku: x509.KeyUsage | None, eku: list[x509.ObjectIdentifier] | None) -> x509.Certificate:
    extensions: list[x509.ExtensionType] = [] if ku is None else [ku]
    if eku is not None:
        extensions.append(x509.ExtendedKeyUsage(eku))
    return self_signed(ec.generate_private_key(ec.SECP256R1()), *extensions, critical=(x509.KeyUsage,))


def test_bits_follow_openvpn_numbering() -> None:
    assert key_usage_bits(key_usage(digital_signature=True)) == 0x80
    assert key_usage_bits(key_usage(digital_signature=True, key_encipherment=True)) == 0xA0
    assert key_usage_bits(key_usage(digital_signature=True, key_agreement=True)) == 0x88
    assert key_usage_bits(key_usage(key_agreement=True, encipher_only=True)) == 0x09


def test_key_usage_values() -> None:
    server_like = _cert(key_usage(digital_signature=True, key_encipherment=True), None)
    check_key_usage(server_like, ())  # present is enough without values
    check_key_usage(server_like, (0xA0,))
    check_key_usage(server_like, (0x88, 0x80))  # one of the values suffices
    with pytest.raises(ProtocolError, match="key usage a0 does not include any of 88"):
        check_key_usage(server_like, (0x88,))
    with pytest.raises(ProtocolError, match="no key usage extension"):
        check_key_usage(_cert(None, None), ())


def test_extended_key_usage_by_name_or_oid() -> None:
    server = _cert(None, [ExtendedKeyUsageOID.SERVER_AUTH])
    check_extended_key_usage(server, "TLS Web Server Authentication")
    check_extended_key_usage(server, "1.3.6.1.5.5.7.3.1")
    with pytest.raises(ProtocolError, match="lacks the extended key usage 'TLS Web Client Authentication'"):
        check_extended_key_usage(server, "TLS Web Client Authentication")
    with pytest.raises(ProtocolError, match="no extended key usage extension"):
        check_extended_key_usage(_cert(None, None), "1.3.6.1.5.5.7.3.1")


def test_peer_check_applies_both() -> None:
    cert = _cert(key_usage(digital_signature=True), [ExtendedKeyUsageOID.CLIENT_AUTH])
    check_peer_certificate(cert, PeerCheck(remote_cert_ku=(0x80,), remote_cert_eku="1.3.6.1.5.5.7.3.2"))
    with pytest.raises(ProtocolError, match="remote-cert-eku"):
        check_peer_certificate(cert, PeerCheck(remote_cert_eku="TLS Web Server Authentication"))
    with pytest.raises(ProtocolError, match="remote-cert-ku"):
        check_peer_certificate(cert, PeerCheck(remote_cert_ku=(0xA0,)))


def _parse(extra: str, tmp_path: Path) -> object:
    for name in ("ca.crt", "c.crt", "c.key"):
        (tmp_path / name).write_text("placeholder\n")
    return parse_config_text(
        "client\ndev tun\nremote 192.0.2.1\nca ca.crt\ncert c.crt\nkey c.key\n" + extra, cwd=str(tmp_path)
    )


def test_options(tmp_path: Path) -> None:
    o = _parse(
        'remote-cert-ku a0 88\nremote-cert-eku "TLS Web Server Authentication"\nping-timer-rem\n', tmp_path
    )
    assert o.remote_cert_ku == (0xA0, 0x88)
    assert o.remote_cert_eku == "TLS Web Server Authentication"
    assert not o.ignored
    assert _parse("remote-cert-ku\n", tmp_path).remote_cert_ku == ()
    with pytest.raises(ConfigError, match="remote-cert-ku: 'zz' is not a key usage in hex"):
        _parse("remote-cert-ku zz\n", tmp_path)
