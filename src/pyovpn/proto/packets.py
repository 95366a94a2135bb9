"""Wire codecs for OpenVPN packets: opcodes, the control-packet reliability header, data headers.

Only byte layout lives here; authentication and encryption of control packets are in
:mod:`pyovpn.proto.tlswrap`, data-packet crypto in :mod:`pyovpn.datachannel.crypto`.
Every decoder raises only :class:`~pyovpn.errors.ProtocolError` on malformed input.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from pyovpn.errors import ProtocolError


class Opcode(enum.IntEnum):
    CONTROL_HARD_RESET_CLIENT_V1 = 1
    CONTROL_HARD_RESET_SERVER_V1 = 2
    CONTROL_SOFT_RESET_V1 = 3
    CONTROL_V1 = 4
    ACK_V1 = 5
    DATA_V1 = 6
    CONTROL_HARD_RESET_CLIENT_V2 = 7
    CONTROL_HARD_RESET_SERVER_V2 = 8
    DATA_V2 = 9
    CONTROL_HARD_RESET_CLIENT_V3 = 10
    CONTROL_WKC_V1 = 11


CONTROL_OPCODES = frozenset(
    {
        Opcode.CONTROL_HARD_RESET_CLIENT_V1,
        Opcode.CONTROL_HARD_RESET_SERVER_V1,
        Opcode.CONTROL_SOFT_RESET_V1,
        Opcode.CONTROL_V1,
        Opcode.ACK_V1,
        Opcode.CONTROL_HARD_RESET_CLIENT_V2,
        Opcode.CONTROL_HARD_RESET_SERVER_V2,
        Opcode.CONTROL_HARD_RESET_CLIENT_V3,
        Opcode.CONTROL_WKC_V1,
    }
)
DATA_OPCODES = frozenset({Opcode.DATA_V1, Opcode.DATA_V2})
# Plain ints for the data path's per-packet comparisons (an enum member costs an attribute lookup).
OPCODE_DATA_V1 = int(Opcode.DATA_V1)
OPCODE_DATA_V2 = int(Opcode.DATA_V2)

SESSION_ID_LEN = 8

# What a P2P endpoint may still take from an address other than its peer's once the tunnel is
# up: a (re)starting client's first packet (a new source port after a restart). Anything else
# from a stranger is dropped where it arrives, as OpenVPN does without `float`. Like OpenVPN's
# checks of a packet from an untrusted source, a first packet has key id 0 and holds at least
# the opcode byte, a session id, an empty ACK array and a packet id.
STRANGER_CONTROL_OPCODES = frozenset(
    {int(Opcode.CONTROL_HARD_RESET_CLIENT_V2), int(Opcode.CONTROL_HARD_RESET_CLIENT_V3)}
)
STRANGER_FIRST_BYTES = frozenset(opcode << 3 for opcode in STRANGER_CONTROL_OPCODES)
MIN_FIRST_PACKET_LEN = 1 + SESSION_ID_LEN + 1 + 4

UNDEF_PEER_ID = 0xFFFFFF  # "no peer id": receivers look the peer up by address instead
# Largest ACK array a receiver accepts; OpenVPN never sends more than RELIABLE_ACK_SIZE (8).
MAX_ACKS = 8

_U32 = struct.Struct("!I")


def pack_byte0(opcode: int, key_id: int) -> int:
    return (opcode << 3) | (key_id & 0x07)


def split_byte0(byte0: int) -> tuple[int, int]:
    return byte0 >> 3, byte0 & 0x07


def peek_opcode(packet: bytes) -> tuple[Opcode, int]:
    """Return (opcode, key_id) of a raw packet; ProtocolError for empty or unknown opcodes."""
    if not packet:
        raise ProtocolError("empty packet")
    op, key_id = split_byte0(packet[0])
    try:
        return Opcode(op), key_id
    except ValueError:
        raise ProtocolError(f"unknown opcode {op}") from None


@dataclass(frozen=True)
class ReliabilityHeader:
    """The part of a control packet after the wrap header: ACKs, message id and payload.

    ``message_id`` is ``None`` exactly for ``ACK_V1``.
    """

    acks: tuple[int, ...] = ()
    remote_session_id: bytes | None = None
    message_id: int | None = None
    payload: bytes = b""

    def encode(self) -> bytes:
        if len(self.acks) > 255:
            raise ValueError("too many acks")
        parts = [bytes([len(self.acks)])]
        parts.extend(_U32.pack(a) for a in self.acks)
        if self.acks:
            if self.remote_session_id is None or len(self.remote_session_id) != SESSION_ID_LEN:
                raise ValueError("acks need the 8-byte remote session id")
            parts.append(self.remote_session_id)
        if self.message_id is not None:
            parts.append(_U32.pack(self.message_id))
        parts.append(self.payload)
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes, *, has_message_id: bool) -> ReliabilityHeader:
        if not data:
            raise ProtocolError("control packet truncated before the ACK count")
        n = data[0]
        if n > MAX_ACKS:
            raise ProtocolError(f"control packet carries {n} ACKs (at most {MAX_ACKS} allowed)")
        pos = 1
        need = pos + 4 * n + (SESSION_ID_LEN if n else 0) + (4 if has_message_id else 0)
        if len(data) < need:
            raise ProtocolError("control packet truncated in the reliability header")
        acks = tuple(_U32.unpack_from(data, pos + 4 * i)[0] for i in range(n))
        pos += 4 * n
        remote_sid = None
        if n:
            remote_sid = bytes(data[pos : pos + SESSION_ID_LEN])
            pos += SESSION_ID_LEN
        message_id = None
        if has_message_id:
            message_id = _U32.unpack_from(data, pos)[0]
            pos += 4
        return cls(acks, remote_sid, message_id, bytes(data[pos:]))


@dataclass(frozen=True)
class ControlPacket:
    """A decoded (unwrapped) control packet."""

    opcode: Opcode
    key_id: int
    session_id: bytes
    rh: ReliabilityHeader

    @property
    def is_hard_reset(self) -> bool:
        return self.opcode in (
            Opcode.CONTROL_HARD_RESET_CLIENT_V2,
            Opcode.CONTROL_HARD_RESET_SERVER_V2,
            Opcode.CONTROL_HARD_RESET_CLIENT_V3,
        )


def control_header(opcode: int, key_id: int, session_id: bytes) -> bytes:
    """``byte0 || own session id``: the 9 bytes every wrap mode keeps in clear text."""
    return bytes([pack_byte0(opcode, key_id)]) + session_id


def parse_data_header(packet: bytes) -> tuple[Opcode, int, int | None]:
    """(opcode, key_id, peer_id) of a data packet; peer_id is None for DATA_V1."""
    op, key_id = peek_opcode(packet)
    if op is Opcode.DATA_V2:
        if len(packet) < 4:
            raise ProtocolError("DATA_V2 packet shorter than its header")
        return op, key_id, int.from_bytes(packet[1:4], "big")
    if op is Opcode.DATA_V1:
        return op, key_id, None
    raise ProtocolError(f"opcode {op.name} is not a data opcode")


# ---------------------------------------------------------------- TCP stream framing


class StreamFramer:
    """Splits an OpenVPN-over-TCP byte stream (``u16 length || packet``) into packets."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= 2:
            n = (buf[pos] << 8) | buf[pos + 1]
            if n == 0:
                raise ProtocolError("zero-length frame on the TCP stream")
            if len(buf) - pos - 2 < n:
                break
            out.append(bytes(buf[pos + 2 : pos + 2 + n]))
            pos += 2 + n
        del buf[:pos]
        return out

    def wanted(self) -> int:
        """Bytes still missing for the frame being read (its length prefix first).

        Reading exactly this much never consumes bytes past a frame boundary, so the socket can
        be handed to the kernel (which needs the stream positioned at a frame start) at any time.
        """
        have = len(self._buf)
        if have < 2:
            return 2 - have
        return 2 + ((self._buf[0] << 8) | self._buf[1]) - have

    def take_backlog(self) -> bytes:
        """Bytes read past the last whole frame, for a hand-over to the data channel."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest


def frame(packet: bytes) -> bytes:
    if len(packet) > 0xFFFF:
        raise ValueError("packet too large for TCP framing")
    return len(packet).to_bytes(2, "big") + packet
