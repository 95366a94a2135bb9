"""The TLS identity as the config gives it, made plain for proto/tls.py: a pkcs12 bundle split into
ca/cert/key, and an encrypted private key decrypted with the `askpass` passphrase (file or asked).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from pyovpn.config import Options
from pyovpn.edge.credentials import Asker, ask_user, key_passphrase
from pyovpn.errors import ConfigError

_PLAIN = serialization.NoEncryption()
_PEM = serialization.Encoding.PEM
_PKCS8 = serialization.PrivateFormat.PKCS8


@dataclass(frozen=True)
class TlsMaterial:
    ca: bytes | None
    cert: bytes | None
    key: bytes | None  # PEM, never encrypted


def _loads_without_password(load: Callable[[bytes | None], object]) -> bool:
    try:
        load(None)
    except TypeError:  # cryptography's "password was not given but the data is encrypted"
        return False
    except ValueError:
        return False
    return True


def decrypt_key(key: bytes, askpass: str | None, ask: Asker = ask_user) -> bytes:
    """The PEM private key, decrypted with the askpass passphrase when it is encrypted."""
    try:
        plain = serialization.load_pem_private_key(key, password=None)
    except TypeError:
        passphrase = key_passphrase(askpass, ask=ask)
        try:
            plain = serialization.load_pem_private_key(key, password=passphrase)
        except ValueError:
            raise ConfigError("key: the private key passphrase is wrong; check `askpass FILE`") from None
    except ValueError as exc:
        raise ConfigError(f"key: cannot load the private key ({exc}); give a PEM private key") from None
    return plain.private_bytes(_PEM, _PKCS8, _PLAIN)


def split_pkcs12(bundle: bytes, askpass: str | None, ask: Asker = ask_user) -> TlsMaterial:
    """ca, cert and key from a PKCS#12 bundle (its extra certificates are the CA)."""
    password: bytes | None = None
    if not _loads_without_password(lambda pw: pkcs12.load_pkcs12(bundle, pw)):
        try:
            pkcs12.load_pkcs12(bundle, b"")  # many tools write an empty password
            password = b""
        except ValueError:
            password = key_passphrase(askpass, ask=ask)
    try:
        loaded = pkcs12.load_pkcs12(bundle, password)
    except ValueError as exc:
        raise ConfigError(
            f"pkcs12: cannot open the bundle ({exc}); check the password (`askpass FILE`)"
        ) from None
    if loaded.cert is None or loaded.key is None:
        raise ConfigError("pkcs12: the bundle has no certificate and key; export them both into it")
    ca = b"".join(c.certificate.public_bytes(_PEM) for c in loaded.additional_certs) or None
    key = loaded.key.private_bytes(_PEM, _PKCS8, _PLAIN)
    return TlsMaterial(ca, loaded.cert.certificate.public_bytes(_PEM), key)


def tls_material(opts: Options, ask: Asker = ask_user) -> TlsMaterial:
    """The ca/cert/key to build the TLS context from; `ca`, `cert`, `key` win over the bundle's."""
    ca, cert, key = opts.ca, opts.cert, opts.key
    if opts.pkcs12 is not None:
        bundle = split_pkcs12(opts.pkcs12, opts.askpass, ask)
        ca, cert, key = ca or bundle.ca, cert or bundle.cert, key or bundle.key
    elif key is not None:
        key = decrypt_key(key, opts.askpass, ask)
    return TlsMaterial(ca, cert, key)
