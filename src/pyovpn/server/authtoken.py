"""`auth-gen-token`: the session tokens a server hands out after a successful login and later
accepts instead of the password, in OpenVPN 2.6's format, so a secret from
`openvpn --genkey auth-token` works here and tokens stay valid across both implementations.

A token is "SESS_ID_AT_" + base64(session id (12 bytes) || first-issued time || issued time
(each 64-bit big-endian seconds) || HMAC-SHA256 over username, session id and both times).
The HMAC key is the HMAC half of the 128-byte key material in the PEM secret.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import struct
from collections.abc import Callable
from dataclasses import dataclass
from hashlib import sha256

from pyovpn.errors import ConfigError

TOKEN_PREFIX = "SESS_ID_AT_"
PEM_NAME = "OpenVPN auth-token server key"
SESSION_ID_LEN = 12
_KEY_MATERIAL_LEN = 128  # OpenVPN's struct key: 64 bytes cipher, 64 bytes HMAC
_HMAC_OFFSET, _HMAC_KEY_LEN = 64, 32
_TOKEN_LEN = SESSION_ID_LEN + 8 + 8 + 32


def read_secret(pem: bytes) -> bytes:
    """The HMAC key in an auth-gen-token-secret PEM file."""
    text = pem.decode(errors="replace")
    begin, end = f"-----BEGIN {PEM_NAME}-----", f"-----END {PEM_NAME}-----"
    if begin not in text or end not in text:
        raise ConfigError(
            f"auth-gen-token-secret: not an '{PEM_NAME}' PEM file; make one with "
            "`pyovpn genkey auth-token FILE` or `openvpn --genkey auth-token FILE`"
        )
    body = text.split(begin, 1)[1].split(end, 1)[0]
    try:
        material = base64.b64decode("".join(body.split()), validate=True)
    except binascii.Error:
        raise ConfigError("auth-gen-token-secret: the key is not valid base64; generate a new one") from None
    if len(material) < _KEY_MATERIAL_LEN:
        raise ConfigError(
            f"auth-gen-token-secret: the key is {len(material)} bytes, need {_KEY_MATERIAL_LEN}"
        )
    return material[_HMAC_OFFSET : _HMAC_OFFSET + _HMAC_KEY_LEN]


def secret_pem(material: bytes) -> bytes:
    """A PEM secret file around 128 bytes of fresh key material."""
    if len(material) != _KEY_MATERIAL_LEN:
        raise ValueError(f"need {_KEY_MATERIAL_LEN} bytes of key material")
    b64 = base64.b64encode(material).decode()
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return (f"-----BEGIN {PEM_NAME}-----\n" + "\n".join(lines) + f"\n-----END {PEM_NAME}-----\n").encode()


@dataclass(frozen=True)
class Token:
    session_id: bytes
    first_issued: int
    issued: int


class TokenAuthority:
    """Mints tokens and checks them: HMAC, `lifetime` since first issue, and freshness.

    ``renewal``: how long a token stays valid after it was (re)issued; OpenVPN uses twice the
    renegotiation interval by default, since each renegotiation renews the token.
    """

    def __init__(self, key: bytes, *, lifetime: int, renewal: int, rng: Callable[[int], bytes]) -> None:
        self._key = key
        self.lifetime = lifetime
        self.renewal = renewal
        self._rng = rng

    def _mac(self, username: str, session_id: bytes, first: int, issued: int) -> bytes:
        data = username.encode() + session_id + struct.pack(">qq", first, issued)
        return hmac.new(self._key, data, sha256).digest()

    def mint(self, username: str, now: int, renewing: Token | None = None) -> str:
        session_id = renewing.session_id if renewing else self._rng(SESSION_ID_LEN)
        first = renewing.first_issued if renewing else now
        body = session_id + struct.pack(">qq", first, now) + self._mac(username, session_id, first, now)
        return TOKEN_PREFIX + base64.b64encode(body).decode()

    def check(self, username: str, token: str, now: int) -> Token | str:
        """The token's contents if it is valid now, else why not."""
        if not token.startswith(TOKEN_PREFIX):
            return "not an auth-token"
        try:
            body = base64.b64decode(token[len(TOKEN_PREFIX) :], validate=True)
        except binascii.Error:
            return "malformed auth-token"
        if len(body) != _TOKEN_LEN:
            return "malformed auth-token"
        session_id = body[:SESSION_ID_LEN]
        first, issued = struct.unpack(">qq", body[SESSION_ID_LEN : SESSION_ID_LEN + 16])
        if not hmac.compare_digest(
            body[SESSION_ID_LEN + 16 :], self._mac(username, session_id, first, issued)
        ):
            return "auth-token HMAC mismatch (other secret or other username)"
        if self.lifetime and now > first + self.lifetime:
            return "auth-token expired (auth-gen-token lifetime)"
        if self.renewal and now > issued + self.renewal:
            return "auth-token not renewed in time"
        return Token(session_id, first, issued)


def authority(
    setting: tuple[int, int, bool] | None,
    secret_pem: bytes | None,
    reneg_sec: int,
    rng: Callable[[int], bytes],
) -> TokenAuthority | None:
    """The server's token authority for `auth-gen-token`, None without it.

    Without `auth-gen-token-secret` the key is random, so tokens die with the server instance
    (OpenVPN does the same per process).
    """
    if setting is None:
        return None
    lifetime, renewal, _external = setting
    key = read_secret(secret_pem) if secret_pem is not None else rng(_HMAC_KEY_LEN)
    # a token lives two renewal periods, as in OpenVPN (renewal defaults to reneg-sec)
    return TokenAuthority(key, lifetime=lifetime, renewal=2 * (renewal or reneg_sec), rng=rng)
