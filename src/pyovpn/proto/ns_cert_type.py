"""`ns-cert-type server|client` (deprecated in OpenVPN, still accepted by 2.6): the peer certificate
must be fit for TLS server/client use as OpenSSL's purpose check judges it (extended key usage,
key usage and the Netscape nsCertType extension, each only when present), or at least carry the
nsCertType SSL server/client bit, which is what OpenVPN falls back to.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from pyovpn.errors import ProtocolError

NS_CERT_TYPE_OID = x509.ObjectIdentifier("2.16.840.1.113730.1.1")
NS_SSL_CLIENT = 0x80
NS_SSL_SERVER = 0x40
# Server Gated Crypto usages, which OpenSSL still counts as a TLS server usage
_SGC = (x509.ObjectIdentifier("2.16.840.1.113730.4.1"), x509.ObjectIdentifier("1.3.6.1.4.1.311.10.3.3"))


def ns_cert_type_bits(cert: x509.Certificate) -> int | None:
    """The first byte of the nsCertType bit string, or None without the extension."""
    try:
        ext = cert.extensions.get_extension_for_oid(NS_CERT_TYPE_OID).value
    except x509.ExtensionNotFound:
        return None
    der = ext.value if isinstance(ext, x509.UnrecognizedExtension) else b""
    # DER BIT STRING: tag 0x03, length, unused-bit count, then the bits
    if len(der) < 4 or der[0] != 0x03:
        return 0
    return der[3]


def _fit_for(cert: x509.Certificate, role: str) -> bool:
    server = role == "server"
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is not None:
        wanted = (ExtendedKeyUsageOID.SERVER_AUTH, *_SGC) if server else (ExtendedKeyUsageOID.CLIENT_AUTH,)
        if not any(oid in eku for oid in wanted):
            return False
    bits = ns_cert_type_bits(cert)
    if bits is not None and not bits & (NS_SSL_SERVER if server else NS_SSL_CLIENT):
        return False
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return ku.digital_signature or ku.key_agreement or (server and ku.key_encipherment)


def check_ns_cert_type(cert: x509.Certificate, role: str) -> None:
    """ProtocolError unless the certificate passes OpenVPN's ns-cert-type ``role`` check."""
    if _fit_for(cert, role):
        return
    bits = ns_cert_type_bits(cert)
    if bits is not None and bits & (NS_SSL_SERVER if role == "server" else NS_SSL_CLIENT):
        return
    raise ProtocolError(
        f"peer certificate is not a TLS {role} certificate (ns-cert-type {role}); check the peer's "
        f"certificate, or use `remote-cert-tls {role}` (ns-cert-type is deprecated)"
    )
