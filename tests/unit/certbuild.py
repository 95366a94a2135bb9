"""Self-signed certificates with a chosen key and extensions, for the peer-certificate check tests."""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

_KEY_USAGE_FIELDS = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
    "encipher_only",
    "decipher_only",
)


def self_signed(
    key: CertificateIssuerPrivateKeyTypes,
    *extensions: x509.ExtensionType,
    cn: str = "peer",
    serial: int = 7,
    critical: tuple[type[x509.ExtensionType], ...] = (),
) -> x509.Certificate:
    """A certificate valid from yesterday to tomorrow; extensions of a type in ``critical`` are marked so."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    for ext in extensions:
        builder = builder.add_extension(ext, critical=isinstance(ext, critical))
    return builder.sign(key, hashes.SHA256())


def key_usage(**on: bool) -> x509.KeyUsage:
    """A keyUsage extension with the named bits set and all others clear."""
    return x509.KeyUsage(**{n: on.get(n, False) for n in _KEY_USAGE_FIELDS})
