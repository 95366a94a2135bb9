"""Control-channel protection: no wrap, tls-auth (HMAC) and tls-crypt (AES-256-CTR + HMAC-SHA256).

A wrap turns ``(opcode, key_id, session_id, reliability header)`` into wire bytes and back.
It owns the long-form replay packet-id (``id || time``) on both sides. The time value is
injected by the caller; nothing here reads a clock.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Any, Protocol

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from pyovpn.errors import AuthenticationError, ProtocolError, ReplayError
from pyovpn.proto.packets import (
    SESSION_ID_LEN,
    ControlPacket,
    Opcode,
    ReliabilityHeader,
    control_header,
    peek_opcode,
)

STATIC_KEY_LEN = 256
_PID_TIME = struct.Struct("!II")

DIGESTS = {"SHA1": "sha1", "SHA256": "sha256", "SHA384": "sha384", "SHA512": "sha512"}


def direction_slots(key_direction: int | None) -> tuple[int, int]:
    """(send slot, receive slot) into a 256-byte static key for a ``key-direction``."""
    if key_direction is None:
        return 0, 0
    if key_direction == 0:
        return 0, 1
    if key_direction == 1:
        return 1, 0
    raise ValueError("key-direction must be 0, 1 or None")


def _slot(key2: bytes, index: int) -> tuple[bytes, bytes]:
    """(cipher part, hmac part) of ``keys[index]`` in a 256-byte static key."""
    base = 128 * index
    return key2[base : base + 64], key2[base + 64 : base + 128]


class LongReplayWindow:
    """OpenVPN's replay check for (id, time) packet-ids, as used by tls-auth and tls-crypt.

    Time moving forward resets the window; within one time value an id is accepted once,
    and only if it is at most ``window - 1`` below the highest id seen.
    """

    def __init__(self, window: int = 64) -> None:
        self.window = window
        self.time = 0
        self.highest = 0
        self._seen: set[int] = set()

    def check(self, pid: int, ptime: int) -> None:
        if pid == 0:
            raise ReplayError("packet-id 0 is never valid")
        if ptime < self.time:
            raise ReplayError("packet-id time went backwards")
        if ptime > self.time:
            return
        if pid > self.highest:
            return
        if pid + self.window <= self.highest:
            raise ReplayError(f"packet-id {pid} is older than the replay window")
        if pid in self._seen:
            raise ReplayError(f"packet-id {pid} replayed")

    def update(self, pid: int, ptime: int) -> None:
        if ptime > self.time:
            self.time = ptime
            self.highest = 0
            self._seen.clear()
        if pid > self.highest:
            self.highest = pid
            floor = pid - self.window
            if len(self._seen) > 2 * self.window:
                self._seen = {p for p in self._seen if p > floor}
        self._seen.add(pid)


class Wrap(Protocol):
    """Protection of control packets for one session (one per tls_session)."""

    overhead: int

    def wrap(
        self, opcode: Opcode, key_id: int, session_id: bytes, rh: ReliabilityHeader, now: int
    ) -> bytes: ...

    def unwrap(self, packet: bytes) -> ControlPacket: ...

    def skip_replay_ids(self, last_sent: int) -> None: ...


def _has_message_id(opcode: Opcode) -> bool:
    return opcode is not Opcode.ACK_V1


def _check_control_opcode(packet: bytes) -> tuple[Opcode, int]:
    op, key_id = peek_opcode(packet)
    if op in (Opcode.DATA_V1, Opcode.DATA_V2):
        raise ProtocolError("data packet given to the control channel")
    if op in (Opcode.CONTROL_HARD_RESET_CLIENT_V1, Opcode.CONTROL_HARD_RESET_SERVER_V1):
        raise ProtocolError("key-method 1 hard reset: the peer is too old (key-method 2 required)")
    return op, key_id


class NoWrap:
    overhead = 0

    def skip_replay_ids(self, last_sent: int) -> None:
        """No replay ids without a wrap."""

    def wrap(self, opcode: Opcode, key_id: int, session_id: bytes, rh: ReliabilityHeader, now: int) -> bytes:
        return control_header(opcode, key_id, session_id) + rh.encode()

    def unwrap(self, packet: bytes) -> ControlPacket:
        op, key_id = _check_control_opcode(packet)
        if len(packet) < 1 + SESSION_ID_LEN:
            raise ProtocolError("control packet shorter than its header")
        rh = ReliabilityHeader.decode(packet[9:], has_message_id=_has_message_id(op))
        return ControlPacket(op, key_id, bytes(packet[1:9]), rh)


class _ReplayCounter:
    def __init__(self, start: int = 0) -> None:
        self.pid = start
        self.time: int | None = None

    def next(self, now: int) -> tuple[int, int]:
        if self.time is None:
            self.time = now
        self.pid = (self.pid + 1) & 0xFFFFFFFF
        return self.pid, self.time


class TlsAuth:
    """``--tls-auth``: HMAC over ``pid || time || byte0 || sid || RH``, placed after the session id."""

    def __init__(
        self, key2: bytes, key_direction: int | None, digest: str = "SHA1", replay_window: int = 64
    ) -> None:
        if len(key2) != STATIC_KEY_LEN:
            raise ValueError("tls-auth key must be 256 bytes")
        try:
            self._hash = DIGESTS[digest.upper()]
        except KeyError:
            raise ValueError(f"unsupported --auth digest {digest!r}") from None
        self.hlen = hashlib.new(self._hash).digest_size
        send, recv = direction_slots(key_direction)
        self._send_key = _slot(key2, send)[1][: self.hlen]
        self._recv_key = _slot(key2, recv)[1][: self.hlen]
        self._counter = _ReplayCounter()
        self.replay = LongReplayWindow(replay_window)
        self.overhead = self.hlen + 8

    def skip_replay_ids(self, last_sent: int) -> None:
        """Continue after ids already used elsewhere (the stateless reset reply used id 1)."""
        self._counter.pid = max(self._counter.pid, last_sent)

    def wrap(self, opcode: Opcode, key_id: int, session_id: bytes, rh: ReliabilityHeader, now: int) -> bytes:
        hdr = control_header(opcode, key_id, session_id)
        pidtime = _PID_TIME.pack(*self._counter.next(now))
        body = rh.encode()
        mac = hmac.new(self._send_key, pidtime + hdr + body, self._hash).digest()
        return hdr + mac + pidtime + body

    def unwrap(self, packet: bytes) -> ControlPacket:
        op, key_id = _check_control_opcode(packet)
        h = self.hlen
        if len(packet) < 9 + h + 8:
            raise ProtocolError("tls-auth control packet too short")
        mac = packet[9 : 9 + h]
        pidtime = packet[9 + h : 17 + h]
        body = packet[17 + h :]
        expect = hmac.new(self._recv_key, pidtime + packet[:9] + body, self._hash).digest()
        if not hmac.compare_digest(mac, expect):
            raise AuthenticationError("tls-auth HMAC mismatch (wrong ta.key or key-direction?)")
        pid, ptime = _PID_TIME.unpack(pidtime)
        self.replay.check(pid, ptime)
        rh = ReliabilityHeader.decode(body, has_message_id=_has_message_id(op))
        self.replay.update(pid, ptime)
        return ControlPacket(op, key_id, bytes(packet[1:9]), rh)


# AES-256-CTR contexts by key, re-keyed with each packet's IV: building a cipher object per
# packet cost seven times the encryption of a control packet. A server's sessions (and its
# stateless replies to resets) all use its two tls-crypt keys, so they share two contexts.
_CTR_CONTEXTS: dict[bytes, Any] = {}
_CTR_CONTEXTS_MAX = 64


def _aes_ctr(key: bytes, iv: bytes, data: bytes) -> bytes:
    ctx = _CTR_CONTEXTS.get(key)
    if ctx is None:
        if len(_CTR_CONTEXTS) >= _CTR_CONTEXTS_MAX:
            _CTR_CONTEXTS.clear()
        ctx = _CTR_CONTEXTS[key] = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    else:
        ctx.reset_nonce(iv)
    out: bytes = ctx.update(data)
    return out


class TlsCrypt:
    """``--tls-crypt``: HMAC-SHA256 tag over the clear header and RH, then AES-256-CTR of the RH.

    The key direction is fixed by role: the TLS server sends with keys[0], the client with keys[1].
    """

    TAG_LEN = 32

    def __init__(self, key2: bytes, *, is_server: bool, replay_window: int = 64, pid_start: int = 0) -> None:
        if len(key2) != STATIC_KEY_LEN:
            raise ValueError("tls-crypt key must be 256 bytes")
        send, recv = (0, 1) if is_server else (1, 0)
        s_cipher, s_hmac = _slot(key2, send)
        r_cipher, r_hmac = _slot(key2, recv)
        self._send_ke, self._send_ka = s_cipher[:32], s_hmac[:32]
        self._recv_ke, self._recv_ka = r_cipher[:32], r_hmac[:32]
        self._counter = _ReplayCounter(pid_start)
        self.replay = LongReplayWindow(replay_window)
        self.overhead = 8 + self.TAG_LEN

    def skip_replay_ids(self, last_sent: int) -> None:
        """Continue after ids already used elsewhere (the stateless reset reply used id 1)."""
        self._counter.pid = max(self._counter.pid, last_sent)

    def wrap(self, opcode: Opcode, key_id: int, session_id: bytes, rh: ReliabilityHeader, now: int) -> bytes:
        hdr = control_header(opcode, key_id, session_id) + _PID_TIME.pack(*self._counter.next(now))
        body = rh.encode()
        tag = hmac.new(self._send_ka, hdr + body, "sha256").digest()
        return hdr + tag + _aes_ctr(self._send_ke, tag[:16], body)

    def unwrap(self, packet: bytes) -> ControlPacket:
        op, key_id = _check_control_opcode(packet)
        if len(packet) < 17 + self.TAG_LEN:
            raise ProtocolError("tls-crypt control packet too short")
        hdr = packet[:17]
        tag = packet[17:49]
        body = _aes_ctr(self._recv_ke, tag[:16], packet[49:])
        expect = hmac.new(self._recv_ka, hdr + body, "sha256").digest()
        if not hmac.compare_digest(tag, expect):
            raise AuthenticationError("tls-crypt authentication failed (wrong tls-crypt key?)")
        pid, ptime = _PID_TIME.unpack(packet[9:17])
        self.replay.check(pid, ptime)
        rh = ReliabilityHeader.decode(body, has_message_id=_has_message_id(op))
        self.replay.update(pid, ptime)
        return ControlPacket(op, key_id, bytes(packet[1:9]), rh)
