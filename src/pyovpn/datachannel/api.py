"""The data-channel offload interface: commands, replies and notifications as plain data.

The control plane drives every backend (the kernel ``ovpn`` driver, pyovpn's userspace
data plane) only through these types, modelled one-to-one on the kernel's generic-netlink
API (``OVPN_CMD_*``). They are frozen dataclasses of ints, bytes and strings, so the same
calls can cross a netlink socket or a local socket unchanged.

Two additions exist because userspace must keep talking on the transport socket after
handing it over: ``SendControl`` (the kernel equivalent is a plain ``send()`` on the
socket, which the kernel backend does) and the ``ControlPacket`` notification (the kernel
passes every non-DATA_V2 packet up the socket, which the kernel backend reads).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, cast

from pyovpn.errors import BackendError


class Cipher(enum.Enum):
    """Data-channel AEAD ciphers; values are OpenVPN's names."""

    AES_128_GCM = "AES-128-GCM"
    AES_256_GCM = "AES-256-GCM"
    CHACHA20_POLY1305 = "CHACHA20-POLY1305"

    @property
    def key_len(self) -> int:
        return 16 if self is Cipher.AES_128_GCM else 32

    @classmethod
    def from_name(cls, name: str) -> Cipher:
        upper = name.strip().upper()
        for c in cls:
            if c.value == upper:
                return c
        raise ValueError(f"unsupported data cipher {name!r}")


class Framing(enum.Enum):
    """OpenVPN's compression framing of data-channel payloads (pyovpn never compresses).

    The value is the option that selects it. ``LZO_PREFIX``: ``comp-lzo`` (any argument) and
    ``compress lzo``, one header byte before every payload. ``SWAP``: ``compress`` / ``compress
    stub`` / ``compress lz4``, the header replaces the first byte, which moves to the end.
    ``V2``: ``compress stub-v2`` / ``compress lz4-v2``, a two-byte header only when needed.
    """

    NONE = "none"
    LZO_PREFIX = "comp-lzo"
    SWAP = "compress"
    V2 = "compress stub-v2"

    @classmethod
    def from_option(cls, option: tuple[str, str] | None) -> Framing:
        """The framing of ``comp-lzo``/``compress`` with its argument ("" for none); NONE for None."""
        if option is None:
            return cls.NONE
        name, arg = option
        if name == "comp-lzo" and arg in ("", "yes", "no", "adaptive"):
            return cls.LZO_PREFIX
        if name == "compress":
            if arg == "lzo":
                return cls.LZO_PREFIX
            if arg in ("", "stub", "lz4"):
                return cls.SWAP
            if arg in ("stub-v2", "lz4-v2"):
                return cls.V2
        raise ValueError(f"unknown compression option {' '.join(option)!r}")


class IfaceMode(enum.IntEnum):
    P2P = 0  # one peer; OVPN_MODE_P2P
    MP = 1  # many peers, looked up by route; OVPN_MODE_MP


class KeySlot(enum.IntEnum):
    PRIMARY = 0
    SECONDARY = 1


class PeerDelReason(enum.IntEnum):
    TEARDOWN = 0
    USERSPACE = 1
    EXPIRED = 2  # keepalive timeout
    TRANSPORT_ERROR = 3
    TRANSPORT_DISCONNECT = 4


class Transport(enum.Enum):
    UDP = "udp"
    TCP = "tcp"


Address = tuple[str, int]  # (ip literal, port); IPv6 literals without brackets


def normalize_address(addr: tuple) -> Address:  # type: ignore[type-arg]
    """A socket address as the API's ``(ip, port)``; v4-mapped IPv6 becomes IPv4 like the kernel."""
    ip = addr[0]
    if ip.startswith("::ffff:") and "." in ip:
        ip = ip[7:]
    return (ip, addr[1])


# ---------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class NewIface:
    name: str
    mode: IfaceMode = IfaceMode.P2P
    mtu: int = 1500
    # OpenVPN's `dev null`: no device at all; packets from the peer are decrypted and discarded,
    # nothing is sent but control packets and pings (userspace backends, see Capabilities.null_dev)
    null: bool = False


@dataclass(frozen=True)
class DelIface:
    name: str


SHAPER_MIN = 100  # bytes per second: OpenVPN's bounds for `shaper` (NewPeer.shaper)
SHAPER_MAX = 100_000_000


@dataclass(frozen=True)
class NewPeer:
    """Create a peer. ``socket_fd`` is a file descriptor in the caller's process.

    For UDP ``remote`` is required; for TCP it must be ``None`` and the socket connected.
    ``tcp_backlog`` holds bytes already read from a TCP stream past the last whole frame
    (userspace backend only; the kernel needs the handover at a frame boundary).
    """

    peer_id: int
    socket_fd: int
    transport: Transport
    remote: Address | None = None
    local_ip: str | None = None
    vpn_ipv4: str | None = None
    vpn_ipv6: str | None = None
    keepalive_interval: int = 0
    keepalive_timeout: int = 0
    tx_peer_id: int | None = None  # defaults to peer_id
    tcp_backlog: bytes = b""
    framing: Framing = Framing.NONE  # compression framing (userspace backends only, see Capabilities)
    # `passtos`: each outgoing packet's outer TOS/traffic class is the inner packet's (Capabilities.passtos)
    passtos: bool = False
    # `fragment MAX`: OpenVPN's own fragmentation, no datagram above MAX bytes (0: off; Capabilities.fragment)
    fragment: int = 0
    # `shaper N`: the tunnel datagrams sent to this peer held to N bytes per second (0: off, else
    # SHAPER_MIN..SHAPER_MAX; Capabilities.shaper; one peer, as in OpenVPN)
    shaper: int = 0


@dataclass(frozen=True)
class SetPeer:
    peer_id: int
    remote: Address | None = None
    keepalive_interval: int | None = None
    keepalive_timeout: int | None = None


@dataclass(frozen=True)
class GetPeer:
    peer_id: int


@dataclass(frozen=True)
class DelPeer:
    peer_id: int


@dataclass(frozen=True)
class KeyDirection:
    cipher_key: bytes
    nonce_tail: bytes  # exactly 8 bytes: the implicit IV


@dataclass(frozen=True)
class NewKey:
    peer_id: int
    slot: KeySlot
    key_id: int  # 0..7
    cipher: Cipher
    encrypt: KeyDirection
    decrypt: KeyDirection


@dataclass(frozen=True)
class DelKey:
    peer_id: int
    slot: KeySlot


@dataclass(frozen=True)
class SwapKeys:
    """Atomically exchange the primary and secondary key slots of a peer."""

    peer_id: int


@dataclass(frozen=True)
class GetKey:
    peer_id: int
    slot: KeySlot


@dataclass(frozen=True)
class SendControl:
    """Send one whole control packet (no TCP length prefix) to the peer's remote."""

    peer_id: int
    packet: bytes


Command = (
    NewIface
    | DelIface
    | NewPeer
    | SetPeer
    | GetPeer
    | DelPeer
    | NewKey
    | DelKey
    | SwapKeys
    | GetKey
    | SendControl
)


#: The method that carries out each command, named alike in every backend (``handler_for``).
HANDLER_NAMES: dict[type, str] = {
    NewIface: "_new_iface",
    DelIface: "_del_iface",
    NewPeer: "_new_peer",
    SetPeer: "_set_peer",
    GetPeer: "_get_peer",
    DelPeer: "_del_peer",
    NewKey: "_new_key",
    DelKey: "_del_key",
    SwapKeys: "_swap_keys",
    GetKey: "_get_key",
    SendControl: "_send_control",
}


def handler_for(backend: object, command: object) -> Callable[[Any], Any]:
    """``backend``'s bound method for ``command``; BackendError for anything that is not a command."""
    name = HANDLER_NAMES.get(type(command))
    method = getattr(backend, name, None) if name is not None else None
    if method is None:
        raise BackendError(f"{type(command).__name__}: not a data-channel command")
    return cast(Callable[[Any], Any], method)


# ---------------------------------------------------------------------------- replies


@dataclass(frozen=True)
class PeerInfo:
    peer_id: int
    remote: Address | None
    keepalive_interval: int
    keepalive_timeout: int
    vpn_rx_bytes: int = 0
    vpn_tx_bytes: int = 0
    vpn_rx_packets: int = 0
    vpn_tx_packets: int = 0
    link_rx_bytes: int = 0
    link_tx_bytes: int = 0
    link_rx_packets: int = 0
    link_tx_packets: int = 0


@dataclass(frozen=True)
class KeyInfo:
    peer_id: int
    slot: KeySlot
    key_id: int
    cipher: Cipher


# ---------------------------------------------------------------------------- notifications


@dataclass(frozen=True)
class PeerDeleted:
    peer_id: int
    reason: PeerDelReason


@dataclass(frozen=True)
class KeyExhausted:
    """The key's packet-id space is used up; the control plane should renegotiate."""

    peer_id: int
    key_id: int


@dataclass(frozen=True)
class PeerFloated:
    peer_id: int
    remote: Address


@dataclass(frozen=True)
class ControlPacket:
    """A non-data packet that arrived on a handed-over socket (no TCP length prefix)."""

    peer_id: int
    packet: bytes
    remote: Address | None


@dataclass(frozen=True)
class IfaceDeleted:
    """The backend lost its interface without being asked (the userspace engine died).

    Its peers are gone with it (a ``PeerDeleted`` follows for each); the next ``NewIface``
    creates the device again. The kernel backend never sends it.
    """

    name: str
    reason: str


Notification = PeerDeleted | KeyExhausted | PeerFloated | ControlPacket | IfaceDeleted


@dataclass(slots=True)  # a server keeps one per client in each process that moves its packets
class Stats:
    """Mutable per-peer counters a backend keeps; ``PeerInfo`` is its snapshot."""

    vpn_rx_bytes: int = 0
    vpn_tx_bytes: int = 0
    vpn_rx_packets: int = 0
    vpn_tx_packets: int = 0
    link_rx_bytes: int = 0
    link_tx_bytes: int = 0
    link_rx_packets: int = 0
    link_tx_packets: int = 0
    dropped_auth: int = 0
    dropped_replay: int = 0
    dropped_other: int = 0
    extra: dict[str, int] = field(default_factory=dict)

    def merge(self, other: Stats) -> None:
        """Add ``other``'s counters to these (a peer served by several workers)."""
        for name in STAT_COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for k, v in other.extra.items():
            self.extra[k] = self.extra.get(k, 0) + v

    def peer_info(
        self, peer_id: int, remote: Address | None, keepalive_interval: int, keepalive_timeout: int
    ) -> PeerInfo:
        """The ``GetPeer`` reply for a peer with these counters."""
        counters = {n: getattr(self, n) for n in PEER_INFO_COUNTERS}
        return PeerInfo(peer_id, remote, keepalive_interval, keepalive_timeout, **counters)


# Every plain counter of Stats, and the ones PeerInfo reports (the kernel's OVPN_A_PEER_* counters).
STAT_COUNTERS: tuple[str, ...] = tuple(f.name for f in fields(Stats) if f.name != "extra")
PEER_INFO_COUNTERS: tuple[str, ...] = tuple(f.name for f in fields(PeerInfo) if f.name in STAT_COUNTERS)


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do beyond the common command set, declared once per backend class.

    Callers and the backend contract tests (tests/contract) ask these instead of testing a
    backend's type or reaching into it. Two of them promise a method the ``DataChannel``
    protocol does not require: ``stats`` a ``peer_stats(peer_id)`` returning
    :class:`Stats` (or an awaitable of it), ``hooks`` an awaitable
    ``debug(peer_id, what, **kw)`` with ``what`` ``"set_tx_pid"`` (``value``: the primary
    key's last used packet id) or ``"encrypt"`` (``payload``: a DATA_V2 packet sealed with
    the primary key).
    """

    mp: bool = False  # IfaceMode.MP: many peers, looked up by VPN IP and route
    tcp_backlog: bool = False  # NewPeer.tcp_backlog (a TCP handover in the middle of a frame)
    stats: bool = False  # peer_stats(): drop reasons and ``Stats.extra`` counters (see above)
    gso: bool = False  # batches UDP sends with GSO, counted as extra "gso_sends"/"gso_fallbacks"
    tun_offloads: bool = False  # TSO super-packets from the TUN, GRO-coalesced writes (extra counters)
    lane: bool = False  # MP: keepalive pings on a socket of their own, ahead of data
    hooks: bool = False  # debug() (see above)
    # P2P UDP: a non-data packet from an address other than the peer's is dropped in the backend
    # (counted as extra "rx_control_stranger") unless it is a client's hard reset
    # (proto.packets.STRANGER_FIRST_BYTES); the edge drops such packets anyway, so this only
    # saves work under a flood. Without it every non-data packet is passed up.
    drops_strangers: bool = False
    framing: bool = False  # NewPeer.framing other than NONE (OpenVPN's compression framing)
    passtos: bool = False  # NewPeer.passtos (the inner packet's TOS/DSCP+ECN on the outer packet)
    null_dev: bool = False  # NewIface.null (OpenVPN's `dev null`)
    fragment: bool = False  # NewPeer.fragment (OpenVPN's fragmentation, P2P over UDP)
    shaper: bool = False  # NewPeer.shaper (OpenVPN's rate limit of what is sent, P2P)


class DataChannel(Protocol):
    """What the control plane may do with a backend.

    ``request`` executes one command and returns ``PeerInfo`` for ``GetPeer``, ``KeyInfo``
    for ``GetKey`` and ``None`` otherwise; failures raise :class:`pyovpn.errors.BackendError`
    naming the command. Notifications are delivered through the callback given to
    ``subscribe`` from the event loop thread.
    """

    name: str  # "kernel" or "userspace", for logs only
    capabilities: Capabilities

    async def request(self, command: Command) -> PeerInfo | KeyInfo | None: ...

    def subscribe(self, callback: Callable[[Notification], None]) -> None: ...

    async def close(self) -> None: ...
