"""Checks every data-channel backend applies to a command before acting on it.

The kernel rejects a bad key length or slot with an extack message; the userspace backends
must refuse the same commands with the same words, so the control plane sees one behaviour
whichever backend it drives. Each check raises :class:`~pyovpn.errors.BackendError` naming
the command (``what``) and the offending value.
"""

from __future__ import annotations

import os
import socket

from pyovpn.datachannel.api import (
    SHAPER_MAX,
    SHAPER_MIN,
    Cipher,
    Framing,
    IfaceMode,
    KeySlot,
    NewIface,
    NewKey,
    NewPeer,
    SetPeer,
    Transport,
)
from pyovpn.datachannel.fragment import FragmentError, fragment_size
from pyovpn.errors import BackendError

__all__ = [
    "check_fragment",
    "check_keepalive",
    "check_new_key",
    "check_new_peer_transport",
    "check_no_fragment",
    "check_no_framing",
    "check_no_null_dev",
    "check_no_passtos",
    "check_no_shaper",
    "check_null_dev_is_p2p",
    "check_peer_socket",
    "check_set_peer_keepalive",
    "check_shaper",
    "check_slot",
    "check_socket_kind",
    "no_key_in_slot",
]

NONCE_TAIL_LEN = 8
MAX_KEY_ID = 7


def check_slot(what: str, slot: int) -> int:
    """The slot as the integer the backends index with."""
    if slot not in (KeySlot.PRIMARY, KeySlot.SECONDARY):
        raise BackendError(f"{what}: no such key slot {slot!r} (PRIMARY or SECONDARY)")
    return int(slot)


def no_key_in_slot(what: str, peer_id: int, slot: int, detail: str = "") -> BackendError:
    """The refusal for a key command on an empty slot, in the words every backend uses."""
    extra = f" ({detail})" if detail else ""
    return BackendError(f"{what}: peer {peer_id} has no key in the {KeySlot(slot).name.lower()} slot{extra}")


def check_keepalive(what: str, interval: int | None, timeout: int | None) -> None:
    if (interval or 0) < 0 or (timeout or 0) < 0:
        raise BackendError(f"{what}: keepalive interval and timeout must not be negative")


def check_set_peer_keepalive(cmd: SetPeer) -> bool:
    """Whether a ``SetPeer`` changes the keepalive (both values given, neither negative)."""
    if (cmd.keepalive_interval is None) != (cmd.keepalive_timeout is None):
        raise BackendError("SetPeer: keepalive interval and timeout must be given together")
    if cmd.keepalive_interval is None:
        return False
    check_keepalive("SetPeer", cmd.keepalive_interval, cmd.keepalive_timeout)
    return True


def check_new_peer_transport(cmd: NewPeer) -> None:
    """UDP peers name their remote; TCP peers come with a connected socket instead."""
    if cmd.transport is Transport.UDP and cmd.remote is None:
        raise BackendError("NewPeer: a UDP peer needs a remote address")
    if cmd.transport is Transport.TCP and cmd.remote is not None:
        raise BackendError("NewPeer: a TCP peer must not have a remote; the socket is connected")


def _cannot(command: str, backend: str, what: str, instead: str) -> BackendError:
    return BackendError(f"{command}: the {backend} data channel {what}; {instead}")


def check_no_framing(cmd: NewPeer) -> None:
    """For a backend without ``Capabilities.framing``: only unframed payloads."""
    if cmd.framing is not Framing.NONE:
        what = f"cannot carry OpenVPN's compression framing ({cmd.framing.value})"
        raise _cannot(
            "NewPeer",
            "kernel",
            what,
            "run this connection with --dco userspace, or remove comp-lzo/compress here and on the peer",
        )


def check_no_passtos(cmd: NewPeer, backend: str) -> None:
    """For a backend without ``Capabilities.passtos``: the outer packets keep the socket's TOS."""
    if cmd.passtos:
        what = "cannot copy each packet's TOS/DSCP to the outer packet (`passtos`)"
        raise _cannot("NewPeer", backend, what, "run this connection with --dco userspace, or remove passtos")


def check_no_fragment(cmd: NewPeer, backend: str) -> None:
    """For a backend without ``Capabilities.fragment``: whole packets only."""
    if cmd.fragment:
        instead = "run with --dco userspace, or remove fragment here and on the peer"
        raise _cannot("NewPeer", backend, "cannot apply OpenVPN's `fragment`", instead)


def check_no_shaper(cmd: NewPeer, backend: str) -> None:
    """For a backend without ``Capabilities.shaper``: packets leave as fast as they come."""
    if cmd.shaper:
        instead = "run with --dco userspace (the default userspace-engine), or remove shaper"
        raise _cannot("NewPeer", backend, "cannot hold the sending rate (`shaper`)", instead)


def check_shaper(what: str, cmd: NewPeer, *, multipoint: bool) -> None:
    """For a backend with ``Capabilities.shaper``: one peer, a rate within OpenVPN's bounds."""
    if not cmd.shaper:
        return
    if multipoint:
        raise BackendError(f"{what}: `shaper` is for one peer (P2P), as in OpenVPN")
    if not SHAPER_MIN <= cmd.shaper <= SHAPER_MAX:
        raise BackendError(
            f"{what}: shaper {cmd.shaper} is outside {SHAPER_MIN}..{SHAPER_MAX} bytes per second"
        )


def check_fragment(what: str, cmd: NewPeer, *, multipoint: bool) -> None:
    """For a backend with ``Capabilities.fragment``: one peer over UDP, a size that leaves room."""
    if not cmd.fragment:
        return
    if cmd.transport is not Transport.UDP or multipoint:
        raise BackendError(f"{what}: `fragment` is for one peer (P2P) over UDP, as in OpenVPN")
    try:
        fragment_size(cmd.fragment)
    except FragmentError as e:
        raise BackendError(f"{what}: {e}") from None


def check_null_dev_is_p2p(cmd: NewIface) -> None:
    """For a backend with ``Capabilities.null_dev``: `dev null` has one peer."""
    if cmd.null and cmd.mode is not IfaceMode.P2P:
        raise BackendError("NewIface: `dev null` has one peer (P2P); a P2MP server needs `dev tun`")


def check_no_null_dev(cmd: NewIface, backend: str) -> None:
    """For a backend without ``Capabilities.null_dev``: a real device only."""
    if cmd.null:
        instead = "run with --dco userspace, or use `dev tun`"
        raise _cannot("NewIface", backend, "needs a real device, not `dev null`", instead)


def check_socket_kind(what: str, transport: Transport, sock: socket.socket) -> None:
    """A peer's socket is an IPv4/IPv6 socket of the peer's transport and, for TCP, connected."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise BackendError(f"{what}: the socket is not an IPv4/IPv6 socket")
    want_type = socket.SOCK_DGRAM if transport is Transport.UDP else socket.SOCK_STREAM
    if sock.type != want_type:
        raise BackendError(f"{what}: the socket is not a {transport.value.upper()} socket")
    if transport is Transport.TCP:
        try:
            sock.getpeername()
        except OSError:
            raise BackendError(f"{what}: the TCP socket is not connected") from None


def check_peer_socket(cmd: NewPeer) -> socket.socket:
    """Our own descriptor of the peer's socket, once it is an IPv4/IPv6 socket of the peer's
    transport and, for TCP, connected; on refusal the descriptor is closed again."""
    what = "NewPeer"
    try:
        sock = socket.socket(fileno=os.dup(cmd.socket_fd))
    except OSError as e:
        raise BackendError(f"{what}: socket fd {cmd.socket_fd} is not usable: {e.strerror or e}") from None
    try:
        check_socket_kind(what, cmd.transport, sock)
    except BaseException:
        sock.close()
        raise
    return sock


def check_new_key(cmd: NewKey) -> tuple[int, Cipher]:
    """Slot, key id, cipher and both directions' key material; returns (slot, cipher)."""
    what = "NewKey"
    slot = check_slot(what, cmd.slot)
    if not 0 <= cmd.key_id <= MAX_KEY_ID:
        raise BackendError(f"{what}: key id {cmd.key_id} out of range 0..{MAX_KEY_ID}")
    try:
        cipher = Cipher(cmd.cipher)
    except ValueError:
        raise BackendError(f"{what}: unsupported cipher {cmd.cipher!r}") from None
    for name, direction in (("encrypt", cmd.encrypt), ("decrypt", cmd.decrypt)):
        if len(direction.cipher_key) != cipher.key_len:
            raise BackendError(
                f"{what}: bad {name} key length {len(direction.cipher_key)} for {cipher.value} "
                f"(needs {cipher.key_len})"
            )
        if len(direction.nonce_tail) != NONCE_TAIL_LEN:
            raise BackendError(
                f"{what}: {name} nonce tail must be {NONCE_TAIL_LEN} bytes, got {len(direction.nonce_tail)}"
            )
    return slot, cipher
