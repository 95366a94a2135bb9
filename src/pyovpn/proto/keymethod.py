"""The key-method-2 message, peer-info (IV_*) variables and the OCC options string.

These are the first plaintext messages inside TLS: each side sends one key-method-2
message carrying randomness for the legacy PRF, its options string, optional
username/password and its capabilities (peer-info).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pyovpn.errors import ProtocolError

KEY_METHOD_2 = 2
PRE_MASTER_LEN = 48
RANDOM_LEN = 32
OPTIONS_STRING_MAX = 512

# IV_PROTO bits (ssl.h)
IV_PROTO_DATA_V2 = 1 << 1
IV_PROTO_REQUEST_PUSH = 1 << 2
IV_PROTO_TLS_KEY_EXPORT = 1 << 3
IV_PROTO_AUTH_PENDING_KW = 1 << 4
IV_PROTO_NCP_P2P = 1 << 5
IV_PROTO_DNS_OPTION = 1 << 6
IV_PROTO_CC_EXIT_NOTIFY = 1 << 7
IV_PROTO_AUTH_FAIL_TEMP = 1 << 8
IV_PROTO_DYN_TLS_CRYPT = 1 << 9
IV_PROTO_DATA_EPOCH = 1 << 10

_U16 = struct.Struct("!H")


def encode_string(s: str | bytes) -> bytes:
    """``u16 length || bytes || NUL``; the length counts the NUL, and the empty string is ``00 00``."""
    data = s.encode() if isinstance(s, str) else s
    if not data:
        return b"\x00\x00"
    return _U16.pack(len(data) + 1) + data + b"\x00"


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise ProtocolError(f"key-method-2 message truncated in {what}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def string(self, what: str, *, optional: bool = False) -> str:
        if optional and self.pos >= len(self.data):
            return ""
        (n,) = _U16.unpack(self.take(2, what))
        if n == 0:
            return ""
        raw = self.take(n, what)
        if raw[-1] != 0:
            raise ProtocolError(f"key-method-2 {what} is not NUL-terminated")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"key-method-2 {what} is not valid UTF-8") from None


@dataclass(frozen=True)
class KeyMethod2:
    random1: bytes
    random2: bytes
    options: str
    pre_master: bytes | None = None  # only the TLS client sends it
    username: str = ""
    password: str = ""
    peer_info: str = ""

    def encode(self) -> bytes:
        parts = [b"\x00\x00\x00\x00", bytes([KEY_METHOD_2])]
        if self.pre_master is not None:
            parts.append(self.pre_master)
        parts += [
            self.random1,
            self.random2,
            encode_string(self.options),
            encode_string(self.username),
            encode_string(self.password),
            encode_string(self.peer_info),
        ]
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes, *, from_client: bool) -> KeyMethod2:
        r = _Reader(data)
        if r.take(4, "header") != b"\x00\x00\x00\x00":
            raise ProtocolError("key-method-2 message does not start with four zero bytes")
        method = r.take(1, "key method")[0] & 0x0F
        if method != KEY_METHOD_2:
            raise ProtocolError(f"peer uses key-method {method}; only key-method 2 is supported")
        pre_master = r.take(PRE_MASTER_LEN, "pre-master") if from_client else None
        random1 = r.take(RANDOM_LEN, "random1")
        random2 = r.take(RANDOM_LEN, "random2")
        options = r.string("options string")
        username = r.string("username", optional=True)
        password = r.string("password", optional=True)
        peer_info = r.string("peer-info", optional=True)
        return cls(random1, random2, options, pre_master, username, password, peer_info)


def parse_peer_info(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.split("\n"):
        key, sep, value = line.strip().partition("=")
        if sep and key:
            out[key] = value
    return out


def peer_iv_proto(info: dict[str, str]) -> int:
    try:
        return int(info.get("IV_PROTO", "0"))
    except ValueError:
        return 0


# comp-lzo/compress settings that name a real algorithm; the others only frame
_STUB_COMPRESSION = {("comp-lzo", "no"), ("compress", ""), ("compress", "stub"), ("compress", "stub-v2")}


def compression_peer_info(compression: tuple[str, str] | None) -> list[str]:
    """The IV_* compression lines OpenVPN 2.6 sends for this comp-lzo/compress setting.

    None (no compression option) sends none, as OpenVPN does with the data channel offloaded.
    A real algorithm also offers LZ4 (which pyovpn decompresses) and, since pyovpn cannot
    decompress LZO, the LZO stub instead of LZO itself.
    """
    if compression is None:
        return []
    lines = [] if compression in _STUB_COMPRESSION else ["IV_LZ4=1", "IV_LZ4v2=1"]
    return [*lines, "IV_LZO_STUB=1", "IV_COMP_STUB=1", "IV_COMP_STUBv2=1"]


def build_peer_info(
    *,
    version: str,
    ciphers: list[str],
    iv_proto: int,
    pull: bool,
    tun_mtu: int,
    compression: tuple[str, str] | None = None,
) -> str:
    lines = []
    if pull:
        lines += [f"IV_VER={version}", "IV_PLAT=linux", "IV_TCPNL=1", f"IV_MTU={tun_mtu}"]
        if "AES-128-GCM" in ciphers and "AES-256-GCM" in ciphers:
            lines.append("IV_NCP=2")
    lines.append(f"IV_CIPHERS={':'.join(ciphers)}")
    lines.append(f"IV_PROTO={iv_proto}")
    lines += compression_peer_info(compression)
    return "\n".join(lines) + "\n"


def occ_options_string(
    *,
    tls_server: bool,
    proto: str,
    cipher: str | None,
    tun_mtu: int,
    tls_auth: bool,
    key_direction: int | None,
    ifconfig: str | None = None,
    compression: bool = False,
) -> str:
    """OpenVPN's options-consistency string; peers only compare it and warn, but old peers read ``cipher``."""
    link_mtu = tun_mtu + 49  # informational (AES-GCM over UDP); OpenVPN never rejects a mismatch
    proto_name = {"udp": "UDPv4", "tcp-client": "TCPv4_CLIENT", "tcp-server": "TCPv4_SERVER"}.get(
        proto, "UDPv4"
    )
    parts = ["V4", "dev-type tun", f"link-mtu {link_mtu}", f"tun-mtu {tun_mtu}", f"proto {proto_name}"]
    if ifconfig:
        parts.append(f"ifconfig {ifconfig}")
    if compression:
        parts.append("comp-lzo")  # OpenVPN's marker for any comp-lzo/compress setting, framing included
    if cipher:
        keysize = 128 if cipher == "AES-128-GCM" else 256
        parts += [f"cipher {cipher}", "auth [null-digest]", f"keysize {keysize}"]
    if tls_auth:
        parts.append("tls-auth")
        if key_direction is not None:
            parts.append(f"keydir {key_direction}")
    parts += ["key-method 2", "tls-server" if tls_server else "tls-client"]
    return ",".join(parts)
