"""Data-channel key derivation: the legacy TLS 1.0 PRF method and TLS-EKM (RFC 5705).

Both produce OpenVPN's 256-byte ``key2`` block; :func:`split_key2`
turns it into per-direction keys and nonce tails.
"""

from __future__ import annotations

import hashlib
import hmac

from pyovpn.datachannel.api import Cipher, KeyDirection

KEY2_LEN = 256
EKM_LABEL_DATAKEYS = b"EXPORTER-OpenVPN-datakeys"
EKM_LABEL_P2P_PEERID = b"EXPORTER-OpenVPN-p2p-peerid"
P2P_DEFAULT_PEER_ID = 0x76706E  # "vpn", when no EKM is available


def _p_hash(digest: str, secret: bytes, seed: bytes, length: int) -> bytes:
    out = b""
    a = seed
    while len(out) < length:
        a = hmac.new(secret, a, digest).digest()
        out += hmac.new(secret, a + seed, digest).digest()
    return out[:length]


def tls1_prf(secret: bytes, seed: bytes, length: int) -> bytes:
    """TLS 1.0/1.1 PRF: P_MD5(S1) XOR P_SHA1(S2) over halves of the secret (they overlap if odd)."""
    half = (len(secret) + 1) // 2
    s1, s2 = secret[:half], secret[len(secret) - half :]
    md5 = _p_hash("md5", s1, seed, length)
    sha = _p_hash("sha1", s2, seed, length)
    return bytes(a ^ b for a, b in zip(md5, sha, strict=True))


def prf_key2(
    *,
    pre_master: bytes,
    client_random1: bytes,
    server_random1: bytes,
    client_random2: bytes,
    server_random2: bytes,
    client_session_id: bytes,
    server_session_id: bytes,
) -> bytes:
    """OpenVPN's legacy key expansion (used when TLS-EKM is not negotiated)."""
    hashlib.md5(b"", usedforsecurity=False)  # fail early and clearly where MD5 is disabled
    master = tls1_prf(pre_master, b"OpenVPN master secret" + client_random1 + server_random1, 48)
    seed = b"OpenVPN key expansion" + client_random2 + server_random2 + client_session_id + server_session_id
    return tls1_prf(master, seed, KEY2_LEN)


def split_key2(key2: bytes, cipher: Cipher, *, tls_client: bool) -> tuple[KeyDirection, KeyDirection]:
    """Map OpenVPN's 256-byte key block to this side's (encrypt, decrypt) directions.

    key2[0:64] is the client→server cipher key, key2[64:72] its nonce tail,
    key2[128:192] the server→client key and key2[192:200] its tail (§4.1, §7.2).
    """
    if len(key2) != 256:
        raise ValueError(f"the data-channel key block must be 256 bytes, got {len(key2)}")
    klen = cipher.key_len
    c2s = KeyDirection(bytes(key2[0:klen]), bytes(key2[64:72]))
    s2c = KeyDirection(bytes(key2[128 : 128 + klen]), bytes(key2[192:200]))
    return (c2s, s2c) if tls_client else (s2c, c2s)
