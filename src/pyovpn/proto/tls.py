"""TLS for the control channel: pyOpenSSL over memory BIOs, certificate checks and the RFC 5705 exporter.

Each key state gets its own :class:`TlsEndpoint` (a fresh SSL object: a soft reset is a new
TLS handshake, never TLS renegotiation). No sockets: ciphertext goes in with ``feed`` and
comes out of ``pending_output``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto

from pyovpn.errors import ConfigError, ProtocolError
from pyovpn.proto import cert_usage, tls_ciphers
from pyovpn.proto.ns_cert_type import check_ns_cert_type


@dataclass(frozen=True)
class PeerCheck:
    """What to require of the peer's leaf certificate beyond the CA chain."""

    remote_cert_tls: str | None = None  # "server" | "client"
    verify_x509_name: tuple[str, str] | None = None  # (name, "subject" | "name" | "name-prefix")
    peer_cert: str = "require"  # a server's verify-client-cert: "require" | "optional" | "none"
    crl: bytes | None = None  # PEM CRL (crl-verify): a revoked peer certificate is refused
    remote_cert_ku: tuple[int, ...] | None = None  # remote-cert-ku values (empty: just present)
    remote_cert_eku: str | None = None  # remote-cert-eku: dotted OID or OpenSSL long name
    # asked at each handshake instead of `crl` when set: the edge re-reads a changed CRL file (or
    # looks in a `crl-verify DIR dir`), which this sans-I/O core must not do itself
    is_revoked: Callable[[int], bool] | None = None
    ns_cert_type: str | None = None  # "server" | "client" (deprecated ns-cert-type)


def _load_certs(pem: bytes, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise ConfigError(f"{what}: not a PEM certificate ({exc})") from None
    if not certs:
        raise ConfigError(f"{what}: no certificate found")
    return certs


def build_context(
    *,
    ca: bytes,
    cert: bytes | None,
    key: bytes | None,
    is_server: bool,
    tls_version_min: str | None = None,
    tls_groups: str | None = None,
    peer_cert: str = "require",
    tls_cipher: str | None = None,
    tls_ciphersuites: str | None = None,
    tls_version_max: str | None = None,
    cert_profile: str = "legacy",
) -> SSL.Context:
    """A TLS context for one role; ConfigError if the PEM material is unusable."""
    method = SSL.TLS_SERVER_METHOD if is_server else SSL.TLS_CLIENT_METHOD
    ctx = SSL.Context(method)
    minimum = {
        "1.0": SSL.TLS1_VERSION,
        "1.1": SSL.TLS1_1_VERSION,
        "1.2": SSL.TLS1_2_VERSION,
        "1.3": SSL.TLS1_3_VERSION,
    }
    ctx.set_min_proto_version(minimum.get((tls_version_min or "1.2").split()[0], SSL.TLS1_2_VERSION))
    if tls_version_max:
        low, high = (tls_version_min or "1.2").split()[0], tls_version_max
        if float(high) < float(low):
            raise ConfigError(f"tls-version-max {high} is below tls-version-min {low}; raise it")
        ctx.set_max_proto_version(minimum[high])
    if tls_groups:
        _set_groups(ctx, tls_groups)
    set_cert_profile(ctx, cert_profile)  # before tls-cipher, which keeps the level it sets
    if tls_cipher:
        tls_ciphers.apply_tls_cipher(ctx, tls_cipher)
    if tls_ciphersuites:
        tls_ciphers.apply_tls_ciphersuites(ctx, tls_ciphersuites)
    store = ctx.get_cert_store()
    assert store is not None
    for c in _load_certs(ca, "ca"):
        store.add_cert(crypto.X509.from_cryptography(c))
    if cert is not None:
        chain = _load_certs(cert, "cert")
        try:
            ctx.use_certificate(chain[0])
        except SSL.Error as exc:
            raise ConfigError(
                f"cert: OpenSSL refuses the certificate at tls-cert-profile {cert_profile} ({exc}); "
                "use a stronger key (RSA 2048+ or EC) or a lower profile (legacy, insecure)"
            ) from None
        for extra in chain[1:]:
            ctx.add_extra_chain_cert(extra)
        if key is None:
            raise ConfigError("cert given without key")
        try:
            pkey = serialization.load_pem_private_key(key, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"key: cannot load the private key ({exc}); encrypted keys are not supported"
            ) from None
        ctx.use_privatekey(pkey)  # type: ignore[arg-type]
        try:
            ctx.check_privatekey()
        except SSL.Error:
            raise ConfigError("key does not match cert") from None
    if peer_cert == "none":
        ctx.set_verify(SSL.VERIFY_NONE, lambda *args: True)
    elif peer_cert == "optional":
        ctx.set_verify(SSL.VERIFY_PEER, lambda *args: bool(args[-1]))
    else:
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda *args: bool(args[-1]))
    # One plaintext message per record matters to OpenVPN; disable options that merge writes.
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    if is_server:
        # Nothing in OpenVPN resumes a TLS session (every key state is a full handshake), so no
        # session cache and no stateless tickets: those carry the whole session, client
        # certificate included, encrypted, ~1.3 KB per handshake for nothing (TLS 1.3 then
        # sends two small stateful tickets that nothing can redeem)
        ctx.set_options(SSL.OP_NO_TICKET)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    return ctx


#: `tls-cert-profile` as OpenVPN approximates it with OpenSSL: a security level (suiteb also
#: restricts the ciphers to Suite B). OpenVPN's default is legacy, below Debian's default of 2.
CERT_PROFILE_LEVELS = {"insecure": 0, "legacy": 1, "preferred": 2, "suiteb": 3}


def set_cert_profile(ctx: SSL.Context, profile: str) -> None:
    """Set the security level through the cipher string (pyOpenSSL has no call for it)."""
    level = CERT_PROFILE_LEVELS.get(profile)
    if level is None:
        raise ConfigError(f"tls-cert-profile: unknown profile '{profile}'; use legacy, preferred or suiteb")
    if profile == "suiteb":
        ciphers = b"SUITEB128"
    else:
        # the default list, read from a scratch context (pyOpenSSL freezes one that made a Connection)
        ciphers = ":".join(SSL.Connection(SSL.Context(SSL.TLS_METHOD)).get_cipher_list()).encode()
    ctx.set_cipher_list(ciphers + b":@SECLEVEL=%d" % level)


def _set_groups(ctx: SSL.Context, groups: str) -> None:
    """``tls-groups``: pyOpenSSL has no call for it, so use the OpenSSL binding it is built on."""
    lib: Any = getattr(SSL, "_lib", None)
    set_list = getattr(lib, "SSL_CTX_set1_curves_list", None)  # the groups list under its old name
    if set_list is None:
        raise ConfigError("tls-groups: this pyOpenSSL cannot set TLS groups; remove tls-groups")
    if set_list(ctx._context, groups.encode()) != 1:
        lib.ERR_clear_error()
        raise ConfigError(
            f"tls-groups: OpenSSL does not know all of '{groups}'; use names like X25519, prime256v1, "
            "secp384r1, X25519MLKEM768"
        )


def check_peer_certificate(cert: x509.Certificate, check: PeerCheck) -> None:
    if check.is_revoked is not None:
        if check.is_revoked(cert.serial_number):
            raise ProtocolError(f"peer certificate serial {cert.serial_number:x} is revoked (crl-verify)")
    elif check.crl is not None:
        try:
            crl = x509.load_pem_x509_crl(check.crl)
        except ValueError:
            raise ProtocolError("crl-verify: the CRL cannot be parsed") from None
        if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
            raise ProtocolError(f"peer certificate serial {cert.serial_number:x} is revoked (crl-verify)")
    if check.remote_cert_tls:
        want = (
            ExtendedKeyUsageOID.SERVER_AUTH
            if check.remote_cert_tls == "server"
            else ExtendedKeyUsageOID.CLIENT_AUTH
        )
        try:
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            eku = None
        if eku is None or want not in eku:
            raise ProtocolError(
                f"peer certificate lacks the TLS Web {check.remote_cert_tls.title()} Authentication usage "
                f"required by remote-cert-tls {check.remote_cert_tls}"
            )
    if check.ns_cert_type is not None:
        check_ns_cert_type(cert, check.ns_cert_type)
    if check.remote_cert_ku is not None:
        cert_usage.check_key_usage(cert, check.remote_cert_ku)
    if check.remote_cert_eku is not None:
        cert_usage.check_extended_key_usage(cert, check.remote_cert_eku)
    if check.verify_x509_name:
        name, kind = check.verify_x509_name
        cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if kind == "subject":
            ok = cert.subject.rfc4514_string() == name or _openvpn_subject(cert) == name
        elif kind == "name":
            ok = name in cns
        else:
            ok = any(str(cn).startswith(name) for cn in cns)
        if not ok:
            raise ProtocolError(f"peer certificate does not match verify-x509-name {name} {kind}")


def _openvpn_subject(cert: x509.Certificate) -> str:
    # OpenVPN prints subjects as "C=XX, O=..., CN=..." in certificate order.
    return ", ".join(f"{a.rfc4514_attribute_name}={a.value!s}" for a in cert.subject)


class TlsEndpoint:
    """One TLS session driven through memory BIOs."""

    def __init__(self, ctx: SSL.Context, *, is_server: bool, check: PeerCheck) -> None:
        self._conn = SSL.Connection(ctx, None)
        if is_server:
            self._conn.set_accept_state()
        else:
            self._conn.set_connect_state()
        self._check = check
        self.established = False
        self._peer_cn: str | None = None

    def feed(self, ciphertext: bytes) -> None:
        self._conn.bio_write(ciphertext)

    def pending_output(self) -> bytes:
        chunks = []
        while True:
            try:
                data = self._conn.bio_read(65536)
            except SSL.WantReadError:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)

    def advance(self) -> bool:
        """Drive the handshake; True once it is complete and the peer certificate is acceptable."""
        if self.established:
            return True
        try:
            self._conn.do_handshake()
        except SSL.WantReadError:
            return False
        except SSL.Error as exc:
            raise ProtocolError(f"TLS handshake failed: {_ssl_reason(exc)}") from None
        peer = self._conn.get_peer_certificate(as_cryptography=True)
        if peer is None:
            if self._check.peer_cert == "require":
                raise ProtocolError("peer sent no certificate")
        else:
            check_peer_certificate(peer, self._check)
        self._peer_cn = _common_name(peer)
        self.established = True
        return True

    def send(self, plaintext: bytes) -> None:
        """Write one message as one TLS record (OpenVPN parses record by record)."""
        try:
            self._conn.send(plaintext)
        except SSL.Error as exc:
            raise ProtocolError(f"TLS write failed: {_ssl_reason(exc)}") from None

    def receive(self) -> list[bytes]:
        """Plaintext records available now, one entry per SSL_read."""
        out = []
        while True:
            try:
                data = self._conn.recv(16384)
            except (SSL.WantReadError, SSL.ZeroReturnError):
                break
            except SSL.Error as exc:
                raise ProtocolError(f"TLS read failed: {_ssl_reason(exc)}") from None
            if not data:
                break
            out.append(data)
        return out

    def export_keying_material(self, label: bytes, length: int) -> bytes:
        return self._conn.export_keying_material(label, length, None)

    @property
    def version(self) -> str:
        return self._conn.get_protocol_version_name()

    @property
    def cipher(self) -> str:
        return self._conn.get_cipher_name() or "?"

    def peer_certificate_env(self) -> dict[str, str]:
        """The script variables of the peer's verified chain (see :func:`certificate_env`)."""
        return certificate_env(self._conn.get_verified_chain(as_cryptography=True) or [])

    def peer_common_name(self) -> str:
        if self._peer_cn is not None:
            return self._peer_cn  # the certificate cannot change once the handshake is done
        return _common_name(self._conn.get_peer_certificate(as_cryptography=True))


def _colon_hex(data: bytes) -> str:
    return ":".join(f"{b:02x}" for b in data)


def certificate_env(chain: list[x509.Certificate]) -> dict[str, str]:
    """OpenVPN's per-certificate script variables, depth 0 = the peer's own certificate.

    `tls_id_N` (subject, in certificate order), `X509_N_<attr>` per subject attribute,
    `tls_digest_N` (SHA-1), `tls_digest_sha256_N`, `tls_serial_N` and `tls_serial_hex_N`.
    """
    env: dict[str, str] = {}
    for depth, cert in enumerate(chain):
        parts = []
        for rdn in cert.subject.rdns:
            for attr in rdn:
                name = "emailAddress" if attr.oid == NameOID.EMAIL_ADDRESS else attr.rfc4514_attribute_name
                value = attr.value if isinstance(attr.value, str) else attr.value.hex()
                parts.append(f"{name}={value}")
                env[f"X509_{depth}_{name}"] = value
        env[f"tls_id_{depth}"] = ", ".join(parts)
        env[f"tls_digest_{depth}"] = _colon_hex(cert.fingerprint(hashes.SHA1()))
        env[f"tls_digest_sha256_{depth}"] = _colon_hex(cert.fingerprint(hashes.SHA256()))
        serial = cert.serial_number
        env[f"tls_serial_{depth}"] = str(serial)
        env[f"tls_serial_hex_{depth}"] = _colon_hex(
            serial.to_bytes(max(1, (serial.bit_length() + 7) // 8), "big")
        )
    return env


def _common_name(cert: x509.Certificate | None) -> str:
    if cert is None:
        return ""
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else ""


def _ssl_reason(exc: SSL.Error) -> str:
    try:
        errs = exc.args[0]
        return "; ".join(":".join(str(p) for p in e if p) for e in errs) or str(exc)
    except (IndexError, TypeError):
        return str(exc)
