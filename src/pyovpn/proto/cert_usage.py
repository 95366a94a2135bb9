"""`remote-cert-ku` and `remote-cert-eku`: what the peer certificate's (extended) key usage must say.

Semantics as in OpenVPN: `remote-cert-ku` without values only requires the extension; with hex
values (``a0``, ``88``...) the certificate's first eight key usage bits, read as OpenVPN reads
them (digitalSignature = 0x80 ... decipherOnly not counted), must include all bits of at least
one value. `remote-cert-eku` names one extended key usage, as a dotted OID or by its OpenSSL
long name ("TLS Web Server Authentication").
"""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from pyovpn.errors import ProtocolError

# OpenSSL's long names of the usual extended key usages (what OpenVPN compares against).
EKU_LONG_NAMES: dict[str, x509.ObjectIdentifier] = {
    "TLS Web Server Authentication": ExtendedKeyUsageOID.SERVER_AUTH,
    "TLS Web Client Authentication": ExtendedKeyUsageOID.CLIENT_AUTH,
    "Code Signing": ExtendedKeyUsageOID.CODE_SIGNING,
    "E-mail Protection": ExtendedKeyUsageOID.EMAIL_PROTECTION,
    "Time Stamping": ExtendedKeyUsageOID.TIME_STAMPING,
    "OCSP Signing": ExtendedKeyUsageOID.OCSP_SIGNING,
    "Any Extended Key Usage": ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
}


def key_usage_bits(ku: x509.KeyUsage) -> int:
    """The first eight key usage bits as OpenVPN numbers them (bit 0 of the extension = 0x80)."""
    agreement = ku.key_agreement
    flags = (
        ku.digital_signature,
        ku.content_commitment,
        ku.key_encipherment,
        ku.data_encipherment,
        agreement,
        ku.key_cert_sign,
        ku.crl_sign,
        agreement and ku.encipher_only,  # only defined together with keyAgreement
    )
    return sum(0x80 >> i for i, flag in enumerate(flags) if flag)


def check_key_usage(cert: x509.Certificate, expected: tuple[int, ...]) -> None:
    """Raise ProtocolError unless the certificate satisfies `remote-cert-ku` ``expected``."""
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise ProtocolError("peer certificate has no key usage extension (remote-cert-ku)") from None
    if not expected:
        return
    bits = key_usage_bits(ku)
    if not any(v and bits & v == v for v in expected):
        wanted = ", ".join(f"{v:02x}" for v in expected)
        raise ProtocolError(
            f"peer certificate key usage {bits:02x} does not include any of {wanted} (remote-cert-ku)"
        )


def check_extended_key_usage(cert: x509.Certificate, expected: str) -> None:
    """Raise ProtocolError unless the certificate lists `remote-cert-eku` ``expected``."""
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise ProtocolError(
            "peer certificate has no extended key usage extension (remote-cert-eku)"
        ) from None
    for oid in eku:
        if oid.dotted_string == expected or EKU_LONG_NAMES.get(expected) == oid:
            return
    raise ProtocolError(f"peer certificate lacks the extended key usage '{expected}' (remote-cert-eku)")
