"""Encrypted private keys and pkcs12 bundles become plain ca/cert/key (edge/keymaterial.py)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from pyovpn.config import parse_config_text
from pyovpn.daemon import session_config
from pyovpn.edge.keymaterial import decrypt_key, split_pkcs12, tls_material
from pyovpn.errors import ConfigError
from pyovpn.proto.tls import build_context
from pyovpn.tools.pki import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _encrypted_key(pki: Pki, passphrase: bytes) -> bytes:
    key = serialization.load_pem_private_key(pki.client_key.read_bytes(), password=None)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase),
    )


def _bundle(pki: Pki, password: bytes | None) -> bytes:
    key = serialization.load_pem_private_key(pki.client_key.read_bytes(), password=None)
    cert = x509.load_pem_x509_certificate(pki.client_crt.read_bytes())
    ca = x509.load_pem_x509_certificate(pki.ca_crt.read_bytes())
    enc = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    return pkcs12.serialize_key_and_certificates(b"client", key, cert, [ca], enc)  # type: ignore[arg-type]


def _askpass_file(tmp_path: Path, content: str) -> str:
    """An askpass file holding ``content``; returns its path."""
    pw = tmp_path / "pw"
    pw.write_text(content)
    return str(pw)


def _no_prompt(prompt: str, echo: bool) -> str:
    raise AssertionError(f"unexpected prompt {prompt!r}")


def test_encrypted_key_with_askpass_file(pki: Pki, tmp_path: Path) -> None:
    encrypted = _encrypted_key(pki, b"open sesame")
    assert b"ENCRYPTED" in encrypted
    pw = _askpass_file(tmp_path, "open sesame\n")
    plain = decrypt_key(encrypted, pw, _no_prompt)
    # the decrypted key works with its certificate in a real TLS context
    build_context(ca=pki.ca_crt.read_bytes(), cert=pki.client_crt.read_bytes(), key=plain, is_server=False)


def test_encrypted_key_passphrase_asked_when_no_file(pki: Pki) -> None:
    asked: list[tuple[str, bool]] = []

    def user(prompt: str, echo: bool) -> str:
        asked.append((prompt, echo))
        return "typed"

    decrypt_key(_encrypted_key(pki, b"typed"), "", user)
    assert asked == [("Enter Private Key Password:", False)]


def test_wrong_passphrase_says_so(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="passphrase is wrong"):
        decrypt_key(_encrypted_key(pki, b"right"), _askpass_file(tmp_path, "wrong\n"), _no_prompt)


def test_plain_key_needs_no_passphrase(pki: Pki) -> None:
    plain = decrypt_key(pki.client_key.read_bytes(), None, _no_prompt)
    assert b"PRIVATE KEY" in plain


@pytest.mark.parametrize("password", [None, b"p12pass"])
def test_pkcs12_gives_ca_cert_and_key(pki: Pki, tmp_path: Path, password: bytes | None) -> None:
    pw = _askpass_file(tmp_path, (password or b"").decode() + "\n")
    m = split_pkcs12(_bundle(pki, password), pw, _no_prompt)
    assert m.ca is not None and m.cert is not None and m.key is not None
    assert x509.load_pem_x509_certificate(m.ca) == x509.load_pem_x509_certificate(pki.ca_crt.read_bytes())
    assert x509.load_pem_x509_certificate(m.cert) == x509.load_pem_x509_certificate(
        pki.client_crt.read_bytes()
    )
    build_context(ca=m.ca, cert=m.cert, key=m.key, is_server=False)


def test_pkcs12_config_end_to_end(pki: Pki, tmp_path: Path) -> None:
    p12 = tmp_path / "client.p12"
    p12.write_bytes(_bundle(pki, b"p12pass"))
    pw = _askpass_file(tmp_path, "p12pass\n")
    text = f"client\ndev tun\nremote 192.0.2.1 1194\npkcs12 {p12}\naskpass {pw}\n"
    opts = parse_config_text(text)
    assert opts.ca is None and opts.pkcs12 is not None
    assert tls_material(opts, _no_prompt).ca is not None
    assert session_config(opts).tls_context is not None


def test_pkcs12_wrong_password(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pkcs12: cannot open the bundle"):
        split_pkcs12(_bundle(pki, b"p12pass"), _askpass_file(tmp_path, "nope\n"), _no_prompt)


def test_inline_pkcs12_block_is_base64(pki: Pki) -> None:
    bundle = _bundle(pki, None)
    b64 = base64.encodebytes(bundle).decode()
    opts = parse_config_text(f"client\ndev tun\nremote 192.0.2.1 1194\n<pkcs12>\n{b64}</pkcs12>\n")
    assert opts.pkcs12 == bundle
    assert tls_material(opts, _no_prompt).cert is not None
    with pytest.raises(ConfigError, match="not base64"):
        parse_config_text("client\ndev tun\nremote 192.0.2.1 1194\n<pkcs12>\n#!not base64\n</pkcs12>\n")
