"""`tls-cipher` and `tls-ciphersuites`: OpenVPN's cipher names turned into OpenSSL's and applied.

OpenVPN spells TLS <= 1.2 cipher suites the IANA way with dashes
(``TLS-ECDHE-RSA-WITH-AES-256-GCM-SHA384``) and translates them to OpenSSL's names
(``ECDHE-RSA-AES256-GCM-SHA384``); anything else in the list (``DEFAULT:@SECLEVEL=0``,
``HIGH:!aNULL``, OpenSSL names) goes to OpenSSL unchanged. TLS 1.3 suites
(``tls-ciphersuites``) already use OpenSSL's names.
"""

from __future__ import annotations

import re
from typing import Any

from OpenSSL import SSL

from pyovpn.errors import ConfigError

_IANA = re.compile(r"TLS-(?P<kx>[A-Z0-9-]+?)-WITH-(?P<enc>[A-Z0-9-]+)")
# Bulk cipher and MAC in IANA spelling -> OpenSSL spelling (the MAC suffix included).
_ENC = {
    "AES-128-GCM-SHA256": "AES128-GCM-SHA256",
    "AES-256-GCM-SHA384": "AES256-GCM-SHA384",
    "AES-128-CBC-SHA": "AES128-SHA",
    "AES-256-CBC-SHA": "AES256-SHA",
    "AES-128-CBC-SHA256": "AES128-SHA256",
    "AES-256-CBC-SHA256": "AES256-SHA256",
    "AES-256-CBC-SHA384": "AES256-SHA384",
    "CHACHA20-POLY1305-SHA256": "CHACHA20-POLY1305",
    "CAMELLIA-128-CBC-SHA": "CAMELLIA128-SHA",
    "CAMELLIA-256-CBC-SHA": "CAMELLIA256-SHA",
    "3DES-EDE-CBC-SHA": "DES-CBC3-SHA",
    "AES-128-CCM": "AES128-CCM",
    "AES-256-CCM": "AES256-CCM",
}
# OpenSSL leaves out the key exchange for plain RSA and writes EDH for ephemeral DH with 3DES.
_KX = {
    "RSA": "",
    "ECDHE-ECDSA": "ECDHE-ECDSA-",
    "ECDHE-RSA": "ECDHE-RSA-",
    "DHE-RSA": "DHE-RSA-",
    "DHE-DSS": "DHE-DSS-",
}


def openssl_name(name: str) -> str:
    """One `tls-cipher` entry in OpenSSL's spelling (entries OpenVPN would not translate pass)."""
    m = _IANA.fullmatch(name.upper())
    if m is None or m.group("kx") not in _KX or m.group("enc") not in _ENC:
        return name
    kx, enc = _KX[m.group("kx")], _ENC[m.group("enc")]
    if enc == "DES-CBC3-SHA" and kx.startswith("DHE-"):
        kx = "EDH-" + kx.removeprefix("DHE-")
    return kx + enc


def openssl_cipher_list(tls_cipher: str) -> str:
    return ":".join(openssl_name(part) for part in tls_cipher.split(":") if part)


def apply_tls_cipher(ctx: SSL.Context, tls_cipher: str) -> None:
    """Restrict the TLS <= 1.2 suites; ConfigError if OpenSSL knows none of them."""
    translated = openssl_cipher_list(tls_cipher)
    try:
        ctx.set_cipher_list(translated.encode())
    except SSL.Error:
        raise ConfigError(
            f"tls-cipher: OpenSSL accepts none of '{tls_cipher}' (as OpenSSL names: '{translated}'); "
            "list suites `openssl ciphers -v` shows, or remove tls-cipher to use the defaults"
        ) from None


def apply_tls_ciphersuites(ctx: SSL.Context, suites: str) -> None:
    """Restrict the TLS 1.3 suites; pyOpenSSL has no call for it, so use the binding below it."""
    lib: Any = getattr(SSL, "_lib", None)
    set_suites = getattr(lib, "SSL_CTX_set_ciphersuites", None)
    if set_suites is None:
        raise ConfigError(
            "tls-ciphersuites: this pyOpenSSL cannot set TLS 1.3 suites; remove tls-ciphersuites"
        )
    if set_suites(ctx._context, suites.encode()) != 1:
        lib.ERR_clear_error()
        raise ConfigError(
            f"tls-ciphersuites: OpenSSL accepts none of '{suites}'; use TLS 1.3 names such as "
            "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256"
        )
