"""The sans-I/O OpenVPN control session: handshake, key negotiation, push/pull and rekeying for one peer.

:class:`Session` takes control packets, the time and random bytes, and gives back control
packets to send, the next timer deadline, and events: data-channel commands
(``NewKey``/``SwapKeys``/``DelKey`` from :mod:`pyovpn.datachannel.api`) plus the session
events defined here. It never touches sockets, clocks or the OS random generator.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from OpenSSL import SSL

from pyovpn.datachannel.api import Cipher, DelKey, KeySlot, NewKey, SwapKeys
from pyovpn.errors import ProtocolError
from pyovpn.proto import keymethod as km
from pyovpn.proto.cookie import CookieVerified
from pyovpn.proto.keys import (
    EKM_LABEL_DATAKEYS,
    EKM_LABEL_P2P_PEERID,
    P2P_DEFAULT_PEER_ID,
    prf_key2,
    split_key2,
)
from pyovpn.proto.packets import SESSION_ID_LEN, ControlPacket, Opcode, ReliabilityHeader
from pyovpn.proto.push import PushedOptions, parse_pushed_options, split_push_message
from pyovpn.proto.redirect import PullFilterAction, filter_pushed
from pyovpn.proto.reliable import AckTracker, ReliableReceiver, ReliableSender
from pyovpn.proto.tls import PeerCheck, TlsEndpoint
from pyovpn.proto.tlscryptv2 import (
    ClientKey,
    MetadataCheck,
    ServerKey,
    TlsCryptV2Client,
    TlsCryptV2Server,
    asks_to_resend_wkc,
)
from pyovpn.proto.tlswrap import NoWrap, TlsAuth, TlsCrypt, Wrap

log = logging.getLogger("pyovpn.session")

TLS_MTU = 1250
PUSH_REQUEST_INTERVAL = 5.0
KEY_SWITCH_MAX_DELAY = 5
# a PUSH_REQUEST this soon after a PUSH_REPLY went out is answered by the reliable retransmission of
# that reply, not by a second one (as OpenVPN's server does)
PUSH_REPLY_HOLD = 30.0
ACK_MAX_PIGGYBACK = 4
ACK_MAX_STANDALONE = 8


# ---------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class SessionConfig:
    is_tls_server: bool
    pull: bool
    tls_context: SSL.Context
    peer_check: PeerCheck = field(default_factory=PeerCheck)
    tls_auth_key: bytes | None = None
    key_direction: int | None = None
    auth_digest: str = "SHA1"
    tls_crypt_key: bytes | None = None
    tls_crypt_v2_client: ClientKey | None = None
    tls_crypt_v2_server: ServerKey | None = None
    tls_crypt_v2_check: MetadataCheck | None = None  # tls-crypt-v2-max-age / -verify
    data_ciphers: tuple[str, ...] = ("AES-256-GCM", "AES-128-GCM", "CHACHA20-POLY1305")
    data_ciphers_fallback: str | None = None
    reneg_sec: int = 3600
    tls_timeout: float = 2.0
    hand_window: int = 60
    tran_window: int = 3600
    proto: str = "udp"
    tun_mtu: int = 1500
    username: str | None = None
    password: str | None = None
    version: str = "2.6.14"
    replay_window: int = 64
    ping: int = 0
    ping_restart: int = 0
    offer_ekm: bool = True  # advertise TLS-EKM key derivation (IV_PROTO bit 3)
    mode_server: bool = False  # P2MP server: the client pulls its options (needs is_tls_server)
    pull_filters: tuple[tuple[PullFilterAction, str], ...] = ()  # `pull-filter`, in order
    route_nopull: bool = False
    compression: tuple[str, str] | None = None  # comp-lzo/compress and its argument: OCC and peer-info


# ---------------------------------------------------------------------------- events


@dataclass(frozen=True)
class TunnelUp:
    """The first data keys are about to be installed: create the data-channel peer now."""

    peer_id: int
    cipher: Cipher
    keepalive_interval: int
    keepalive_timeout: int
    pushed: PushedOptions | None
    cc_exit: bool
    key_derivation: str  # "tls-ekm" or "prf", for the log
    tls_summary: str
    peer_common_name: str = ""  # for the scripts' `common_name`
    peer_certificate_env: tuple[tuple[str, str], ...] = ()  # the scripts' X509_N_*, tls_id_N, ...


@dataclass(frozen=True)
class SessionClosed:
    """The session ended. ``restart`` false means the process should exit (HALT, AUTH_FAILED)."""

    reason: str
    restart: bool = True
    auth_failed: bool = False  # the server refused the credentials (auth-retry decides what next)


@dataclass(frozen=True)
class PeerRestarted:
    """A new hard reset arrived from a peer we already had a session with (the peer restarted)."""

    packet: bytes


@dataclass(frozen=True)
class ClientAuthRequest:
    """P2MP server: a client finished key-method-2; answer with accept_client() or reject_client()."""

    common_name: str
    username: str
    password: str
    peer_info: dict[str, str]
    iv_proto: int


SessionEvent = TunnelUp | SessionClosed | PeerRestarted | ClientAuthRequest | NewKey | SwapKeys | DelKey

PUSH_MESSAGE_LIMIT = 1024 - 84  # OpenVPN keeps each PUSH_REPLY message below this


def non_aead_refusal(name: str, who: str) -> str:
    """Why a session needing the non-AEAD cipher ``name`` (a `cipher` fallback such as AES-256-CBC) fails."""
    return (
        f"{who} needs the data cipher {name}, which pyovpn's data channel cannot run (AEAD only: "
        "AES-256-GCM, AES-128-GCM, CHACHA20-POLY1305; CBC with HMAC is not implemented). Let the peer "
        "negotiate: OpenVPN >= 2.4 without ncp-disable, with AES-256-GCM in its data-ciphers"
    )


# ---------------------------------------------------------------------------- key state


class KS(enum.IntEnum):
    PRE_START = 1
    START = 2  # reset exchanged, TLS running
    SENT_KEY = 3
    GOT_KEY = 4
    ACTIVE = 5  # key-method-2 messages exchanged
    GENERATED_KEYS = 6
    FAILED = 9


def next_key_id(key_id: int) -> int:
    """Renegotiations use key ids 1..7 cyclically; 0 belongs to the first session only."""
    return 1 if key_id >= 7 else key_id + 1


@dataclass
class KeyState:
    key_id: int
    tls: TlsEndpoint
    sender: ReliableSender
    receiver: ReliableReceiver
    acks: AckTracker = field(default_factory=AckTracker)
    state: KS = KS.PRE_START
    local_km2: km.KeyMethod2 | None = None
    remote_km2: km.KeyMethod2 | None = None
    km2_sent: bool = False
    started: float = 0.0
    must_negotiate: float = 0.0
    auth_deferred_expire: float = 0.0
    established: float = 0.0
    must_die: float | None = None
    key2: bytes | None = None
    pending_text: deque[str] = field(default_factory=deque)


def _chunk_limit(wrap: Wrap) -> int:
    # A whole control datagram must fit the tls-mtu, worst case IPv6 + UDP headers (48) around it,
    # plus opcode, session id, up to 4 ACKs with the remote session id, the message id and the wrap.
    return TLS_MTU - 48 - 9 - (1 + 4 * ACK_MAX_PIGGYBACK + 8) - 4 - wrap.overhead - 16


class Session:
    """One control-channel session (one tls_session in OpenVPN terms) with one peer."""

    def __init__(
        self, config: SessionConfig, *, rng: Callable[[int], bytes], now: float, wrap: Wrap | None = None
    ) -> None:
        self.cfg = config
        self._rng = rng
        self.session_id = self._new_session_id()
        self.peer_session_id: bytes | None = None
        # a P2MP server hands in the wrap it already checked the client's first packet with
        self.wrap: Wrap = wrap if wrap is not None else self._make_wrap()
        self._out: list[bytes] = []
        self._events: deque[SessionEvent] = deque()
        self.primary: KeyState | None = None
        self.lame_duck: KeyState | None = None
        self.closed = False
        self._auth_token: str | None = None
        self.peer_id: int | None = None
        self.cipher: Cipher | None = None
        self.use_ekm = False
        self.cc_exit = False
        self._remote_iv_proto = 0
        self._push_parts: list[str] = []
        self._auth_state = "none"  # P2MP server: none | pending | accepted | rejected
        self._push_requested = False
        self._push_options: list[str] = []
        self._push_reply_until = 0.0
        self._tls_dirty = False  # TLS output may be waiting in a memory BIO
        self._resend_wkc = False  # tls-crypt-v2: the server's reset asked for WKc in our next packet
        self._flush_due = False  # something may be ready to send: packets_to_send() builds it
        self._next_push_request: float | None = None
        self._backend_slots: dict[KeySlot, int | None] = {KeySlot.PRIMARY: None, KeySlot.SECONDARY: None}
        self._now = now
        self.primary = self._new_key_state(0, now)
        if not config.is_tls_server:
            # tls-crypt-v2 clients announce themselves (and carry WKc) with the V3 reset
            first = (
                Opcode.CONTROL_HARD_RESET_CLIENT_V3
                if config.tls_crypt_v2_client is not None
                else Opcode.CONTROL_HARD_RESET_CLIENT_V2
            )
            self.primary.sender.enqueue(first, b"")

    @classmethod
    def after_cookie(
        cls,
        config: SessionConfig,
        proof: CookieVerified,
        *,
        rng: Callable[[bytes], bytes] | Callable[[int], bytes],
        now: float,
        wrap: Wrap | None = None,
    ) -> Session:
        """A P2MP server session for a client that passed the stateless cookie check.

        Behaves as if the two hard resets (message id 0 each way) had been exchanged; feed the
        proof packet to :meth:`receive` next.
        """
        sess = cls(config, rng=rng, now=now, wrap=wrap)  # type: ignore[arg-type]
        sess.session_id = proof.server_session_id
        sess.peer_session_id = proof.client_session_id
        ks = sess.primary
        assert ks is not None
        ks.receiver.expected = 1
        ks.sender.skip_id()
        ks.state = KS.START
        sess.wrap.skip_replay_ids(1)
        return sess

    # ------------------------------------------------------------------ helpers

    def _new_session_id(self) -> bytes:
        while True:
            sid = self._rng(SESSION_ID_LEN)
            if sid != b"\x00" * SESSION_ID_LEN:
                return sid

    def _make_wrap(self) -> Wrap:
        c = self.cfg
        if c.tls_crypt_v2_client is not None and not c.is_tls_server:
            return TlsCryptV2Client(c.tls_crypt_v2_client, replay_window=c.replay_window)
        if c.tls_crypt_v2_server is not None and c.is_tls_server:
            return TlsCryptV2Server(
                c.tls_crypt_v2_server, check=c.tls_crypt_v2_check, replay_window=c.replay_window
            )
        if c.tls_crypt_key is not None:
            return TlsCrypt(c.tls_crypt_key, is_server=c.is_tls_server, replay_window=c.replay_window)
        if c.tls_auth_key is not None:
            return TlsAuth(c.tls_auth_key, c.key_direction, c.auth_digest, c.replay_window)
        return NoWrap()

    def _new_key_state(self, key_id: int, now: float) -> KeyState:
        tls = TlsEndpoint(self.cfg.tls_context, is_server=self.cfg.is_tls_server, check=self.cfg.peer_check)
        ks = KeyState(
            key_id=key_id,
            tls=tls,
            sender=ReliableSender(initial_timeout=self.cfg.tls_timeout),
            receiver=ReliableReceiver(),
        )
        ks.started = now
        ks.must_negotiate = now + self.cfg.hand_window
        # OpenVPN switches its send key min(hand-window, reneg-sec/2) after a renegotiation starts.
        # A peer with a shorter reneg-sec than ours may discard our old key sooner than that
        # (it keeps only one lame duck), so we never wait longer than KEY_SWITCH_MAX_DELAY: by then
        # the peer has ACKed the key-method-2 exchange and derived the new key itself.
        window = min(self.cfg.hand_window, KEY_SWITCH_MAX_DELAY)
        if self.cfg.reneg_sec and self.cfg.reneg_sec // 2 < window:
            window = self.cfg.reneg_sec // 2
        ks.auth_deferred_expire = now + window
        return ks

    def _emit(self, event: SessionEvent) -> None:
        self._events.append(event)

    def _fail(self, reason: str, *, restart: bool = True, auth_failed: bool = False) -> None:
        if not self.closed:
            self.closed = True
            log.warning("session closed: %s", reason)
            self._emit(SessionClosed(reason, restart, auth_failed))

    # ------------------------------------------------------------------ public API

    def packets_to_send(self, *, ack_only: bool = True) -> list[bytes]:
        """The control packets to send now.

        ACKs ride on outgoing control packets where possible; those still owed go out as ACK_V1
        packets here, unless ``ack_only`` is false: an edge that has more packets of this peer
        to feed (the rest of a receive batch) can leave them owed and collect them afterwards,
        so one ACK_V1 (or a reply) covers the whole batch.
        """
        self._build_packets()
        if ack_only:
            self._flush_acks()
        out, self._out = self._out, []
        return out

    @property
    def acks_owed(self) -> bool:
        """ACKs that no outgoing packet has carried yet (see :meth:`packets_to_send`)."""
        if self.peer_session_id is None:
            return False
        return any(ks is not None and ks.acks.pending for ks in (self.lame_duck, self.primary))

    def next_event(self) -> SessionEvent | None:
        return self._events.popleft() if self._events else None

    def events(self) -> list[SessionEvent]:
        out = list(self._events)
        self._events.clear()
        return out

    def next_timer(self) -> float | None:
        self._build_packets()  # what is built now has its retransmission deadline from now on
        if self.closed:
            return None
        deadlines: list[float] = []
        for ks in (self.primary, self.lame_duck):
            if ks is None:
                continue
            d = ks.sender.next_deadline()
            if d is not None:
                deadlines.append(d)
            if ks.state < KS.GENERATED_KEYS:
                deadlines.append(ks.must_negotiate)
            if ks.must_die is not None:
                deadlines.append(ks.must_die)
        p = self.primary
        if p is not None and p.state is KS.GENERATED_KEYS:
            if self.cfg.reneg_sec:
                deadlines.append(p.established + self.cfg.reneg_sec)
            if self._backend_slots[KeySlot.SECONDARY] == p.key_id:
                deadlines.append(self._swap_time(p))
        if self._next_push_request is not None:
            deadlines.append(self._next_push_request)
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> None:
        self._now = now
        if self.closed:
            return
        self._housekeeping(now)
        self._flush(now)

    def receive(self, data: bytes, now: float) -> None:
        """Feed one control packet (no TCP length prefix). Bad packets are dropped and logged."""
        self._now = now
        if self.closed:
            return
        try:
            self._receive(data, now)
        except ProtocolError as exc:
            log.info("dropped control packet: %s", exc)
        if not self.closed:
            self._housekeeping(now)
            self._flush(now)

    def send_text(self, message: str) -> None:
        """Queue a text control message (NUL-terminated, one TLS record) on the active key."""
        ks = self.primary
        if ks is None:
            return
        if ks.state >= KS.ACTIVE:
            ks.tls.send(message.encode() + b"\x00")
            self._tls_dirty = True
            # a message sent on its own (management client-kill) must not wait for the next input
            self._flush_due = True
        else:
            ks.pending_text.append(message)

    def close(self, now: float, *, notify: bool = True) -> None:
        """Local shutdown: tell the peer with EXIT when cc-exit was negotiated."""
        if self.closed:
            return
        if notify and self.cc_exit and self.primary is not None and self.primary.state >= KS.ACTIVE:
            self.send_text("EXIT")
            self._flush(now)
        self.closed = True

    # ------------------------------------------------------------------ P2MP server

    def server_cipher(self) -> Cipher | None:
        """NCP on the server: the first of our data-ciphers that the client announced."""
        info = getattr(self, "_remote_info", {})
        theirs = [c.upper() for c in info.get("IV_CIPHERS", "").split(":") if c]
        if not theirs and int(info.get("IV_NCP", "0") or 0) >= 2:
            theirs = ["AES-256-GCM", "AES-128-GCM"]
        for name in self.cfg.data_ciphers:
            if name.upper() in theirs:
                try:
                    return Cipher.from_name(name)
                except ValueError:
                    continue
        fallback = self.cfg.data_ciphers_fallback
        if not theirs and fallback:
            try:
                return Cipher.from_name(fallback)
            except ValueError:
                log.warning("%s", non_aead_refusal(fallback, "a client that does not negotiate ciphers"))
        return None

    def accept_client(self, now: float, *, peer_id: int, push: list[str]) -> None:
        """Let an authenticated client in: derive its keys now, push ``push`` plus the negotiated options."""
        ks = self.primary
        if self.closed or ks is None or self._auth_state != "pending":
            return
        self._now = now
        cipher = self.server_cipher()
        if cipher is None:
            self.reject_client(now, "Data channel cipher negotiation failed (no shared cipher)")
            return
        if not self._remote_iv_proto & km.IV_PROTO_DATA_V2:
            self.reject_client(
                now, "client does not support DATA_V2 (peer-id), needed by the offloaded data channel"
            )
            return
        self.cipher = cipher
        self.peer_id = peer_id
        self.use_ekm = bool(self._remote_iv_proto & km.IV_PROTO_TLS_KEY_EXPORT) and self.cfg.offer_ekm
        self.cc_exit = bool(self._remote_iv_proto & km.IV_PROTO_CC_EXIT_NOTIFY)
        opts = [*push, f"peer-id {peer_id}", f"cipher {cipher.value}"]
        flags = (["cc-exit"] if self.cc_exit else []) + (["tls-ekm"] if self.use_ekm else [])
        if self.cc_exit:
            opts.append("protocol-flags " + " ".join(flags))
        elif self.use_ekm:
            opts.append("key-derivation tls-ekm")
        self._push_options = opts
        self._auth_state = "accepted"
        self._generate_keys(ks, now)
        if self._push_requested or self._remote_iv_proto & km.IV_PROTO_REQUEST_PUSH:
            self._send_push_reply()
        self._flush(now)

    def reject_client(self, now: float, reason: str = "") -> None:
        """Send AUTH_FAILED and end the session once it has been delivered."""
        if self.closed:
            return
        self._now = now
        self._auth_state = "rejected"
        self.send_text("AUTH_FAILED" + (f",{reason}" if reason else ""))
        self._flush(now)
        self._fail(f"client rejected: {reason or 'authentication failed'}", restart=False)

    def _send_push_reply(self) -> None:
        self._push_requested = False
        self._push_reply_until = self._now + PUSH_REPLY_HOLD
        messages: list[str] = []
        current: list[str] = []
        for opt in self._push_options:
            if (
                current
                and len("PUSH_REPLY," + ",".join([*current, opt]) + ",push-continuation 2")
                > PUSH_MESSAGE_LIMIT
            ):
                messages.append(",".join(current))
                current = []
            current.append(opt)
        messages.append(",".join(current))
        for i, body in enumerate(messages):
            tail = (
                ""
                if len(messages) == 1
                else (",push-continuation 2" if i < len(messages) - 1 else ",push-continuation 1")
            )
            self.send_text(f"PUSH_REPLY,{body}{tail}")

    @property
    def remote_options(self) -> str:
        """The peer's OCC options string ("" before its key-method-2 message)."""
        return str(getattr(self, "_remote_options", ""))

    def request_renegotiation(self, now: float) -> None:
        """Start a soft reset now (e.g. the data channel reported the key exhausted)."""
        self._now = now
        p = self.primary
        if self.closed or p is None or p.state is not KS.GENERATED_KEYS:
            return
        self._start_renegotiation(now, initiator=True)
        self._flush(now)

    @property
    def established(self) -> bool:
        return self.primary is not None and self.primary.state is KS.GENERATED_KEYS

    # ------------------------------------------------------------------ receive path

    def _receive(self, data: bytes, now: float) -> None:
        pkt = self.wrap.unwrap(data)
        op = pkt.opcode
        if self.cfg.is_tls_server and op is Opcode.CONTROL_HARD_RESET_SERVER_V2:
            raise ProtocolError("server->server hard reset (both sides are tls-server?)")
        if not self.cfg.is_tls_server and op in (
            Opcode.CONTROL_HARD_RESET_CLIENT_V2,
            Opcode.CONTROL_HARD_RESET_CLIENT_V3,
        ):
            raise ProtocolError("client->client hard reset (both sides are tls-client?)")
        if op is Opcode.CONTROL_HARD_RESET_CLIENT_V3 and not isinstance(self.wrap, TlsCryptV2Server):
            raise ProtocolError(
                "tls-crypt-v2 client reset received; configure `tls-crypt-v2 SERVERKEY` to accept it"
            )

        if self.peer_session_id is None:
            if not pkt.is_hard_reset or pkt.rh.message_id != 0:
                raise ProtocolError(f"{op.name} before the hard reset; dropped")
            self.peer_session_id = pkt.session_id
        elif pkt.session_id != self.peer_session_id:
            if pkt.is_hard_reset and pkt.rh.message_id == 0 and self.cfg.is_tls_server:
                self._emit(PeerRestarted(data))
                return
            raise ProtocolError("control packet from an unknown session id")

        if pkt.rh.acks and pkt.rh.remote_session_id != self.session_id:
            raise ProtocolError("ACK for a session id that is not ours")

        ks = self._key_state_for(pkt, now)
        if ks is None:
            return
        ks.sender.process_acks(pkt.rh.acks)
        if op is Opcode.ACK_V1:
            return
        mid = pkt.rh.message_id
        assert mid is not None
        if pkt.is_hard_reset and mid != 0:
            raise ProtocolError("hard reset with a non-zero message id")
        if ks.receiver.receive(mid, op, pkt.rh.payload):
            ks.acks.add(mid)
        for r_op, payload in ks.receiver.pop_ready():
            self._deliver(ks, r_op, payload, now)

    def _key_state_for(self, pkt: ControlPacket, now: float) -> KeyState | None:
        p = self.primary
        assert p is not None
        if pkt.key_id == p.key_id:
            return p
        if self.lame_duck is not None and pkt.key_id == self.lame_duck.key_id:
            return self.lame_duck
        if pkt.opcode is Opcode.CONTROL_SOFT_RESET_V1 and p.state is KS.GENERATED_KEYS:
            if pkt.key_id != next_key_id(p.key_id):
                raise ProtocolError(f"soft reset to unexpected key_id {pkt.key_id}")
            self._start_renegotiation(now, initiator=False)
            return self.primary
        raise ProtocolError(f"key IDs out of sync (got key_id {pkt.key_id}, active {p.key_id})")

    def _deliver(self, ks: KeyState, op: Opcode, payload: bytes, now: float) -> None:
        if op in (
            Opcode.CONTROL_HARD_RESET_CLIENT_V2,
            Opcode.CONTROL_HARD_RESET_CLIENT_V3,
            Opcode.CONTROL_HARD_RESET_SERVER_V2,
        ):
            if ks.key_id != 0:
                raise ProtocolError("hard reset on a renegotiated key")
            if self.cfg.is_tls_server:
                ks.sender.enqueue(Opcode.CONTROL_HARD_RESET_SERVER_V2, b"")
            elif payload:
                _check_reset_tlvs(payload)
                if isinstance(self.wrap, TlsCryptV2Client) and asks_to_resend_wkc(payload):
                    self._resend_wkc = True
            self._tls_start(ks)
            return
        if op is Opcode.CONTROL_SOFT_RESET_V1:
            self._tls_start(ks)
            return
        if op in (Opcode.CONTROL_V1, Opcode.CONTROL_WKC_V1):
            if ks.state < KS.START:
                raise ProtocolError("TLS data before the reset exchange")
            ks.tls.feed(payload)
            self._tls_progress(ks, now)
            return
        raise ProtocolError(f"unexpected {op.name}")

    # ------------------------------------------------------------------ TLS + key-method-2

    def _tls_start(self, ks: KeyState) -> None:
        if ks.state >= KS.START:
            return
        ks.state = KS.START
        if not self.cfg.is_tls_server:
            ks.tls.advance()  # produces the ClientHello
            self._tls_dirty = True

    def _pump_tls_output(self, ks: KeyState) -> None:
        data = ks.tls.pending_output()
        limit = _chunk_limit(self.wrap)
        if self._resend_wkc and data and isinstance(self.wrap, TlsCryptV2Client):
            # a stateless server learns our key from the first CONTROL packet: WKc rides along
            self._resend_wkc = False
            first = max(16, limit - self.wrap.wkc_len)
            ks.sender.enqueue(Opcode.CONTROL_WKC_V1, data[:first])
            data = data[first:]
        for i in range(0, len(data), limit):
            ks.sender.enqueue(Opcode.CONTROL_V1, data[i : i + limit])

    def _tls_progress(self, ks: KeyState, now: float) -> None:
        done = ks.tls.advance()
        self._tls_dirty = True
        if done and not ks.km2_sent and not self.cfg.is_tls_server:
            self._send_km2(ks)
        if not done:
            return
        for record in ks.tls.receive():
            if ks.remote_km2 is None:
                ks.remote_km2 = km.KeyMethod2.decode(record, from_client=self.cfg.is_tls_server)
                self._on_remote_km2(ks, now)
            else:
                for raw in record.split(b"\x00"):
                    text = raw.decode("utf-8", "replace").rstrip("\r\n")
                    if text:
                        self._on_text(ks, text, now)

    def _iv_proto(self) -> int:
        bits = km.IV_PROTO_DATA_V2 | km.IV_PROTO_CC_EXIT_NOTIFY
        if self.cfg.offer_ekm:
            bits |= km.IV_PROTO_TLS_KEY_EXPORT
        if self.cfg.pull:
            bits |= km.IV_PROTO_REQUEST_PUSH
        else:
            bits |= km.IV_PROTO_NCP_P2P
        return bits

    def _send_km2(self, ks: KeyState) -> None:
        c = self.cfg
        peer_info = (
            ""
            if c.mode_server
            else km.build_peer_info(
                version=c.version,
                ciphers=list(c.data_ciphers),
                iv_proto=self._iv_proto(),
                pull=c.pull,
                tun_mtu=c.tun_mtu,
                compression=c.compression,
            )
        )
        options = km.occ_options_string(
            tls_server=c.is_tls_server,
            proto=c.proto,
            cipher=(self.cipher.value if self.cipher else c.data_ciphers[0]) if c.data_ciphers else None,
            tun_mtu=c.tun_mtu,
            tls_auth=c.tls_auth_key is not None,
            key_direction=c.key_direction,
            compression=c.compression is not None,
        )
        msg = km.KeyMethod2(
            random1=self._rng(km.RANDOM_LEN),
            random2=self._rng(km.RANDOM_LEN),
            options=options,
            pre_master=None if c.is_tls_server else self._rng(km.PRE_MASTER_LEN),
            username=(c.username or "") if not c.is_tls_server else "",
            # a pushed auth-token stands in for the password in every later key exchange
            password=(self._auth_token or c.password or "") if not c.is_tls_server else "",
            peer_info=peer_info,
        )
        ks.local_km2 = msg
        ks.tls.send(msg.encode())
        self._tls_dirty = True
        ks.km2_sent = True
        if ks.state < KS.SENT_KEY:
            ks.state = KS.SENT_KEY

    def _on_remote_km2(self, ks: KeyState, now: float) -> None:
        remote = ks.remote_km2
        assert remote is not None
        if ks.key_id == 0:
            info = km.parse_peer_info(remote.peer_info)
            self._remote_iv_proto = km.peer_iv_proto(info)
            self._remote_info = info
            self._remote_options = remote.options
        if self.cfg.is_tls_server:
            self._send_km2(ks)
        ks.state = KS.ACTIVE
        while ks.pending_text:
            ks.tls.send(ks.pending_text.popleft().encode() + b"\x00")
            self._tls_dirty = True
        if ks.key_id != 0:
            self._generate_keys(ks, now)
        elif self.cfg.pull:
            self._send_push_request(now)
        elif self.cfg.mode_server:
            self._auth_state = "pending"
            self._emit(
                ClientAuthRequest(
                    common_name=ks.tls.peer_common_name(),
                    username=remote.username,
                    password=remote.password,
                    peer_info=self._remote_info,
                    iv_proto=self._remote_iv_proto,
                )
            )
        else:
            self._p2p_negotiate(ks)
            self._generate_keys(ks, now)

    # ------------------------------------------------------------------ negotiation

    def _p2p_negotiate(self, ks: KeyState) -> None:
        peer = self._remote_iv_proto
        if not peer & km.IV_PROTO_NCP_P2P:
            fallback = self.cfg.data_ciphers_fallback
            if fallback is None:
                raise_closed = (
                    "peer does not support P2P cipher negotiation (OpenVPN < 2.6); set data-ciphers-fallback"
                )
                self._fail(raise_closed, restart=False)
                return
            try:
                self.cipher = Cipher.from_name(fallback)
            except ValueError:
                self._fail(non_aead_refusal(fallback, "a peer without cipher negotiation"), restart=False)
                return
        else:
            peer_ciphers = [c.upper() for c in self._remote_info.get("IV_CIPHERS", "").split(":") if c]
            ours = [c.upper() for c in self.cfg.data_ciphers]
            server_list, client_list = (
                (ours, peer_ciphers) if self.cfg.is_tls_server else (peer_ciphers, ours)
            )
            common = next((c for c in server_list if c in client_list), None)
            if common is None:
                common = self.cfg.data_ciphers_fallback
            if common is None:
                self._fail(
                    f"no common data cipher: ours {':'.join(ours)}, peer {':'.join(peer_ciphers)}",
                    restart=False,
                )
                return
            try:
                self.cipher = Cipher.from_name(common)
            except ValueError:
                self._fail(non_aead_refusal(common, "the peer (no common AEAD cipher)"), restart=False)
                return
        if not peer & km.IV_PROTO_DATA_V2:
            self._fail(
                "peer does not support DATA_V2 packets, which the offloaded data channel needs", restart=False
            )
            return
        self.use_ekm = bool(peer & km.IV_PROTO_TLS_KEY_EXPORT) and self.cfg.offer_ekm
        self.cc_exit = bool(peer & km.IV_PROTO_CC_EXIT_NOTIFY)
        if self.use_ekm:
            raw = ks.tls.export_keying_material(EKM_LABEL_P2P_PEERID, 3)
            self.peer_id = int.from_bytes(raw, "big")
        else:
            self.peer_id = P2P_DEFAULT_PEER_ID

    def _send_push_request(self, now: float) -> None:
        self.send_text("PUSH_REQUEST")
        self._next_push_request = now + PUSH_REQUEST_INTERVAL

    def _on_text(self, ks: KeyState, text: str, now: float) -> None:
        if text.startswith("PUSH_REPLY"):
            if self.cfg.pull and self._backend_slots[KeySlot.PRIMARY] is not None:
                renewed = _renewed_auth_token(text)
                if renewed is not None:
                    self._auth_token = renewed  # the server renews its token at each renegotiation
                    return
            if not self.cfg.pull or self._backend_slots[KeySlot.PRIMARY] is not None:
                log.info("ignoring unexpected %s", text[:40])
                return
            opts, more = split_push_message(text)
            self._push_parts += opts
            if more:
                return
            self._next_push_request = None
            filtered = filter_pushed(
                self._push_parts, self.cfg.pull_filters, route_nopull=self.cfg.route_nopull
            )
            self._push_parts = []
            for line in filtered.removed:
                log.info("Pushed option removed by filter: '%s'", line)
            if filtered.rejected is not None:
                self._fail(f"Pushed option rejected by filter (pull-filter reject): '{filtered.rejected}'")
                return
            pushed = parse_pushed_options(filtered.kept)
            self._apply_push(ks, pushed, now)
        elif text.startswith("AUTH_FAILED"):
            self._fail(
                f"server said {text}: check auth-user-pass credentials / client certificate",
                restart=False,
                auth_failed=True,
            )
        elif text.startswith("AUTH_PENDING"):
            self._next_push_request = now + PUSH_REQUEST_INTERVAL
        elif text.startswith("RESTART"):
            self._fail(f"server requested a restart ({text})")
        elif text.startswith("HALT"):
            self._fail(f"server requested halt ({text})", restart=False)
        elif text == "EXIT":
            self._fail("peer sent exit notification")
        elif text.startswith("INFO"):
            log.info("server info: %s", text)
        elif text.startswith("PUSH_REQUEST"):
            if not self.cfg.mode_server:
                log.debug("ignoring PUSH_REQUEST (not a P2MP server)")
            elif self._auth_state == "accepted":
                if now >= self._push_reply_until:
                    self._send_push_reply()
                else:
                    log.debug("PUSH_REQUEST answered by the PUSH_REPLY already sent")
            elif self._auth_state == "pending":
                self.send_text("AUTH_PENDING")
            else:
                self._push_requested = True
        else:
            log.info("ignoring unknown control message %r", text[:60])

    @property
    def auth_token(self) -> str | None:
        """The latest auth-token the server pushed (a client's password for its next login)."""
        return self._auth_token

    def _apply_push(self, ks: KeyState, pushed: PushedOptions, now: float) -> None:
        if pushed.auth_token is not None:
            self._auth_token = pushed.auth_token
        ours = [c.upper() for c in self.cfg.data_ciphers]
        name = pushed.cipher
        if name is None:
            occ_cipher = _occ_value(getattr(self, "_remote_options", ""), "cipher")
            name = occ_cipher if occ_cipher and occ_cipher.upper() in ours else self.cfg.data_ciphers_fallback
        if name is None:
            self._fail("server pushed no cipher and no data-ciphers-fallback is set", restart=False)
            return
        if name.upper() not in ours and name != self.cfg.data_ciphers_fallback:
            self._fail(
                f"server pushed cipher {name}, which is not in data-ciphers {':'.join(ours)}", restart=False
            )
            return
        try:
            self.cipher = Cipher.from_name(name)
        except ValueError:
            self._fail(non_aead_refusal(name, "the server (pushed or fallback cipher)"), restart=False)
            return
        if pushed.peer_id is None:
            self._fail(
                "server pushed no peer-id; the offloaded data channel needs DATA_V2 (OpenVPN >= 2.4 server)",
                restart=False,
            )
            return
        if pushed.aead_epoch:
            self._fail("server enabled the epoch data format, which pyovpn did not offer", restart=False)
            return
        self.peer_id = pushed.peer_id
        self.use_ekm = pushed.tls_ekm
        self.cc_exit = pushed.cc_exit
        self._pushed = pushed
        self._generate_keys(ks, now)

    # ------------------------------------------------------------------ keys

    def _derive_key2(self, ks: KeyState) -> bytes:
        if self.use_ekm:
            return ks.tls.export_keying_material(EKM_LABEL_DATAKEYS, 256)
        local, remote = ks.local_km2, ks.remote_km2
        assert local is not None and remote is not None
        client, server = (remote, local) if self.cfg.is_tls_server else (local, remote)
        assert client.pre_master is not None
        assert self.peer_session_id is not None
        client_sid, server_sid = (
            (self.peer_session_id, self.session_id)
            if self.cfg.is_tls_server
            else (self.session_id, self.peer_session_id)
        )
        return prf_key2(
            pre_master=client.pre_master,
            client_random1=client.random1,
            server_random1=server.random1,
            client_random2=client.random2,
            server_random2=server.random2,
            client_session_id=client_sid,
            server_session_id=server_sid,
        )

    def _key_command(self, ks: KeyState, slot: KeySlot) -> NewKey:
        assert ks.key2 is not None and self.cipher is not None and self.peer_id is not None
        enc, dec = split_key2(ks.key2, self.cipher, tls_client=not self.cfg.is_tls_server)
        return NewKey(self.peer_id, slot, ks.key_id, self.cipher, enc, dec)

    def _generate_keys(self, ks: KeyState, now: float) -> None:
        if self.closed or ks.state is KS.GENERATED_KEYS:
            return
        assert self.cipher is not None and self.peer_id is not None
        ks.key2 = self._derive_key2(ks)
        ks.state = KS.GENERATED_KEYS
        ks.established = now
        if ks.key_id == 0 and self._backend_slots[KeySlot.PRIMARY] is None:
            c = self.cfg
            pushed = getattr(self, "_pushed", None)
            interval, timeout = c.ping, c.ping_restart
            if pushed is not None:
                interval = pushed.ping if pushed.ping is not None else interval
                timeout = pushed.ping_restart if pushed.ping_restart is not None else timeout
            if bool(interval) != bool(timeout):
                # the kernel takes keepalive as a pair; OpenVPN's pre-pull default restart is 120 s
                interval, timeout = interval or 10, timeout or 120
            self._emit(
                TunnelUp(
                    peer_id=self.peer_id,
                    cipher=self.cipher,
                    keepalive_interval=interval,
                    keepalive_timeout=timeout,
                    pushed=pushed,
                    cc_exit=self.cc_exit,
                    key_derivation="tls-ekm" if self.use_ekm else "prf",
                    tls_summary=f"{ks.tls.version} {ks.tls.cipher}, peer CN={ks.tls.peer_common_name()!r}",
                    peer_common_name=ks.tls.peer_common_name() or "",
                    peer_certificate_env=tuple(ks.tls.peer_certificate_env().items()),
                )
            )
            self._emit(self._key_command(ks, KeySlot.PRIMARY))
            self._backend_slots[KeySlot.PRIMARY] = ks.key_id
        else:
            self._emit(self._key_command(ks, KeySlot.SECONDARY))
            self._backend_slots[KeySlot.SECONDARY] = ks.key_id
            log.info("renegotiated data channel key_id=%d (%s)", ks.key_id, self.cipher.value)
            self._maybe_swap(now)

    def _maybe_swap(self, now: float) -> None:
        p = self.primary
        if p is None or self.peer_id is None:
            return
        if self._backend_slots[KeySlot.SECONDARY] == p.key_id and now >= self._swap_time(p):
            self._swap(p)

    def _swap(self, ks: KeyState) -> None:
        """The backend sends with ``ks`` (installed in the secondary slot) from now on."""
        assert self.peer_id is not None
        self._emit(SwapKeys(self.peer_id))
        s = self._backend_slots
        s[KeySlot.PRIMARY], s[KeySlot.SECONDARY] = s[KeySlot.SECONDARY], s[KeySlot.PRIMARY]
        log.info("data channel now sends with key_id=%d", ks.key_id)

    def _swap_time(self, ks: KeyState) -> float:
        # The peer derives its key only once our last handshake packet is ACKed, which can take a
        # retransmission under load; sending on the new key before then gets it dropped.
        return max(ks.auth_deferred_expire, ks.established + self.cfg.tls_timeout + 1.0)

    def _start_renegotiation(self, now: float, *, initiator: bool) -> None:
        old = self.primary
        assert old is not None
        if self.peer_id is not None and self._backend_slots[KeySlot.SECONDARY] == old.key_id:
            # The key negotiated last is still waiting for its swap (renegotiations come faster
            # than the swap delay, e.g. reneg-sec 2). Send with it now: the peer keeps only the
            # newest keys, and the key we still send with is about to be retired below.
            self._swap(old)
        new = self._new_key_state(next_key_id(old.key_id), now)
        if self.lame_duck is not None and self.lame_duck.state is KS.GENERATED_KEYS:
            self._retire(self.lame_duck)
        old.must_die = now + self.cfg.tran_window
        self.lame_duck = old
        self.primary = new
        new.sender.enqueue(Opcode.CONTROL_SOFT_RESET_V1, b"")
        log.info("%s renegotiation, key_id=%d", "starting" if initiator else "peer started", new.key_id)

    def _retire(self, ks: KeyState) -> None:
        """Forget a lame-duck key; tell the backend if it still holds it."""
        if self.peer_id is not None and self._backend_slots[KeySlot.SECONDARY] == ks.key_id:
            self._emit(DelKey(self.peer_id, KeySlot.SECONDARY))
            self._backend_slots[KeySlot.SECONDARY] = None
        if ks is self.lame_duck:
            self.lame_duck = None

    def _housekeeping(self, now: float) -> None:
        p = self.primary
        assert p is not None
        if p.state < KS.GENERATED_KEYS and now >= p.must_negotiate:
            if p.key_id == 0:
                self._fail(
                    f"TLS key negotiation failed to occur within {self.cfg.hand_window} seconds "
                    "(check your network connectivity, the remote address, and that the "
                    "tls-auth/tls-crypt keys match)"
                )
                return
            log.warning("renegotiation of key_id=%d timed out; keeping the previous key", p.key_id)
            if self.lame_duck is not None:
                self.primary, self.lame_duck = self.lame_duck, None
                self.primary.must_die = None
                self.primary.established = now  # retry after another reneg interval
        if (
            self.lame_duck is not None
            and self.lame_duck.must_die is not None
            and now >= self.lame_duck.must_die
        ):
            self._retire(self.lame_duck)
        if p.state is KS.GENERATED_KEYS:
            self._maybe_swap(now)
            if self.cfg.reneg_sec and now >= p.established + self.cfg.reneg_sec:
                self._start_renegotiation(now, initiator=True)
        if self._next_push_request is not None and now >= self._next_push_request:
            self._send_push_request(now)

    # ------------------------------------------------------------------ send path

    def _flush(self, now: float) -> None:
        """Note that control packets may be due; :meth:`packets_to_send` builds them.

        Building late lets everything one batch of input produced share packets: the TLS
        records of a key-method-2 reply and the PUSH_REPLY that an edge authorizing the
        client at once adds, and the ACKs for all of it.
        """
        self._flush_due = True

    def _build_packets(self) -> None:
        if not self._flush_due:
            return
        self._flush_due = False
        now = self._now
        wnow = int(now)
        dirty, self._tls_dirty = self._tls_dirty, False
        for ks in (self.lame_duck, self.primary):
            if ks is None:
                continue
            if dirty and ks.state >= KS.START:
                if (
                    self.cfg.is_tls_server
                    and ks.tls.established
                    and not ks.km2_sent
                    and ks.tls.version == "TLSv1.3"
                ):
                    # a TLS 1.3 server says nothing between the end of its handshake and its
                    # key-method-2 reply but session tickets: they wait and share that reply's
                    # packet. A TLS 1.2 server's last flight (ChangeCipherSpec, Finished) comes
                    # after the client's and must go now: the client's key-method-2 waits for it
                    self._tls_dirty = True
                else:
                    # everything TLS wrote since the last build, in as few packets as fit
                    self._pump_tls_output(ks)
            for out in ks.sender.due(now):
                acks = ks.acks.take(ACK_MAX_PIGGYBACK) if self.peer_session_id is not None else []
                rh = ReliabilityHeader(
                    tuple(acks), self.peer_session_id if acks else None, out.message_id, out.payload
                )
                self._out.append(self.wrap.wrap(out.opcode, ks.key_id, self.session_id, rh, wnow))

    def _flush_acks(self) -> None:
        """ACK_V1 packets for the ACKs no control packet has carried."""
        if self.peer_session_id is None:
            return
        wnow = int(self._now)
        for ks in (self.lame_duck, self.primary):
            if ks is not None and ks.acks.pending:
                limit = ACK_MAX_STANDALONE if self._wrapped_or_ekm() else ACK_MAX_PIGGYBACK
                acks = ks.acks.take(limit)
                rh = ReliabilityHeader(tuple(acks), self.peer_session_id, None, b"")
                self._out.append(self.wrap.wrap(Opcode.ACK_V1, ks.key_id, self.session_id, rh, wnow))

    def _wrapped_or_ekm(self) -> bool:
        # SoftEther drops packets with more than 4 ACKs; OpenVPN clients without a wrap cap at 4.
        return self.cfg.is_tls_server or not isinstance(self.wrap, NoWrap)


def _occ_value(options: str, name: str) -> str | None:
    for item in options.split(","):
        key, _, value = item.partition(" ")
        if key == name:
            return value.strip()
    return None


def _check_reset_tlvs(payload: bytes) -> None:
    pos = 0
    while pos < len(payload):
        if pos + 4 > len(payload):
            raise ProtocolError("malformed TLV in the server's hard reset")
        length = int.from_bytes(payload[pos + 2 : pos + 4], "big")
        pos += 4 + length
        if pos > len(payload):
            raise ProtocolError("malformed TLV in the server's hard reset")


def _renewed_auth_token(text: str) -> str | None:
    """The token of a mid-session "PUSH_REPLY,auth-token TOKEN" (OpenVPN's token renewal), else None."""
    opts, _more = split_push_message(text)
    tokens = [o.split()[1] for o in opts if o.startswith("auth-token ") and len(o.split()) == 2]
    if len(tokens) != 1 or any(not o.startswith(("auth-token", "auth-token-user")) for o in opts):
        return None
    return tokens[0]
