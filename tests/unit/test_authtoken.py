"""auth-gen-token tokens: minting, checking, expiry, tampering, and OpenVPN's secret file format."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pyovpn.config import parse_config_text
from pyovpn.errors import ConfigError
from pyovpn.server.authtoken import TOKEN_PREFIX, Token, TokenAuthority, authority, read_secret, secret_pem
from tests.unit.configtext import INLINE_CREDENTIALS

KEY = bytes(range(32))


def _authority(lifetime: int = 0, renewal: int = 7200) -> TokenAuthority:
    return TokenAuthority(KEY, lifetime=lifetime, renewal=renewal, rng=os.urandom)


def test_token_layout() -> None:
    token = _authority().mint("alice", 1_000_000)
    assert token.startswith(TOKEN_PREFIX)
    body = base64.b64decode(token[len(TOKEN_PREFIX) :])
    assert len(body) == 12 + 8 + 8 + 32
    assert int.from_bytes(body[12:20], "big") == 1_000_000 == int.from_bytes(body[20:28], "big")


def test_valid_token_checks_out_and_renewal_keeps_session() -> None:
    a = _authority()
    first = a.check("alice", a.mint("alice", 1000), 1500)
    assert isinstance(first, Token) and first.first_issued == 1000
    renewed = a.check("alice", a.mint("alice", 2000, first), 2100)
    assert isinstance(renewed, Token)
    assert renewed.session_id == first.session_id and renewed.first_issued == 1000 and renewed.issued == 2000


def test_other_user_or_secret_or_tampering_refused() -> None:
    a = _authority()
    token = a.mint("alice", 1000)
    assert "HMAC mismatch" in str(a.check("mallory", token, 1000))
    other = TokenAuthority(bytes(32), lifetime=0, renewal=7200, rng=os.urandom)
    assert "HMAC mismatch" in str(other.check("alice", token, 1000))
    body = bytearray(base64.b64decode(token[len(TOKEN_PREFIX) :]))
    body[25] ^= 1  # move the issue time
    assert "HMAC mismatch" in str(
        a.check("alice", TOKEN_PREFIX + base64.b64encode(bytes(body)).decode(), 1000)
    )
    assert "malformed" in str(a.check("alice", TOKEN_PREFIX + "AAAA", 1000))
    assert "not an auth-token" in str(a.check("alice", "plainpassword", 1000))


def test_lifetime_and_renewal_expiry() -> None:
    a = _authority(lifetime=600, renewal=100)
    token = a.mint("alice", 1000)
    assert isinstance(a.check("alice", token, 1100), Token)
    assert "not renewed" in str(a.check("alice", token, 1101))
    renewed = a.mint("alice", 1590, Token(b"x" * 12, 1000, 1000))
    assert "lifetime" in str(a.check("alice", renewed, 1601))


def test_secret_round_trip() -> None:
    material = os.urandom(128)
    assert read_secret(secret_pem(material)) == material[64:96]
    with pytest.raises(ConfigError, match="openvpn --genkey auth-token"):
        read_secret(b"-----BEGIN OpenVPN Static key V1-----\n")


def test_reads_openvpn_genkey_output(tmp_path: Path) -> None:
    openvpn = shutil.which("openvpn") or "/usr/sbin/openvpn"
    if not Path(openvpn).exists():
        pytest.skip("stock openvpn is not installed (scripts/setup.sh installs it)")
    f = tmp_path / "auth-token.key"
    subprocess.run([openvpn, "--genkey", "auth-token", str(f)], check=True, capture_output=True)
    assert len(read_secret(f.read_bytes())) == 32


def test_options(tmp_path: Path) -> None:
    f = tmp_path / "s.key"
    f.write_bytes(secret_pem(bytes(128)))
    base = INLINE_CREDENTIALS + "dh none\ndev tun\ntopology subnet\nserver 10.8.0.0 255.255.255.0\n"
    o = parse_config_text(base + f"auth-gen-token 3600 600 external-auth\nauth-gen-token-secret {f}\n")
    assert o.auth_gen_token == (3600, 600, True) and o.auth_gen_token_secret == f.read_bytes()
    assert parse_config_text(base + "auth-gen-token\n").auth_gen_token == (0, 0, False)
    tokens = authority(o.auth_gen_token, o.auth_gen_token_secret, 3600, os.urandom)
    assert tokens is not None and tokens.renewal == 1200 and tokens.lifetime == 3600
    with pytest.raises(ConfigError, match="not an integer"):
        parse_config_text(base + "auth-gen-token soon\n")


def test_pyovpn_genkey_auth_token(tmp_path: Path) -> None:
    from pyovpn.cli import main

    f = tmp_path / "tok.key"
    assert main(["genkey", "auth-token", str(f)]) == 0
    assert f.stat().st_mode & 0o077 == 0
    assert len(read_secret(f.read_bytes())) == 32
    assert main(["genkey", "auth-token", str(f)]) == 1  # never overwrites a secret
    # the other kinds come from the same command (tls-crypt-v2 and static keys)
    assert main(["genkey", "secret", str(tmp_path / "x")]) == 0
    assert "BEGIN OpenVPN Static key V1" in (tmp_path / "x").read_text()
