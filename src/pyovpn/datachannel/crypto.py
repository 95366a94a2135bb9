"""The AEAD data-packet format (the kernel ``ovpn`` driver's): keys, packet ids and replay.

Wire format (OPENVPN-PROTOCOL.md §5.1)::

    P_DATA_V2: [(9 << 3) | key_id] [peer_id:24] [pid:u32] [tag:16] [ciphertext]
    P_DATA_V1: [(6 << 3) | key_id]              [pid:u32] [tag:16] [ciphertext]

``nonce = pid (4 bytes, big-endian) || nonce_tail (8 bytes)``; the AAD is the first
8 bytes for V2 (opcode/key_id/peer_id and pid) and only the pid for V1. Decryption
authenticates first and only then consults the replay window, so a forged packet can
never move the window.

Everything here is per-packet hot code: structs are precompiled, AEAD objects are
created once per key and the only per-packet allocations are the nonce, the output
and (on receive) the ciphertext||tag join that ``cryptography`` needs.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from typing import Any, NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from pyovpn.datachannel.api import Cipher, KeyDirection
from pyovpn.errors import AuthenticationError, ProtocolError, PyovpnError, ReplayError
from pyovpn.proto.packets import OPCODE_DATA_V1, OPCODE_DATA_V2, UNDEF_PEER_ID

__all__ = [
    "DATA_V1_OVERHEAD",
    "DATA_V2_OVERHEAD",
    "MAX_PACKET_ID",
    "NONCE_TAIL_SIZE",
    "OCC_MAGIC",
    "PING_MAGIC",
    "TAG_SIZE",
    "DataKey",
    "KeyState",
    "PacketIdExhaustedError",
    "ReplayWindow",
]

TAG_SIZE = 16
NONCE_TAIL_SIZE = 8
DATA_V2_OVERHEAD = 4 + 4 + TAG_SIZE  # op/peer-id, pid, tag
DATA_V1_OVERHEAD = 1 + 4 + TAG_SIZE
MAX_PACKET_ID = 0xFFFFFFFF  # the last pid a key may send; the kernel kills the key after it

# Keepalive ping payload (§5.5) and OCC message prefix (§3.8).
PING_MAGIC = bytes.fromhex("2a187bf3641eb4cb07ed2d0a981fc748")
OCC_MAGIC = bytes.fromhex("287f346bd4ef7a812d56b8d3afc5459c")

DEFAULT_REPLAY_WINDOW = 2048  # the kernel's REPLAY_WINDOW_SIZE; OpenVPN's userspace uses 64
MAX_REPLAY_WINDOW = 65536  # OpenVPN's --replay-window upper limit
REPLAY_EXPIRE_SECONDS = 30.0  # the kernel's PKTID_RECV_EXPIRE

_HDR_V2 = struct.Struct(">II")  # (opcode/key_id << 24 | peer_id, pid)
_HDR_V1 = struct.Struct(">BI")  # (opcode/key_id, pid)
_NONCE = struct.Struct(">I8s")  # pid || nonce_tail
_PID = struct.Struct(">I")


class PacketIdExhaustedError(PyovpnError):
    """The key has sent packet id 2**32-1; it must never be used to encrypt again."""


class DataKey:
    """One direction's AEAD context: the cipher object, built once, and the nonce tail."""

    __slots__ = ("aead", "cipher", "nonce_tail")

    def __init__(self, cipher: Cipher, key: bytes, nonce_tail: bytes) -> None:
        if not isinstance(cipher, Cipher):
            raise ValueError(f"unsupported data cipher {cipher!r}")
        if len(key) != cipher.key_len:
            raise ValueError(f"{cipher.value} needs a {cipher.key_len}-byte key, got {len(key)} bytes")
        if len(nonce_tail) != NONCE_TAIL_SIZE:
            raise ValueError(f"nonce tail must be exactly {NONCE_TAIL_SIZE} bytes, got {len(nonce_tail)}")
        self.cipher = cipher
        self.nonce_tail = bytes(nonce_tail)
        self.aead: AESGCM | ChaCha20Poly1305 = (
            ChaCha20Poly1305(bytes(key)) if cipher is Cipher.CHACHA20_POLY1305 else AESGCM(bytes(key))
        )

    @classmethod
    def from_direction(cls, cipher: Cipher, direction: KeyDirection) -> DataKey:
        return cls(cipher, direction.cipher_key, direction.nonce_tail)

    def nonce(self, pid: int) -> bytes:
        return _NONCE.pack(pid, self.nonce_tail)

    def __repr__(self) -> str:  # never show key material
        return f"DataKey({self.cipher.value})"


class ReplayWindow:
    """Sliding-window replay filter modelled on the kernel's ``ovpn_pktid_recv``.

    Bit ``i`` of ``_bits`` records whether ``highest - i`` was seen. A pid up to
    ``size - 1`` below the highest is accepted once; pid 0 never. As in the kernel,
    ``extent`` limits backtracking to ids the window has actually covered (so
    a first packet of 5 still admits 1..4 later), and after ``expire`` seconds
    without an accepted packet, ids at or below the highest become unacceptable.
    """

    __slots__ = ("_bits", "_clock", "_expire", "_expire_at", "_extent", "_floor", "_mask", "highest", "size")

    def __init__(
        self,
        size: int = DEFAULT_REPLAY_WINDOW,
        *,
        expire: float | None = REPLAY_EXPIRE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= size <= MAX_REPLAY_WINDOW:
            raise ValueError(f"replay window must be 1..{MAX_REPLAY_WINDOW} packets, got {size}")
        self.size = size
        self.highest = 0
        self._bits = 0
        self._mask = (1 << size) - 1
        self._extent = 0
        self._floor = 0
        self._expire = expire
        self._expire_at = float("inf")
        self._clock = clock

    def accept(self, pid: int) -> None:
        """Record ``pid`` as received, or raise :class:`ReplayError` if it must be dropped."""
        if pid == 0:
            raise ReplayError("packet id 0 is never valid")
        now = 0.0
        if self._expire is not None:
            now = self._clock()
            if now >= self._expire_at:
                # a long silence: old ids could only be replays of captured traffic
                self._floor = self.highest
        highest = self.highest
        if pid > highest:
            delta = pid - highest
            size = self.size
            if delta < size:
                self._bits = ((self._bits << delta) | 1) & self._mask
                extent = self._extent + delta
                self._extent = extent if extent < size else size
            else:
                self._bits = 1
                self._extent = size
            self.highest = pid
        else:
            delta = highest - pid
            if delta >= self._extent:
                raise ReplayError(f"packet id {pid} is outside the replay window (highest {highest})")
            if pid <= self._floor:
                raise ReplayError(f"packet id {pid} is below the expired-window floor {self._floor}")
            bit = 1 << delta
            if self._bits & bit:
                raise ReplayError(f"packet id {pid} was already received")
            self._bits |= bit
        if self._expire is not None:
            self._expire_at = now + self._expire

    def would_accept(self, pid: int) -> bool:
        """Whether :meth:`accept` would take ``pid`` now, without recording it."""
        if pid == 0:
            return False
        if pid > self.highest:
            return True
        delta = self.highest - pid
        floor = self._floor
        if self._expire is not None and self._clock() >= self._expire_at:
            floor = self.highest
        return delta < self._extent and pid > floor and not (self._bits >> delta) & 1


def _missing_direction(*_args: object) -> NoReturn:
    raise ValueError("this copy of the key has no such direction")


_SEND_ONLY = ReplayWindow(1, expire=None)  # the replay window of every send-only key copy


class KeyState:
    """One key_id of a peer: encrypt key + tx packet id, decrypt key + replay window.

    A copy may hold one direction only (the other is None): the engine's sending worker
    needs only the encrypt key and its receiving worker only the decrypt key, and each AEAD
    context costs about 2 KiB per client. Using the missing direction raises ValueError.
    """

    __slots__ = (
        "_dec_tail",
        "_enc_tail",
        "_op_v1",
        "_op_v2",
        "_open",
        "_open_into",
        "_seal",
        "_seal_bytes",
        "_tx_pid",
        "cipher",
        "key_id",
        "replay",
    )

    def __init__(
        self,
        key_id: int,
        encrypt: DataKey | None,
        decrypt: DataKey | None,
        *,
        replay_window: int = DEFAULT_REPLAY_WINDOW,
        replay_expire: float | None = REPLAY_EXPIRE_SECONDS,
    ) -> None:
        if not 0 <= key_id <= 7:
            raise ValueError(f"key id must be 0..7, got {key_id}")
        if encrypt is None and decrypt is None:
            raise ValueError("a key needs an encrypt or a decrypt direction")
        if encrypt is not None and decrypt is not None and encrypt.cipher is not decrypt.cipher:
            raise ValueError("encrypt and decrypt keys must use the same cipher")
        self.key_id = key_id
        self.cipher = encrypt.cipher if encrypt is not None else decrypt.cipher  # type: ignore[union-attr]
        # a send-only copy never opens a packet (its _open raises first): no window to keep
        self.replay = ReplayWindow(replay_window, expire=replay_expire) if decrypt is not None else _SEND_ONLY
        self._tx_pid = 0  # last pid sent; the first packet carries 1
        self._op_v2 = ((OPCODE_DATA_V2 << 3) | key_id) << 24
        self._op_v1 = (OPCODE_DATA_V1 << 3) | key_id
        # the *_into variants (in-place batches for the offload engine): cryptography >= 47
        self._seal: Callable[..., Any] = _missing_direction
        self._seal_bytes: Callable[..., bytes] = _missing_direction
        self._open: Callable[..., bytes] = _missing_direction
        self._open_into: Callable[..., Any] = _missing_direction
        self._enc_tail = self._dec_tail = b""
        if encrypt is not None:
            self._seal = encrypt.aead.encrypt_into
            self._seal_bytes = encrypt.aead.encrypt
            self._enc_tail = encrypt.nonce_tail
        if decrypt is not None:
            self._open = decrypt.aead.decrypt
            self._open_into = decrypt.aead.decrypt_into
            self._dec_tail = decrypt.nonce_tail

    @classmethod
    def from_directions(
        cls,
        key_id: int,
        cipher: Cipher,
        encrypt: KeyDirection | None,
        decrypt: KeyDirection | None,
        **kwargs: int | float | None,
    ) -> KeyState:
        return cls(
            key_id,
            DataKey.from_direction(cipher, encrypt) if encrypt is not None else None,
            DataKey.from_direction(cipher, decrypt) if decrypt is not None else None,
            **kwargs,  # type: ignore[arg-type]
        )

    @property
    def tx_packet_id(self) -> int:
        """The last packet id sent (0 before the first packet)."""
        return self._tx_pid

    @tx_packet_id.setter
    def tx_packet_id(self, value: int) -> None:
        # for tests and for resuming; never move it backwards on a live key
        if not 0 <= value <= MAX_PACKET_ID:
            raise ValueError(f"packet id must be 0..{MAX_PACKET_ID}")
        self._tx_pid = value

    @property
    def exhausted(self) -> bool:
        return self._tx_pid >= MAX_PACKET_ID

    def encrypt(
        self, payload: bytes | bytearray | memoryview, peer_id: int, *, data_v1: bool = False
    ) -> bytes:
        """Seal ``payload`` into a DATA_V2 packet for ``peer_id`` (or DATA_V1 if asked).

        Raises :class:`PacketIdExhaustedError` once pid 2**32-1 has been used: the nonce
        would repeat, so the key is dead (the kernel returns -ERANGE and kills it).
        """
        pid = self._tx_pid + 1
        if pid > MAX_PACKET_ID:
            raise PacketIdExhaustedError(f"key {self.key_id} has used all 2**32-1 packet ids")
        self._tx_pid = pid
        if data_v1:
            hdr = _HDR_V1.pack(self._op_v1, pid)
            aad = hdr[1:]
        else:
            if not 0 <= peer_id <= UNDEF_PEER_ID:
                raise ValueError(f"peer id must be 0..0xFFFFFF, got {peer_id}")
            hdr = aad = _HDR_V2.pack(self._op_v2 | peer_id, pid)
        sealed = memoryview(self._seal_bytes(_NONCE.pack(pid, self._enc_tail), payload, aad))
        # cryptography returns ciphertext||tag; the wire wants the tag first
        return b"".join((hdr, sealed[-TAG_SIZE:], sealed[:-TAG_SIZE]))

    def encrypt_slots(
        self, buf: memoryview, offsets: list[int], lengths: list[int], peer_id: int, *, frame: bool = False
    ) -> int:
        """Seal packets laid out in place in ``buf`` as DATA_V2; return how many were sealed.

        Slot ``i`` starts at ``offsets[i]``: 24 reserved bytes (26 with ``frame``: a TCP
        length prefix first), then ``lengths[i]`` bytes of plaintext, which are encrypted in
        place. The AEAD writes its tag after the ciphertext, over the first 16 bytes of the
        next slot (or 16 spare bytes after the last one) before it is moved in front, so
        slots must be processed in order and the buffer needs those spare bytes. Each
        sealed slot is then a whole wire packet (a TCP frame with ``frame``) of
        ``24 + lengths[i]`` (+2) bytes. Fewer than ``len(offsets)`` sealed means the
        packet ids ran out: the key is exhausted.
        """
        if not 0 <= peer_id <= UNDEF_PEER_ID:
            raise ValueError(f"peer id must be 0..0xFFFFFF, got {peer_id}")
        seal = self._seal
        tail = self._enc_tail
        op = self._op_v2 | peer_id
        pack_nonce = _NONCE.pack
        pack_hdr = _HDR_V2.pack
        pid = self._tx_pid
        count = min(len(offsets), MAX_PACKET_ID - pid)  # ids left for this key
        if count < len(offsets):
            offsets = offsets[:count]
            lengths = lengths[:count]
        skip = 26 if frame else 24
        for off, n in zip(offsets, lengths, strict=True):
            pid += 1
            hdr = pack_hdr(op, pid)
            p = off + skip
            e = p + n
            seal(pack_nonce(pid, tail), buf[p:e], hdr, buf[p : e + TAG_SIZE])
            buf[p - 24 : p] = hdr + buf[e : e + TAG_SIZE]  # header, then the tag moved in front
        if frame:
            for off, n in zip(offsets, lengths, strict=True):
                ln = n + 24
                buf[off] = ln >> 8
                buf[off + 1] = ln & 0xFF
        self._tx_pid = pid
        return count

    def open_v2_into(self, buf: memoryview, off: int, n: int, pid: int, out: memoryview, pos: int) -> int:
        """Open the DATA_V2 packet ``buf[off:off+n]`` (``pid`` already read) to ``out[pos:]``.

        The engine's receive fast path: the caller has checked the opcode, key id, peer id
        and that ``24 <= n`` and the plaintext fits. The packet is not modified; the replay
        window is consulted after authentication. Returns the plaintext length.
        """
        body = off + 8
        end = off + n
        ct = body + TAG_SIZE
        clen = n - DATA_V2_OVERHEAD
        try:
            self._open_into(
                _NONCE.pack(pid, self._dec_tail),
                b"".join((buf[ct:end], buf[body:ct])),  # the AEAD wants ciphertext||tag
                buf[off:body],
                out[pos : pos + clen],
            )
        except InvalidTag:
            raise AuthenticationError(f"data packet failed authentication (key id {self.key_id})") from None
        self.replay.accept(pid)
        return clen

    def _header(self, buf: memoryview, off: int, n: int) -> tuple[int, memoryview, int]:
        """The packet id, associated data and body offset of the data packet ``buf[off:off+n]``.

        Raises :class:`ProtocolError` for anything that is not a well-formed packet for this key.
        """
        if n == 0:
            raise ProtocolError("empty data packet")
        b0 = buf[off]
        if b0 & 7 != self.key_id:
            raise ProtocolError(f"packet is for key id {b0 & 7}, this key is {self.key_id}")
        opcode = b0 >> 3
        if opcode == OPCODE_DATA_V2:
            if n < DATA_V2_OVERHEAD:
                raise ProtocolError(f"DATA_V2 packet too short ({n} bytes)")
            return _HDR_V2.unpack_from(buf, off)[1], buf[off : off + 8], off + 8
        if opcode == OPCODE_DATA_V1:
            if n < DATA_V1_OVERHEAD:
                raise ProtocolError(f"DATA_V1 packet too short ({n} bytes)")
            return _PID.unpack_from(buf, off + 1)[0], buf[off + 1 : off + 5], off + 5
        raise ProtocolError(f"opcode {opcode} is not a data packet")

    def decrypt_into(self, buf: memoryview, off: int, n: int, out: memoryview) -> int:
        """Like :meth:`decrypt` for the packet ``buf[off:off+n]``, writing the plaintext to ``out``.

        The packet's bytes are rearranged in place (ciphertext moved in front of the tag), so
        it cannot be decrypted again. Returns the plaintext length.
        """
        pid, aad, body = self._header(buf, off, n)
        end = off + n
        clen = end - body - TAG_SIZE
        if clen > len(out):
            raise ProtocolError(f"data packet too long ({n} bytes)")
        tag = bytes(buf[body : body + TAG_SIZE])
        buf[body : body + clen] = buf[body + TAG_SIZE : end]  # memoryview copies overlap safely
        buf[end - TAG_SIZE : end] = tag
        try:
            self._open_into(_NONCE.pack(pid, self._dec_tail), buf[body:end], aad, out[:clen])
        except InvalidTag:
            raise AuthenticationError(f"data packet failed authentication (key id {self.key_id})") from None
        self.replay.accept(pid)
        return clen

    def decrypt(self, packet: bytes | bytearray | memoryview) -> bytes:
        """Authenticate, replay-check and open a DATA_V2 or DATA_V1 packet.

        Raises only :class:`ProtocolError` subclasses: :class:`AuthenticationError`
        (wrong key, corruption, forgery), :class:`ReplayError`, or plain
        :class:`ProtocolError` for malformed packets.
        """
        mv = memoryview(packet)
        pid, aad, body = self._header(mv, 0, len(mv))
        tag_end = body + TAG_SIZE
        try:
            plain = self._open(
                _NONCE.pack(pid, self._dec_tail), b"".join((mv[tag_end:], mv[body:tag_end])), aad
            )
        except InvalidTag:
            raise AuthenticationError(f"data packet failed authentication (key id {self.key_id})") from None
        self.replay.accept(pid)
        return plain

    def __repr__(self) -> str:
        return f"KeyState(key_id={self.key_id}, {self.cipher.value}, tx_pid={self._tx_pid})"
