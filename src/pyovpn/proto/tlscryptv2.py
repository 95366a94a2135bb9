"""tls-crypt-v2: per-client tls-crypt keys, their PEM key files and the wrapped client key (WKc).

The server key (Ke, Ka) protects each client's tls-crypt key Kc together with metadata:
``WKc = T || AES-256-CTR(Ke, IV=T[:16], Kc || metadata) || len`` with
``T = HMAC-SHA256(Ka, len || Kc || metadata)`` and ``len`` the 16-bit length of all of WKc.
A client appends WKc to its first packet (P_CONTROL_HARD_RESET_CLIENT_V3) so that a server
that keeps no per-client key can still learn Kc. After that both sides run plain tls-crypt
with Kc. Sans-I/O: randomness, clocks and scripts come from the caller.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from pyovpn.errors import AuthenticationError, ProtocolError
from pyovpn.proto.packets import ControlPacket, Opcode, ReliabilityHeader
from pyovpn.proto.tlswrap import STATIC_KEY_LEN, TlsCrypt

SERVER_PEM_NAME = "OpenVPN tls-crypt-v2 server key"
CLIENT_PEM_NAME = "OpenVPN tls-crypt-v2 client key"
SERVER_KEY_LEN = 128  # OpenVPN's struct key: 64 bytes cipher, 64 bytes HMAC
CLIENT_KEY_LEN = STATIC_KEY_LEN  # Kc is a full two-direction tls-crypt key
TAG_LEN = 32
MAX_WKC_LEN = 1024
MAX_METADATA_LEN = MAX_WKC_LEN - (CLIENT_KEY_LEN + TAG_LEN + 2)
MIN_WKC_LEN = TAG_LEN + CLIENT_KEY_LEN + 2

METADATA_TYPE_USER = 0x00
METADATA_TYPE_TIMESTAMP = 0x01

# Early negotiation (2.6): a client's V3 reset whose packet-id starts with 0x0f can resend WKc
# in its first CONTROL packet (P_CONTROL_WKC_V1), so a server may answer it statelessly; the
# server asks for that with a TLV in its reset's payload.
EARLY_NEG_MASK = 0xFF000000
EARLY_NEG_START = 0x0F000000
TLV_TYPE_EARLY_NEG_FLAGS = 0x0001
EARLY_NEG_FLAG_RESEND_WKC = 0x0001
RESEND_WKC_TLV = (
    TLV_TYPE_EARLY_NEG_FLAGS.to_bytes(2, "big")
    + (2).to_bytes(2, "big")
    + EARLY_NEG_FLAG_RESEND_WKC.to_bytes(2, "big")
)


def offers_early_negotiation(packet: bytes) -> bool:
    """Whether a (tls-crypt wrapped) V3 reset's packet-id marks a client that can resend WKc."""
    if len(packet) < 13:
        return False
    return int.from_bytes(packet[9:13], "big") & EARLY_NEG_MASK == EARLY_NEG_START


def asks_to_resend_wkc(payload: bytes) -> bool:
    """Whether a server reset's TLV payload sets EARLY_NEG_FLAG_RESEND_WKC (ProtocolError if malformed)."""
    pos = 0
    while pos < len(payload):
        if pos + 4 > len(payload):
            raise ProtocolError("malformed TLV in the server's hard reset")
        kind = int.from_bytes(payload[pos : pos + 2], "big")
        length = int.from_bytes(payload[pos + 2 : pos + 4], "big")
        value = payload[pos + 4 : pos + 4 + length]
        if len(value) != length:
            raise ProtocolError("malformed TLV in the server's hard reset")
        if kind == TLV_TYPE_EARLY_NEG_FLAGS:
            if length != 2:
                raise ProtocolError("malformed early-negotiation flags in the server's hard reset")
            if int.from_bytes(value, "big") & EARLY_NEG_FLAG_RESEND_WKC:
                return True
        pos += 4 + length
    return False


# Opcodes whose packets carry WKc after the tls-crypt-protected part.
WKC_OPCODES = frozenset({Opcode.CONTROL_HARD_RESET_CLIENT_V3, Opcode.CONTROL_WKC_V1})

_PEM_RE = re.compile(r"-----BEGIN ([A-Za-z0-9 -]+)-----(.*?)-----END \1-----", re.S)


class KeyFileError(ValueError):
    """A tls-crypt-v2 key file that cannot be used; the message says what to do."""


def pem_encode(name: str, data: bytes) -> str:
    """PEM text as OpenSSL writes it: base64 in 64-column lines between BEGIN/END lines."""
    b64 = base64.b64encode(data).decode()
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return f"-----BEGIN {name}-----\n" + "\n".join(lines) + f"\n-----END {name}-----\n"


def pem_decode(text: str, name: str) -> bytes:
    for match in _PEM_RE.finditer(text):
        if match.group(1) != name:
            continue
        body = "".join(match.group(2).split())
        try:
            return base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise KeyFileError(f"the {name} block is not valid base64; regenerate the key") from None
    found = [m.group(1) for m in _PEM_RE.finditer(text)]
    hint = f" (found: {', '.join(found)})" if found else ""
    raise KeyFileError(f"no '-----BEGIN {name}-----' block{hint}")


def key_kind(text: str) -> str:
    """``server`` or ``client``: which tls-crypt-v2 key a PEM text holds."""
    names = {m.group(1) for m in _PEM_RE.finditer(text)}
    if SERVER_PEM_NAME in names:
        return "server"
    if CLIENT_PEM_NAME in names:
        return "client"
    raise KeyFileError(
        "not a tls-crypt-v2 key: expected a '-----BEGIN OpenVPN tls-crypt-v2 server key-----' or "
        "'... client key-----' block (make one with `openvpn --genkey tls-crypt-v2-server FILE`)"
    )


@dataclass(frozen=True, repr=False)
class ServerKey:
    raw: bytes  # 128 bytes as stored in the file

    @property
    def cipher_key(self) -> bytes:
        return self.raw[:32]

    @property
    def hmac_key(self) -> bytes:
        return self.raw[64:96]

    def to_pem(self) -> str:
        return pem_encode(SERVER_PEM_NAME, self.raw)


@dataclass(frozen=True, repr=False)
class ClientKey:
    kc: bytes  # 256-byte tls-crypt key
    wkc: bytes  # Kc and metadata wrapped by the server key

    def to_pem(self) -> str:
        return pem_encode(CLIENT_PEM_NAME, self.kc + self.wkc)


def parse_server_key(text: str) -> ServerKey:
    raw = pem_decode(text, SERVER_PEM_NAME)
    if len(raw) != SERVER_KEY_LEN:
        raise KeyFileError(f"tls-crypt-v2 server key must hold {SERVER_KEY_LEN} bytes, not {len(raw)}")
    return ServerKey(raw)


def parse_client_key(text: str) -> ClientKey:
    raw = pem_decode(text, CLIENT_PEM_NAME)
    if len(raw) < CLIENT_KEY_LEN + MIN_WKC_LEN or len(raw) > CLIENT_KEY_LEN + MAX_WKC_LEN:
        raise KeyFileError(f"tls-crypt-v2 client key has an impossible length ({len(raw)} bytes)")
    kc, wkc = raw[:CLIENT_KEY_LEN], raw[CLIENT_KEY_LEN:]
    if int.from_bytes(wkc[-2:], "big") != len(wkc):
        raise KeyFileError("tls-crypt-v2 client key: the wrapped key's length field is wrong")
    return ClientKey(kc, wkc)


def _ctr(key: bytes, iv: bytes, data: bytes) -> bytes:
    enc = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    return enc.update(data) + enc.finalize()


def wrap_client_key(server: ServerKey, kc: bytes, metadata: bytes) -> bytes:
    """WKc for client key ``kc`` and ``metadata`` (type byte first)."""
    if len(kc) != CLIENT_KEY_LEN:
        raise ValueError("tls-crypt-v2 client key must be 256 bytes")
    if len(metadata) > MAX_METADATA_LEN:
        raise ValueError(f"tls-crypt-v2 metadata too long ({len(metadata)} bytes, max {MAX_METADATA_LEN})")
    net_len = (TAG_LEN + len(kc) + len(metadata) + 2).to_bytes(2, "big")
    tag = hmac.new(server.hmac_key, net_len + kc + metadata, hashlib.sha256).digest()
    return tag + _ctr(server.cipher_key, tag[:16], kc + metadata) + net_len


def unwrap_client_key(server: ServerKey, wkc: bytes) -> tuple[bytes, bytes]:
    """(Kc, metadata) from WKc; AuthenticationError for a key made with another server key."""
    if len(wkc) > MAX_WKC_LEN:
        raise ProtocolError("tls-crypt-v2 wrapped client key too long")
    if len(wkc) < MIN_WKC_LEN:
        raise ProtocolError("tls-crypt-v2 wrapped client key too short")
    net_len = wkc[-2:]
    if int.from_bytes(net_len, "big") != len(wkc):
        raise ProtocolError("tls-crypt-v2 wrapped client key has a wrong length field")
    tag = wkc[:TAG_LEN]
    plain = _ctr(server.cipher_key, tag[:16], wkc[TAG_LEN:-2])
    expect = hmac.new(server.hmac_key, net_len + plain, hashlib.sha256).digest()
    if not hmac.compare_digest(tag, expect):
        raise AuthenticationError(
            "tls-crypt-v2 client key authentication failed: the client key was not made with "
            "this server's tls-crypt-v2 key (regenerate it with "
            "--genkey tls-crypt-v2-client --tls-crypt-v2 SERVERKEY)"
        )
    return plain[:CLIENT_KEY_LEN], plain[CLIENT_KEY_LEN:]


def timestamp_metadata(unix_time: int) -> bytes:
    return bytes([METADATA_TYPE_TIMESTAMP]) + unix_time.to_bytes(8, "big", signed=True)


def user_metadata(data: bytes) -> bytes:
    return bytes([METADATA_TYPE_USER]) + data


def check_key_age(metadata: bytes, max_days: int, now: int) -> None:
    """``--tls-crypt-v2-max-age``: refuse keys without a timestamp or older than ``max_days``."""
    if len(metadata) < 9:
        raise AuthenticationError("tls-crypt-v2 client key metadata is too small to hold a timestamp")
    if metadata[0] != METADATA_TYPE_TIMESTAMP:
        raise AuthenticationError("tls-crypt-v2 client key has no timestamp (tls-crypt-v2-max-age is set)")
    made = int.from_bytes(metadata[1:9], "big", signed=True)
    if now - made > max_days * 86400:
        raise AuthenticationError(
            f"tls-crypt-v2 client key is older than tls-crypt-v2-max-age {max_days} days"
        )


def split_wkc(packet: bytes) -> tuple[bytes, bytes]:
    """(tls-crypt packet, WKc) of a packet that carries WKc at its end."""
    if len(packet) < 1 + 2:
        raise ProtocolError("packet too short to carry a tls-crypt-v2 client key")
    wkc_len = int.from_bytes(packet[-2:], "big")
    if wkc_len < MIN_WKC_LEN or wkc_len > len(packet) - 1:
        raise ProtocolError("cannot locate the tls-crypt-v2 client key in the packet")
    return packet[:-wkc_len], packet[-wkc_len:]


class TlsCryptV2Client:
    """Client wrap: tls-crypt with Kc, WKc appended to the packets whose opcode carries it."""

    # the packet-id's top byte tells a 2.6 server that we can resend WKc (early negotiation);
    # 2.5 clients start at 0 and servers keep state for them from the first packet
    PID_START = EARLY_NEG_START

    def __init__(self, key: ClientKey, *, replay_window: int = 64) -> None:
        self._inner = TlsCrypt(key.kc, is_server=False, replay_window=replay_window, pid_start=self.PID_START)
        self._wkc = key.wkc
        self.wkc_len = len(key.wkc)
        self.overhead = self._inner.overhead

    def skip_replay_ids(self, last_sent: int) -> None:
        self._inner.skip_replay_ids(last_sent)

    def wrap(self, opcode: Opcode, key_id: int, session_id: bytes, rh: ReliabilityHeader, now: int) -> bytes:
        out = self._inner.wrap(opcode, key_id, session_id, rh, now)
        return out + self._wkc if opcode in WKC_OPCODES else out

    def unwrap(self, packet: bytes) -> ControlPacket:
        return self._inner.unwrap(packet)


# Called with the metadata of every client key before it is used; raises AuthenticationError
# to refuse it (tls-crypt-v2-max-age, tls-crypt-v2-verify).
MetadataCheck = Callable[[bytes], None]


class TlsCryptV2Server:
    """Server wrap: learns Kc from the client's first packet, then runs tls-crypt with it."""

    def __init__(
        self, server_key: ServerKey, *, check: MetadataCheck | None = None, replay_window: int = 64
    ) -> None:
        self._server_key = server_key
        self._check = check
        self._replay_window = replay_window
        self._inner: TlsCrypt | None = None
        self.metadata: bytes | None = None
        self.overhead = 8 + TlsCrypt.TAG_LEN

    def accept_client_key(self, packet: bytes) -> None:
        """Unwrap and check the WKc a client's V3 reset / WKC_V1 packet carries; keep Kc."""
        if not packet or packet[0] >> 3 not in WKC_OPCODES:
            raise ProtocolError(
                "tls-crypt-v2 server: the first packet must be a P_CONTROL_HARD_RESET_CLIENT_V3"
            )
        _, wkc = split_wkc(packet)
        kc, metadata = unwrap_client_key(self._server_key, wkc)
        if self._check is not None:
            self._check(metadata)
        self._inner = TlsCrypt(kc, is_server=True, replay_window=self._replay_window)
        self.metadata = metadata

    def skip_replay_ids(self, last_sent: int) -> None:
        if self._inner is not None:
            self._inner.skip_replay_ids(last_sent)

    def wrap(self, opcode: Opcode, key_id: int, session_id: bytes, rh: ReliabilityHeader, now: int) -> bytes:
        if self._inner is None:
            raise ProtocolError("tls-crypt-v2: no client key yet, nothing can be sent")
        return self._inner.wrap(opcode, key_id, session_id, rh, now)

    def unwrap(self, packet: bytes) -> ControlPacket:
        if self._inner is None:
            self.accept_client_key(packet)
        assert self._inner is not None
        if packet and packet[0] >> 3 in WKC_OPCODES:
            # A resent first packet carries WKc again: the key is already set up, drop it.
            packet = split_wkc(packet)[0]
        return self._inner.unwrap(packet)
