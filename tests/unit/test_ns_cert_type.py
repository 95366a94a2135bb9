"""ns-cert-type: OpenSSL's TLS purpose check on the peer certificate, with OpenVPN's nsCertType fallback."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pyovpn.config import parse_config_text
from pyovpn.errors import ConfigError, ProtocolError
from pyovpn.proto.ns_cert_type import NS_CERT_TYPE_OID, check_ns_cert_type, ns_cert_type_bits
from pyovpn.proto.tls import PeerCheck, check_peer_certificate

_KEY = ec.generate_private_key(ec.SECP256R1())


def _cert(*extensions: x509.ExtensionType) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "peer")])
    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(_KEY.public_key())
        .serial_number(7)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    for ext in extensions:
        b = b.add_extension(ext, critical=False)
    return b.sign(_KEY, hashes.SHA256())


def _ns(bits: int) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(NS_CERT_TYPE_OID, bytes([0x03, 0x02, 0x00, bits]))


def _ku(**on: bool) -> x509.KeyUsage:
    names = [
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
        "encipher_only",
        "decipher_only",
    ]
    return x509.KeyUsage(**{n: on.get(n, False) for n in names})


SERVER_EKU = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
CLIENT_EKU = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])


def test_bits_read_from_the_extension() -> None:
    assert ns_cert_type_bits(_cert(_ns(0x40))) == 0x40
    assert ns_cert_type_bits(_cert()) is None


@pytest.mark.parametrize(
    ("extensions", "role", "ok"),
    [
        ((SERVER_EKU,), "server", True),
        ((SERVER_EKU,), "client", False),
        ((CLIENT_EKU,), "client", True),
        ((CLIENT_EKU,), "server", False),
        ((_ns(0x40),), "server", True),
        ((_ns(0x80),), "server", False),
        ((_ns(0x80),), "client", True),
        ((SERVER_EKU, _ku(key_encipherment=True)), "server", True),
        ((CLIENT_EKU, _ku(key_encipherment=True)), "client", False),
        ((SERVER_EKU, _ku(crl_sign=True)), "server", False),
        # OpenVPN's fallback: the nsCertType bit alone passes even when another check fails
        ((CLIENT_EKU, _ns(0x40)), "server", True),
        ((), "server", True),  # nothing says otherwise: OpenSSL's purpose check passes
    ],
)
def test_purpose_check(extensions: tuple[x509.ExtensionType, ...], role: str, ok: bool) -> None:
    cert = _cert(*extensions)
    if ok:
        check_ns_cert_type(cert, role)
    else:
        with pytest.raises(ProtocolError, match=f"remote-cert-tls {role}"):
            check_ns_cert_type(cert, role)


def test_peer_check_applies_it() -> None:
    with pytest.raises(ProtocolError, match="ns-cert-type server"):
        check_peer_certificate(_cert(CLIENT_EKU), PeerCheck(ns_cert_type="server"))
    check_peer_certificate(_cert(SERVER_EKU), PeerCheck(ns_cert_type="server"))


BASE = "client\ndev tun\nremote 192.0.2.1\n<ca>\nCA\n</ca>\nauth-user-pass\n"


def test_option() -> None:
    assert parse_config_text(BASE + "ns-cert-type server\n").ns_cert_type == "server"
    with pytest.raises(ConfigError, match="use server or client"):
        parse_config_text(BASE + "ns-cert-type peer\n")
