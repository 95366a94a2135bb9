"""ns-cert-type: OpenSSL's TLS purpose check on the peer certificate, with OpenVPN's nsCertType fallback."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from pyovpn.config import parse_config_text
from pyovpn.errors import ConfigError, ProtocolError
from pyovpn.proto.ns_cert_type import NS_CERT_TYPE_OID, check_ns_cert_type, ns_cert_type_bits
from pyovpn.proto.tls import PeerCheck, check_peer_certificate
from tests.unit.certbuild import key_usage, self_signed

_KEY = ec.generate_private_key(ec.SECP256R1())


def _cert(*extensions: x509.ExtensionType) -> x509.Certificate:
    return self_signed(_KEY, *extensions)


def _ns(bits: int) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(NS_CERT_TYPE_OID, bytes([0x03, 0x02, 0x00, bits]))


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
        ((SERVER_EKU, key_usage(key_encipherment=True)), "server", True),
        ((CLIENT_EKU, key_usage(key_encipherment=True)), "client", False),
        ((SERVER_EKU, key_usage(crl_sign=True)), "server", False),
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
