"""The 2.6+ stateless server handshake: an HMAC cookie as the server's session id.

A UDP P2MP server answers a client's hard reset without keeping any state: its session id
is a MAC over (time slot, client address, client session id) under a process-local key.
Only when the client's next packet ACKs that cookie does the server create a session, as if
the reset packets had been exchanged in both directions. A flood of forged resets therefore
costs the server no memory. Sans-I/O: the caller supplies the time and the key.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from pyovpn.errors import ProtocolError
from pyovpn.proto.packets import SESSION_ID_LEN, Opcode, ReliabilityHeader
from pyovpn.proto.tlswrap import Wrap


@dataclass(frozen=True)
class CookieVerified:
    """A client proved it got our reset: create its session with these ids."""

    client_session_id: bytes
    server_session_id: bytes
    message_id: int | None  # message id of the packet that carried the proof (0..1), None for ACK_V1


class CookieJar:
    def __init__(self, key: bytes, *, hand_window: int = 60) -> None:
        if len(key) < 16:
            raise ValueError("cookie key must be at least 16 bytes")
        self._key = key
        # OpenVPN's slot length: half the handshake window, so a cookie lives 1 to 1.5 windows
        self.slot_seconds = max(1, (hand_window + 1) // 2)

    def _mac(self, slot: int, addr: tuple[str, int], client_sid: bytes) -> bytes:
        msg = slot.to_bytes(8, "big") + f"{addr[0]}|{addr[1]}".encode() + client_sid
        return hmac.new(self._key, msg, hashlib.sha256).digest()[:SESSION_ID_LEN]

    def cookie(self, now: float, addr: tuple[str, int], client_sid: bytes) -> bytes:
        return self._mac(int(now) // self.slot_seconds, addr, client_sid)

    def verify(self, cookie: bytes, now: float, addr: tuple[str, int], client_sid: bytes) -> bool:
        slot = int(now) // self.slot_seconds
        return any(hmac.compare_digest(cookie, self._mac(slot - back, addr, client_sid)) for back in range(3))

    def reply_to_reset(
        self, packet: bytes, addr: tuple[str, int], now: float, wrap: Wrap, payload: bytes = b""
    ) -> bytes:
        """The HARD_RESET_SERVER_V2 for a client's HARD_RESET_CLIENT_V2 (or V3), keeping no state.

        ``wrap`` must be a fresh wrap context (its replay counter starts at 1) used for this
        one packet only. ``payload``: early-negotiation TLVs (tls-crypt-v2 asks the client to
        resend its wrapped key). Raises ProtocolError for anything that is not a valid reset.
        """
        pkt = wrap.unwrap(packet)
        resets = (Opcode.CONTROL_HARD_RESET_CLIENT_V2, Opcode.CONTROL_HARD_RESET_CLIENT_V3)
        if pkt.opcode not in resets or pkt.rh.message_id != 0:
            raise ProtocolError("not an initial client hard reset")
        if pkt.key_id != 0:
            raise ProtocolError("client hard reset with a non-zero key_id")
        sid = self.cookie(now, addr, pkt.session_id)
        rh = ReliabilityHeader((0,), pkt.session_id, 0, payload)
        return wrap.wrap(Opcode.CONTROL_HARD_RESET_SERVER_V2, 0, sid, rh, int(now))

    def check_proof(self, packet: bytes, addr: tuple[str, int], now: float, wrap: Wrap) -> CookieVerified:
        """Accept the client's packet after the reset only if it ACKs a valid cookie.

        Rules (mudp.c): key_id 0, ACK_V1 or CONTROL_V1/WKC_V1 with an ACK block whose remote
        session id is the cookie; every ACKed id and the message id at most 1.
        """
        pkt = wrap.unwrap(packet)
        if pkt.key_id != 0 or pkt.opcode not in (Opcode.ACK_V1, Opcode.CONTROL_V1, Opcode.CONTROL_WKC_V1):
            raise ProtocolError("not a handshake continuation")
        rh = pkt.rh
        if not rh.acks or rh.remote_session_id is None:
            raise ProtocolError("continuation carries no ACK of the server reset")
        if any(a > 1 for a in rh.acks) or (rh.message_id is not None and rh.message_id > 1):
            raise ProtocolError("continuation ids out of range")
        if not self.verify(rh.remote_session_id, now, addr, pkt.session_id):
            raise ProtocolError("cookie does not verify (expired, forged or from another address)")
        return CookieVerified(pkt.session_id, rh.remote_session_id, rh.message_id)
