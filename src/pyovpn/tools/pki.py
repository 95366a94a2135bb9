"""Test PKI generation: a CA, one server and one client certificate, and OpenVPN static keys.

Everything here is for tests and local experiments: the CA key is written next to the
certificates and nothing is password protected. The certificates carry exactly the
extensions that OpenVPN's ``remote-cert-tls server|client`` checks look for (keyUsage
present, extendedKeyUsage serverAuth/clientAuth), so stock ``openvpn`` accepts them.

Command line: ``python -m pyovpn.tools.pki DIR [--rsa]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KeyType = Literal["ec", "rsa"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

STATIC_KEY_BEGIN = "-----BEGIN OpenVPN Static key V1-----"
STATIC_KEY_END = "-----END OpenVPN Static key V1-----"
STATIC_KEY_LEN = 256
VALIDITY = dt.timedelta(days=3650)
# Back-dated so a peer whose clock is slightly behind still accepts the certificate.
BACKDATE = dt.timedelta(days=1)


@dataclass(frozen=True)
class Pki:
    """Paths of the files written by :func:`make_pki`."""

    dir: Path
    ca_crt: Path
    ca_key: Path
    server_crt: Path
    server_key: Path
    client_crt: Path
    client_key: Path
    ta_key: Path
    tc_key: Path


def _new_key(key_type: KeyType) -> PrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key type {key_type!r}")


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _builder(
    subject: str, issuer: x509.Name, public_key: CertificatePublicKeyTypes, now: dt.datetime
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + VALIDITY)
    )


def _key_usage(
    *,
    digital_signature: bool = False,
    key_encipherment: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    """A keyUsage extension with just these bits (the others are never set for OpenVPN's PKI)."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _make_ca(key: PrivateKey, now: dt.datetime) -> x509.Certificate:
    name = _name("pyovpn test CA")
    return (
        _builder("pyovpn test CA", name, key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            _key_usage(key_cert_sign=True, crl_sign=True),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _make_leaf(
    cn: str,
    key: PrivateKey,
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    usage: x509.ObjectIdentifier,
    now: dt.datetime,
) -> x509.Certificate:
    # Same keyUsage as easy-rsa's server/client types; OpenVPN's remote-cert-tls only
    # needs the extension to be present, the EKU is what tells server from client.
    key_encipherment = usage == ExtendedKeyUsageOID.SERVER_AUTH
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        _builder(cn, ca_cert.subject, key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(digital_signature=True, key_encipherment=key_encipherment),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def static_key_text(key: bytes | None = None) -> str:
    """Return an "OpenVPN Static key V1" file body (256 bytes, 16 per hex line).

    ``key`` defaults to fresh random bytes; the same format serves tls-auth and tls-crypt.
    """
    if key is None:
        key = secrets.token_bytes(STATIC_KEY_LEN)
    if len(key) != STATIC_KEY_LEN:
        raise ValueError(f"an OpenVPN static key is {STATIC_KEY_LEN} bytes, got {len(key)}")
    lines = [key[i : i + 16].hex() for i in range(0, STATIC_KEY_LEN, 16)]
    return "\n".join(
        ["#", "# 2048 bit OpenVPN static key", "#", STATIC_KEY_BEGIN, *lines, STATIC_KEY_END, ""]
    )


def _write(path: Path, data: bytes | str, secret: bool) -> None:
    raw = data.encode() if isinstance(data, str) else data
    # Create private files 0600 from the start rather than chmod after writing.
    mode = 0o600 if secret else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(raw)
    os.chmod(path, mode)


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_pki(dirpath: str | os.PathLike[str], key_type: KeyType = "ec") -> Pki:
    """Create ``dirpath`` if needed and write a fresh CA, server/client pairs and static keys.

    Existing files of the same names are overwritten.
    """
    d = Path(dirpath)
    d.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    pki = Pki(
        dir=d,
        ca_crt=d / "ca.crt",
        ca_key=d / "ca.key",
        server_crt=d / "server.crt",
        server_key=d / "server.key",
        client_crt=d / "client.crt",
        client_key=d / "client.key",
        ta_key=d / "ta.key",
        tc_key=d / "tc.key",
    )
    ca_key = _new_key(key_type)
    ca_cert = _make_ca(ca_key, now)
    _write(pki.ca_key, _key_pem(ca_key), secret=True)
    _write(pki.ca_crt, _cert_pem(ca_cert), secret=False)
    leaves = [
        ("server", pki.server_crt, pki.server_key, ExtendedKeyUsageOID.SERVER_AUTH),
        ("client", pki.client_crt, pki.client_key, ExtendedKeyUsageOID.CLIENT_AUTH),
    ]
    for cn, crt_path, key_path, usage in leaves:
        key = _new_key(key_type)
        cert = _make_leaf(cn, key, ca_cert, ca_key, usage, now)
        _write(key_path, _key_pem(key), secret=True)
        _write(crt_path, _cert_pem(cert), secret=False)
    _write(pki.ta_key, static_key_text(), secret=True)
    _write(pki.tc_key, static_key_text(), secret=True)
    return pki


def issue_client(pki: Pki, cn: str, key_type: KeyType = "ec") -> tuple[Path, Path]:
    """Sign one more client certificate with the PKI's CA; returns (cert path, key path)."""
    ca_cert = x509.load_pem_x509_certificate(pki.ca_crt.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    if not isinstance(ca_key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise ValueError(f"{pki.ca_key}: the CA key is neither EC nor RSA")
    key = _new_key(key_type)
    cert = _make_leaf(
        cn,
        key,
        ca_cert,
        ca_key,
        ExtendedKeyUsageOID.CLIENT_AUTH,
        dt.datetime.now(dt.UTC),
    )
    crt_path, key_path = pki.dir / f"{cn}.crt", pki.dir / f"{cn}.key"
    _write(key_path, _key_pem(key), secret=True)
    _write(crt_path, _cert_pem(cert), secret=False)
    return crt_path, key_path


def write_crl(pki: Pki, path: str | os.PathLike[str], revoked: Sequence[Path] = ()) -> Path:
    """Write a PEM CRL signed by the PKI's CA that revokes the given certificate files (like gen-crl)."""
    ca_cert = x509.load_pem_x509_certificate(pki.ca_crt.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    if not isinstance(ca_key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise ValueError(f"{pki.ca_key}: the CA key is neither EC nor RSA")
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - BACKDATE)
        .next_update(now + VALIDITY)
    )
    for cert_path in revoked:
        serial = x509.load_pem_x509_certificate(Path(cert_path).read_bytes()).serial_number
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now - BACKDATE)
        builder = builder.add_revoked_certificate(entry.build())
    crl = builder.sign(ca_key, hashes.SHA256())
    out = Path(path)
    _write(out, crl.public_bytes(serialization.Encoding.PEM), secret=False)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pyovpn.tools.pki",
        description="Write a test CA, server/client certificates, ta.key and tc.key into DIR.",
    )
    parser.add_argument("dir", type=Path, help="output directory (created if missing)")
    parser.add_argument("--rsa", action="store_true", help="RSA-2048 keys instead of EC P-256")
    args = parser.parse_args(argv)
    pki = make_pki(args.dir, key_type="rsa" if args.rsa else "ec")
    for path in sorted(p for p in vars(pki).values() if p != pki.dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
