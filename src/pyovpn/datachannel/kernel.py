"""The kernel data channel: drives Linux's ``ovpn`` DCO driver (mainline since 6.16).

It implements :class:`pyovpn.datachannel.api.DataChannel` with the same observable
behaviour as :class:`~pyovpn.datachannel.userspace.UserspaceDataChannel`, but the
packets never leave the kernel: ``NewIface`` creates an ``ovpn`` link over rtnetlink,
every other command is one request of the generic-netlink family ``ovpn``
(OPENVPN-PROTOCOL.md §7), and the kernel's ``peers`` multicast notifications become
``PeerDeleted`` / ``KeyExhausted`` / ``PeerFloated``.

After ``NewPeer`` the kernel consumes DATA_V2 on the handed-over socket and passes every
other packet up the socket, so this module keeps reading it and delivers those as
``ControlPacket``; ``SendControl`` is a plain send on the same socket (for TCP exactly one
whole length-prefixed frame per ``send()``, which is what the kernel's TCP hook demands).

Netlink plumbing, chosen to work with pyroute2 0.7.x as well as 0.9.x:

* messages are pyroute2 classes (``ovpnmsg``, a ``genlmsg`` with nested ``nla`` classes,
  in the style of pyroute2's WireGuard module), encoded and decoded by pyroute2;
* the generic-netlink socket of the backend is a plain non-blocking ``AF_NETLINK`` socket
  on the event loop (``add_reader``), so no thread and no private pyroute2 loop is
  involved. It carries both the requests (each with its own sequence number, each
  waiting for its ACK or error, with the extended ACK decoded into the message) and the
  ``peers`` notifications. The kernel queues a notification caused by a request before
  that request's ACK, so e.g. the ``PeerDeleted(USERSPACE)`` of a ``DelPeer`` has been
  dispatched by the time the request returns;
* rtnetlink (link add/set/delete) uses pyroute2's ``IPRoute`` in a worker thread,
  because pyroute2 0.9's synchronous sockets refuse to run in a thread whose asyncio
  loop is running; ``ovpn`` is registered as a link kind so ``IFLA_INFO_DATA`` is
  encoded by pyroute2 as well;
* :class:`OvpnNetlink` is the synchronous pyroute2 socket bound to the family, for
  probes (:mod:`pyovpn.datachannel.select`) and scripts run outside an event loop.

Differences from the userspace backend: the kernel's replay window (2048 packets) is
fixed, statistics come from the kernel, and ``tcp_backlog`` must be empty (the kernel's
stream parser needs the handover at a frame boundary). One backend drives one interface.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import ipaddress
import logging
import os
import secrets
import socket
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pyroute2 import IPRoute, NetlinkError
from pyroute2.netlink import (
    CTRL_CMD_GETFAMILY,
    GENL_ID_CTRL,
    NLA_F_NESTED,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    ctrlmsg,
    genlmsg,
    nla,
    nla_base_string,
    nlmsg,
)
from pyroute2.netlink.generic import GenericNetlinkSocket
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from pyovpn.datachannel.api import (
    Address,
    Capabilities,
    Cipher,
    Command,
    ControlPacket,
    DelIface,
    DelKey,
    DelPeer,
    GetKey,
    GetPeer,
    IfaceMode,
    KeyExhausted,
    KeyInfo,
    KeySlot,
    NewIface,
    NewKey,
    NewPeer,
    Notification,
    PeerDeleted,
    PeerDelReason,
    PeerFloated,
    PeerInfo,
    SendControl,
    SetPeer,
    SwapKeys,
    Transport,
)
from pyovpn.datachannel.api import normalize_address as _normalize
from pyovpn.datachannel.validate import (
    check_keepalive,
    check_new_key,
    check_new_peer_transport,
    check_set_peer_keepalive,
    check_slot,
)
from pyovpn.errors import BackendError
from pyovpn.net.blocking import call_outside_loop
from pyovpn.net.sockets import TCP_DISCONNECT_ERRNOS, TRANSIENT_SEND_ERRNOS, scope_index, socket_key
from pyovpn.proto.packets import OPCODE_DATA_V1, OPCODE_DATA_V2, UNDEF_PEER_ID

__all__ = [
    "OVPN_FAMILY_NAME",
    "KernelDataChannel",
    "OvpnCipherAlg",
    "OvpnCmd",
    "OvpnNetlink",
    "cleanup_stale_iface",
    "ovpnmsg",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# ---------------------------------------------------------------------------- uapi (linux/ovpn.h)

OVPN_FAMILY_NAME = "ovpn"
OVPN_FAMILY_VERSION = 1
OVPN_MCGRP_PEERS = "peers"
OVPN_LINK_KIND = "ovpn"


class OvpnCmd:
    """``OVPN_CMD_*`` values (names are used in error messages)."""

    PEER_NEW = 1
    PEER_SET = 2
    PEER_GET = 3
    PEER_DEL = 4
    PEER_DEL_NTF = 5
    KEY_NEW = 6
    KEY_GET = 7
    KEY_SWAP = 8
    KEY_SWAP_NTF = 9
    KEY_DEL = 10
    PEER_FLOAT_NTF = 11

    @classmethod
    def name(cls, value: int) -> str:
        for k, v in vars(cls).items():
            if k.isupper() and v == value:
                return k
        return f"command {value}"


class OvpnCipherAlg:
    NONE = 0
    AES_GCM = 1  # AES-128/192/256 chosen by the key length
    CHACHA20_POLY1305 = 2


_CIPHER_ALG = {
    Cipher.AES_128_GCM: OvpnCipherAlg.AES_GCM,
    Cipher.AES_256_GCM: OvpnCipherAlg.AES_GCM,
    Cipher.CHACHA20_POLY1305: OvpnCipherAlg.CHACHA20_POLY1305,
}

# netlink socket options and flags (linux/netlink.h); not all pyroute2 versions export them
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
NLM_F_CAPPED = 0x100
NLM_F_ACK_TLVS = 0x200
NLA_F_NET_BYTEORDER = 1 << 14
NETLINK_GENERIC = 16

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NL_RX_BUF = 1 << 18  # dumps come in skbs of up to 32 KiB; keep margin
_NL_RX_BATCH = 256
_NL_SOCK_BUF = 1 << 20  # as OpenVPN: notifications must not be dropped
_NL_TIMEOUT = 10.0

_FRAME_LEN = struct.Struct(">H")
_TCP_RX_BUF = 2 + 0xFFFF  # the kernel hands up one whole frame (prefix included) per recv()
_RX_BATCH = 256
_TCP_RETRY_MIN = 0.001
_TCP_RETRY_MAX = 0.05
_TCP_FLUSH_ON_DEL = 0.25  # seconds DelPeer waits for queued control frames (e.g. EXIT) to leave

_NEED_CAP = "needs CAP_NET_ADMIN: run as root (or grant the capability)"
_NO_DRIVER = (
    "the kernel has no 'ovpn' driver: it needs Linux >= 6.16 with the ovpn module "
    "(modprobe ovpn), or use --dco userspace"
)


# ---------------------------------------------------------------------------- pyroute2 message classes


class _uint(nla_base_string):
    """Netlink ``NLA_UINT``: a native-endian unsigned integer of 4 or 8 bytes (decided by
    nla_len). Also used for KEY_ID in KEY_SWAP_NTF, which the kernel sends as u16."""

    __slots__ = ()

    def encode(self) -> None:
        value = int(self.value)
        self["value"] = struct.pack("=I" if value <= 0xFFFFFFFF else "=Q", value)
        nla_base_string.encode(self)

    def decode(self) -> None:
        nla_base_string.decode(self)
        raw = self["value"]
        self.value = int.from_bytes(raw[:8], sys.byteorder) if raw else 0


class ovpnmsg(genlmsg):
    """A message of the ``ovpn`` generic-netlink family (uapi ``linux/ovpn.h``)."""

    prefix = "OVPN_A_"
    nla_map = (
        ("OVPN_A_UNSPEC", "none"),
        ("OVPN_A_IFINDEX", "uint32"),
        ("OVPN_A_PEER", "peer"),
        ("OVPN_A_KEYCONF", "keyconf"),
    )

    class peer(nla):
        prefix = "OVPN_A_PEER_"
        nla_flags = NLA_F_NESTED
        nla_map = (
            ("OVPN_A_PEER_UNSPEC", "none"),
            ("OVPN_A_PEER_ID", "uint32"),
            ("OVPN_A_PEER_REMOTE_IPV4", "ip4addr"),
            ("OVPN_A_PEER_REMOTE_IPV6", "ip6addr"),
            ("OVPN_A_PEER_REMOTE_IPV6_SCOPE_ID", "uint32"),
            ("OVPN_A_PEER_REMOTE_PORT", "be16"),
            ("OVPN_A_PEER_SOCKET", "uint32"),
            ("OVPN_A_PEER_SOCKET_NETNSID", "int32"),
            ("OVPN_A_PEER_VPN_IPV4", "ip4addr"),
            ("OVPN_A_PEER_VPN_IPV6", "ip6addr"),
            ("OVPN_A_PEER_LOCAL_IPV4", "ip4addr"),
            ("OVPN_A_PEER_LOCAL_IPV6", "ip6addr"),
            ("OVPN_A_PEER_LOCAL_PORT", "be16"),
            ("OVPN_A_PEER_KEEPALIVE_INTERVAL", "uint32"),
            ("OVPN_A_PEER_KEEPALIVE_TIMEOUT", "uint32"),
            ("OVPN_A_PEER_DEL_REASON", "uint32"),
            ("OVPN_A_PEER_VPN_RX_BYTES", "uint"),
            ("OVPN_A_PEER_VPN_TX_BYTES", "uint"),
            ("OVPN_A_PEER_VPN_RX_PACKETS", "uint"),
            ("OVPN_A_PEER_VPN_TX_PACKETS", "uint"),
            ("OVPN_A_PEER_LINK_RX_BYTES", "uint"),
            ("OVPN_A_PEER_LINK_TX_BYTES", "uint"),
            ("OVPN_A_PEER_LINK_RX_PACKETS", "uint"),
            ("OVPN_A_PEER_LINK_TX_PACKETS", "uint"),
            ("OVPN_A_PEER_TX_ID", "uint32"),
        )
        uint = _uint

    class keyconf(nla):
        prefix = "OVPN_A_KEYCONF_"
        nla_flags = NLA_F_NESTED
        nla_map = (
            ("OVPN_A_KEYCONF_UNSPEC", "none"),
            ("OVPN_A_KEYCONF_PEER_ID", "uint32"),
            ("OVPN_A_KEYCONF_SLOT", "uint32"),
            ("OVPN_A_KEYCONF_KEY_ID", "uint"),  # u32 in requests, u16 in KEY_SWAP_NTF
            ("OVPN_A_KEYCONF_CIPHER_ALG", "uint32"),
            ("OVPN_A_KEYCONF_ENCRYPT_DIR", "keydir"),
            ("OVPN_A_KEYCONF_DECRYPT_DIR", "keydir"),
        )
        uint = _uint

        class keydir(nla):
            prefix = "OVPN_A_KEYDIR_"
            nla_flags = NLA_F_NESTED
            nla_map = (
                ("OVPN_A_KEYDIR_UNSPEC", "none"),
                ("OVPN_A_KEYDIR_CIPHER_KEY", "cdata"),
                ("OVPN_A_KEYDIR_NONCE_TAIL", "cdata"),
            )


class _extack(nlmsg):
    """An NLMSG_ERROR with its request echo cut out: the error and the extended-ACK TLVs."""

    fields = (("error", "i"),)
    nla_map = (
        ("NLMSGERR_ATTR_UNUSED", "none"),
        ("NLMSGERR_ATTR_MSG", "asciiz"),
        ("NLMSGERR_ATTR_OFFS", "uint32"),
        ("NLMSGERR_ATTR_COOKIE", "hex"),
        ("NLMSGERR_ATTR_POLICY", "hex"),
        ("NLMSGERR_ATTR_MISS_TYPE", "uint32"),
        ("NLMSGERR_ATTR_MISS_NEST", "uint32"),
    )


class ifla_ovpn_data(nla):
    """``IFLA_INFO_DATA`` of an ``ovpn`` link (pyroute2 does not know the kind)."""

    prefix = "IFLA_OVPN_"
    nla_flags = NLA_F_NESTED
    nla_map = (
        ("IFLA_OVPN_UNSPEC", "none"),
        ("IFLA_OVPN_MODE", "uint8"),  # must be a u8 (OpenVPN notes wider ints break on big-endian)
    )


ifinfmsg.ifinfo.register_link_kind(module={OVPN_LINK_KIND: ifla_ovpn_data})


class OvpnNetlink(GenericNetlinkSocket):
    """pyroute2's synchronous generic-netlink socket bound to the ``ovpn`` family.

    Like pyroute2's ``WireGuard`` class. Use it from a thread without a running asyncio
    loop (pyroute2 0.9 refuses otherwise); the backend itself does not use it.
    """

    def bind(self, proto: str = OVPN_FAMILY_NAME, msg_class: type = ovpnmsg, *argv: Any, **kwarg: Any) -> Any:
        return super().bind(proto, msg_class, *argv, **kwarg)

    def peers(self, ifindex: int) -> list[ovpnmsg]:
        """All peers of an ``ovpn`` interface (OVPN_CMD_PEER_GET dump)."""
        msg = ovpnmsg()
        msg["cmd"] = OvpnCmd.PEER_GET
        msg["version"] = OVPN_FAMILY_VERSION
        msg["attrs"].append(["OVPN_A_IFINDEX", ifindex])
        return list(self.nlm_request(msg, msg_type=self.prid, msg_flags=NLM_F_REQUEST | NLM_F_DUMP))


# ---------------------------------------------------------------------------- generic netlink channel


class KernelError(Exception):
    """A netlink request failed: errno plus what the kernel's extended ACK said."""

    def __init__(self, code: int, message: str | None, attribute: str | None) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.attribute = attribute

    def describe(self) -> str:
        name = errno.errorcode.get(self.code, str(self.code))
        text = self.message or os.strerror(self.code)
        extra = f", attribute {self.attribute}" if self.attribute else ""
        return f"{text} ({name}{extra})"


@dataclass
class _Pending:
    future: asyncio.Future[list[Any]]
    request: bytes
    dump: bool
    replies: list[Any] = field(default_factory=list)


def _nested_class(cls: type, attr_type: int) -> type | None:
    nla_map = getattr(cls, "nla_map", ())
    if not isinstance(nla_map, tuple) or attr_type >= len(nla_map):
        return None
    sub = getattr(cls, nla_map[attr_type][1], None)
    if isinstance(sub, type) and issubclass(sub, nla) and sub is not cls and getattr(sub, "nla_map", ()):
        return sub
    return None


def _attr_name(cls: type, attr_type: int) -> str:
    nla_map = getattr(cls, "nla_map", ())
    if isinstance(nla_map, tuple) and attr_type < len(nla_map):
        return str(nla_map[attr_type][0])
    return f"attribute type {attr_type}"


def _walk(data: bytes, start: int, end: int, cls: type, target: int) -> tuple[list[str], type | None]:
    """The attribute path to the attribute starting at byte ``target`` of an encoded message."""
    pos = start
    while pos + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, pos)
        if length < 4:
            break
        kind &= ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER)
        if pos == target:
            return [_attr_name(cls, kind)], _nested_class(cls, kind)
        if pos < target < pos + length:
            sub = _nested_class(cls, kind)
            if sub is None:
                return [_attr_name(cls, kind)], None
            path, inner = _walk(data, pos + 4, pos + length, sub, target)
            return [_attr_name(cls, kind), *path], inner
        pos += (length + 3) & ~3
    return [], None


def _bad_attribute(
    request: bytes, cls: type, offs: int | None, miss_type: int | None, miss_nest: int | None
) -> str | None:
    """Name the attribute an extended ACK points at (by offset) or says is missing."""
    body = _NLMSGHDR.size + 4  # nlmsghdr + genlmsghdr
    if offs is not None and body <= offs < len(request):
        path, _ = _walk(request, body, len(request), cls, offs)
        if path:
            return " > ".join(path)
    if miss_type is not None:
        nest_cls: type | None = cls
        prefix: list[str] = []
        if miss_nest is not None and body <= miss_nest < len(request):
            prefix, nest_cls = _walk(request, body, len(request), cls, miss_nest)
        name = _attr_name(nest_cls, miss_type) if nest_cls is not None else f"attribute type {miss_type}"
        return " > ".join([*prefix, name]) + " (missing)"
    return None


class _GenlChannel:
    """One non-blocking NETLINK_GENERIC socket on the event loop.

    Requests get their own sequence numbers and each waits for its ACK (or error, or
    NLMSG_DONE for dumps); messages with sequence number 0 of the family are the
    multicast notifications and go to ``on_notification``.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_notification: Callable[[ovpnmsg], None],
        on_overrun: Callable[[], None],
    ) -> None:
        self._loop = loop
        self._on_notification = on_notification
        self._on_overrun = on_overrun
        self._pending: dict[int, _Pending] = {}
        self._seq = secrets.randbelow(1 << 30) + 1
        self.sock: socket.socket | None = None
        self.family_id = 0
        self.version = OVPN_FAMILY_VERSION
        self.groups: dict[str, int] = {}

    async def open(self) -> None:
        sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, NETLINK_GENERIC
        )
        try:
            for opt, value in ((socket.SO_RCVBUF, _NL_SOCK_BUF), (socket.SO_SNDBUF, _NL_SOCK_BUF)):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, opt, value)
            for opt in (NETLINK_EXT_ACK, NETLINK_CAP_ACK):
                with contextlib.suppress(OSError):  # kernels without them still work, less verbosely
                    sock.setsockopt(SOL_NETLINK, opt, 1)
            sock.bind((0, 0))
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self._loop.add_reader(sock.fileno(), self.drain)
        msg = ctrlmsg()
        msg["cmd"] = CTRL_CMD_GETFAMILY
        msg["version"] = 1
        msg["attrs"].append(["CTRL_ATTR_FAMILY_NAME", OVPN_FAMILY_NAME])
        (family,) = [m for m in await self.request(msg, GENL_ID_CTRL) if isinstance(m, ctrlmsg)]
        self.family_id = family.get_attr("CTRL_ATTR_FAMILY_ID")
        self.version = family.get_attr("CTRL_ATTR_VERSION") or OVPN_FAMILY_VERSION
        self.groups = {
            g.get_attr("CTRL_ATTR_MCAST_GRP_NAME"): g.get_attr("CTRL_ATTR_MCAST_GRP_ID")
            for g in family.get_attr("CTRL_ATTR_MCAST_GROUPS", [])
        }

    def join(self, group: str) -> None:
        assert self.sock is not None
        self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, self.groups[group])

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(sock.fileno())
            sock.close()
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(
                    KernelError(errno.ESHUTDOWN, "the netlink socket was closed", None)
                )
        self._pending.clear()

    async def request(self, msg: nlmsg, msg_type: int | None = None, *, dump: bool = False) -> list[Any]:
        """Send one request and wait for its replies and its ACK; raises :class:`KernelError`."""
        if self.sock is None:
            raise KernelError(errno.ESHUTDOWN, "the netlink socket is closed", None)
        self._seq = self._seq + 1 if self._seq < 0x7FFFFFFF else 1
        seq = self._seq
        hdr = msg["header"]
        hdr["type"] = self.family_id if msg_type is None else msg_type
        hdr["flags"] = NLM_F_REQUEST | (NLM_F_DUMP if dump else NLM_F_ACK)
        hdr["sequence_number"] = seq
        hdr["pid"] = 0
        msg.encode()
        data = bytes(msg.data[: msg["header"]["length"]])
        pending = _Pending(self._loop.create_future(), data, dump)
        self._pending[seq] = pending
        try:
            try:
                self.sock.send(data)
            except OSError as e:
                raise KernelError(
                    e.errno or errno.EIO, f"sending the request failed: {e.strerror}", None
                ) from None
            # the kernel runs a genl 'do' request inside send(): answer (and any notification
            # it caused) are queued already, so collect them now, deterministically
            self.drain()
            if pending.future.done():
                # no suspension: the caller resumes before notifications are dispatched,
                # exactly as with the userspace backend
                return pending.future.result()
            return await asyncio.wait_for(asyncio.shield(pending.future), _NL_TIMEOUT)
        except TimeoutError:
            raise KernelError(
                errno.ETIMEDOUT, f"no answer from the kernel in {_NL_TIMEOUT:.0f} s", None
            ) from None
        finally:
            self._pending.pop(seq, None)

    def drain(self) -> None:
        """Read and dispatch whatever is queued on the socket (also the loop's reader)."""
        for _ in range(_NL_RX_BATCH):
            sock = self.sock
            if sock is None:
                return
            try:
                data = sock.recv(_NL_RX_BUF)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    log.warning("kernel data channel: netlink receive queue overrun; notifications were lost")
                    self._on_overrun()
                    continue
                log.warning("kernel data channel: netlink receive failed: %s", e)
                return
            self._dispatch(data)

    def _dispatch(self, data: bytes) -> None:
        off = 0
        end = len(data)
        while off + _NLMSGHDR.size <= end:
            length, mtype, flags, seq, _pid = _NLMSGHDR.unpack_from(data, off)
            if length < _NLMSGHDR.size or off + length > end:
                break
            chunk = data[off : off + length]
            off += (length + 3) & ~3
            pending = self._pending.get(seq) if seq else None
            if pending is None:
                if seq == 0 and mtype == self.family_id and self.family_id:
                    try:
                        msg = ovpnmsg(chunk)
                        msg.decode()
                    except Exception:
                        log.warning("kernel data channel: undecodable ovpn notification", exc_info=True)
                        continue
                    self._on_notification(msg)
                continue  # an answer nobody waits for any more (timed out)
            if pending.future.done():
                continue
            if mtype == NLMSG_ERROR:
                code = -struct.unpack_from("=i", chunk, 16)[0] if length >= 20 else errno.EIO
                if code == 0:
                    pending.future.set_result(pending.replies)
                else:
                    pending.future.set_exception(self._error(chunk, flags, code, pending.request))
            elif mtype == NLMSG_DONE:
                code = -struct.unpack_from("=i", chunk, 16)[0] if length >= 20 else 0
                if code > 0:
                    pending.future.set_exception(self._error(chunk, flags, code, pending.request))
                else:
                    pending.future.set_result(pending.replies)
            elif mtype == GENL_ID_CTRL or (mtype == self.family_id and self.family_id):
                msg_class = ctrlmsg if mtype == GENL_ID_CTRL else ovpnmsg
                try:
                    msg = msg_class(chunk)
                    msg.decode()
                except Exception as e:
                    pending.future.set_exception(
                        KernelError(errno.EBADMSG, f"undecodable answer: {e!r}", None)
                    )
                    continue
                pending.replies.append(msg)
            # NLMSG_NOOP / NLMSG_OVERRUN: nothing to do

    @staticmethod
    def _error(chunk: bytes, flags: int, code: int, request: bytes) -> KernelError:
        message = attribute = None
        if flags & NLM_F_ACK_TLVS and len(chunk) >= 20 + _NLMSGHDR.size:
            if flags & NLM_F_CAPPED:
                tlv = 20 + _NLMSGHDR.size
            else:
                tlv = 20 + ((struct.unpack_from("=I", chunk, 20)[0] + 3) & ~3)
            tlvs = chunk[tlv:]
            ext = _extack(_NLMSGHDR.pack(20 + len(tlvs), NLMSG_ERROR, 0, 0, 0) + chunk[16:20] + tlvs)
            try:
                ext.decode()
            except Exception:
                log.debug("kernel data channel: undecodable extended ACK", exc_info=True)
            else:
                message = ext.get_attr("NLMSGERR_ATTR_MSG")
                msg_type = struct.unpack_from("=H", request, 4)[0]
                cls: type = ctrlmsg if msg_type == GENL_ID_CTRL else ovpnmsg
                attribute = _bad_attribute(
                    request,
                    cls,
                    ext.get_attr("NLMSGERR_ATTR_OFFS"),
                    ext.get_attr("NLMSGERR_ATTR_MISS_TYPE"),
                    ext.get_attr("NLMSGERR_ATTR_MISS_NEST"),
                )
        return KernelError(code, message, attribute)


# ---------------------------------------------------------------------------- rtnetlink helpers (sync)


def _link_kind(ipr: IPRoute, index: int) -> str | None:
    for msg in ipr.get_links(index):
        info = msg.get_attr("IFLA_LINKINFO")
        return info.get_attr("IFLA_INFO_KIND") if info is not None else None
    return None


def _link_mode(ipr: IPRoute, index: int) -> int | None:
    """IFLA_OVPN_MODE of an ovpn link as the kernel reports it (None if not reported)."""
    for msg in ipr.get_links(index):
        info = msg.get_attr("IFLA_LINKINFO")
        data = info.get_attr("IFLA_INFO_DATA") if info is not None else None
        if data is not None and hasattr(data, "get_attr"):
            return data.get_attr("IFLA_OVPN_MODE")
    return None


def _rtnl_explain(what: str, e: NetlinkError) -> BackendError:
    code = e.code
    if code in (errno.EPERM, errno.EACCES):
        return BackendError(f"{what}: {_NEED_CAP}")
    if code == errno.EOPNOTSUPP:
        return BackendError(f"{what}: {_NO_DRIVER}")
    text = e.args[1] if len(e.args) > 1 and e.args[1] else os.strerror(code)
    return BackendError(f"{what}: {text} ({errno.errorcode.get(code, code)})")


def _create_link(name: str, mode: IfaceMode, mtu: int) -> tuple[int, str]:
    what = "NewIface"
    pattern = "tun%d" if name in ("", "tun") else name
    if len(pattern.replace("%d", "99").encode()) >= 16:
        raise BackendError(f"{what}: interface name {pattern!r} is too long (at most 15 bytes)")
    try:
        with IPRoute() as ipr:
            candidates = (
                (pattern.replace("%d", str(i), 1) for i in range(4096))
                if "%d" in pattern
                else iter([pattern])
            )
            ifname = None
            for cand in candidates:
                try:
                    ipr.link("add", ifname=cand, kind=OVPN_LINK_KIND, IFLA_OVPN_MODE=int(mode))
                except NetlinkError as e:
                    if e.code == errno.EEXIST and "%d" in pattern:
                        continue
                    if e.code == errno.EEXIST:
                        index = ipr.link_lookup(ifname=cand)
                        kind = _link_kind(ipr, index[0]) if index else None
                        if kind == OVPN_LINK_KIND:
                            raise BackendError(
                                f"{what}: an ovpn interface named {cand!r} already exists (another pyovpn/"
                                f"openvpn, or left by a killed run: remove it with 'ip link del {cand}' or "
                                "pyovpn.datachannel.kernel.cleanup_stale_iface)"
                            ) from None
                        raise BackendError(
                            f"{what}: an interface named {cand!r} already exists and is not an ovpn device "
                            f"(kind {kind or 'unknown'})"
                        ) from None
                    raise _rtnl_explain(f"{what}: create ovpn interface {cand!r}", e) from None
                ifname = cand
                break
            if ifname is None:
                raise BackendError(f"{what}: no free interface name for pattern {pattern!r}")
            index = int(ipr.link_lookup(ifname=ifname)[0])
            try:
                ipr.link("set", index=index, mtu=mtu, state="up")
            except NetlinkError as e:
                with contextlib.suppress(NetlinkError):
                    ipr.link("del", index=index)
                if e.code in (errno.EINVAL, errno.ERANGE):
                    raise BackendError(f"{what}: MTU {mtu} is not accepted by the ovpn device") from None
                raise _rtnl_explain(f"{what}: configure {ifname}", e) from None
            return index, ifname
    except PermissionError:
        raise BackendError(f"{what}: {_NEED_CAP}") from None
    except OSError as e:
        raise BackendError(f"{what}: {e.strerror or e}") from None


def _delete_link(what: str, index: int) -> bool:
    """Delete a link by index; False if it was already gone."""
    try:
        with IPRoute() as ipr:
            ipr.link("del", index=index)
        return True
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return False
        raise _rtnl_explain(what, e) from None
    except PermissionError:
        raise BackendError(f"{what}: {_NEED_CAP}") from None


def cleanup_stale_iface(name: str, *, force: bool = False) -> bool:
    """Delete the ``ovpn`` interface ``name`` left behind by a killed previous run.

    Only a link whose kind is ``ovpn`` is ever deleted; any other link of that name is
    left alone. A link that still has peers belongs to a live process (the kernel drops a
    peer when the last descriptor of its socket is closed, e.g. when its process dies),
    so it is kept unless ``force``. Returns True if a link was deleted. Safe to call from
    a thread that runs an asyncio loop (the netlink work then happens in a helper thread).
    """

    def work() -> bool:
        try:
            with IPRoute() as ipr:
                found = ipr.link_lookup(ifname=name)
                if not found:
                    return False
                index = int(found[0])
                kind = _link_kind(ipr, index)
                if kind != OVPN_LINK_KIND:
                    log.info("not removing %s: it is a %s interface, not ovpn", name, kind or "unknown")
                    return False
                if not force:
                    peers: list[ovpnmsg] = []
                    with contextlib.suppress(Exception), OvpnNetlink() as genl:
                        genl.bind()
                        peers = genl.peers(index)
                    if peers:
                        log.warning(
                            "not removing ovpn interface %s: it has %d peer(s), so it is in use",
                            name,
                            len(peers),
                        )
                        return False
                ipr.link("del", index=index)
                log.warning(
                    "removed stale ovpn interface %s (ifindex %d) left by a previous run", name, index
                )
                return True
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return False
            raise _rtnl_explain(f"remove stale interface {name}", e) from None
        except PermissionError:
            raise BackendError(f"remove stale interface {name}: {_NEED_CAP}") from None

    return call_outside_loop(work)


# ---------------------------------------------------------------------------- address helpers


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(text)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _nl_remote(peer: Any) -> Address | None:
    """The remote endpoint in a decoded OVPN_A_PEER nest."""
    port = peer.get_attr("OVPN_A_PEER_REMOTE_PORT")
    ip4 = peer.get_attr("OVPN_A_PEER_REMOTE_IPV4")
    if ip4 is not None and port is not None:
        return (ip4, port)
    ip6 = peer.get_attr("OVPN_A_PEER_REMOTE_IPV6")
    if ip6 is not None and port is not None:
        ip = _ip(ip6)
        text = str(ip)
        scope = peer.get_attr("OVPN_A_PEER_REMOTE_IPV6_SCOPE_ID")
        if scope and ip.version == 6:
            text = f"{text}%{scope}"
        return (text, port)
    return None


# ---------------------------------------------------------------------------- backend state


@dataclass
class _Iface:
    name: str
    requested_name: str
    index: int
    mode: IfaceMode
    mtu: int


class _Reader:
    """Our duplicate of one handed-over socket and the peers it carries (MP UDP shares one)."""

    __slots__ = ("fd", "key", "peers", "sock", "transport")

    def __init__(self, key: tuple[int, int], sock: socket.socket, transport: Transport) -> None:
        self.key = key
        self.sock = sock
        self.fd = sock.fileno()
        self.transport = transport
        self.peers: set[int] = set()


class _Peer:
    __slots__ = (
        "peer_id",
        "reader",
        "remote",
        "send_addr",
        "tcp_delay",
        "tcp_out",
        "tcp_retry",
        "transport",
    )

    def __init__(self, peer_id: int, transport: Transport, reader: _Reader) -> None:
        self.peer_id = peer_id
        self.transport = transport
        self.reader = reader
        self.remote: Address | None = None
        self.send_addr: tuple[Any, ...] | None = None
        self.tcp_out: collections.deque[bytes] = collections.deque()
        self.tcp_retry: asyncio.TimerHandle | None = None
        self.tcp_delay = _TCP_RETRY_MIN


class KernelDataChannel:
    """The :class:`~pyovpn.datachannel.api.DataChannel` backend on the kernel ``ovpn`` driver."""

    name = "kernel"
    capabilities = Capabilities(mp=True)

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._chan: _GenlChannel | None = None
        self._iface: _Iface | None = None
        self._peers: dict[int, _Peer] = {}
        self._readers: dict[tuple[int, int], _Reader] = {}
        self._keys: dict[tuple[int, int], tuple[int, Cipher]] = {}  # (peer, slot) -> (key_id, cipher)
        self._deferred_del: set[int] = set()  # peers we dropped locally but not yet in the kernel
        self._subscribers: list[Callable[[Notification], None]] = []
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    # ------------------------------------------------------------------ public API

    @property
    def ifname(self) -> str | None:
        """The ovpn interface's actual name."""
        return self._iface.name if self._iface else None

    @property
    def ifindex(self) -> int | None:
        return self._iface.index if self._iface else None

    def subscribe(self, callback: Callable[[Notification], None]) -> None:
        self._subscribers.append(callback)

    async def request(self, command: Command) -> PeerInfo | KeyInfo | None:
        what = type(command).__name__
        if self._closed:
            raise BackendError(f"{what}: the kernel backend is closed")
        self._loop = asyncio.get_running_loop()
        handler = self._handlers.get(type(command))
        if handler is None:
            raise BackendError(f"{what}: not a data-channel command")
        if isinstance(command, SendControl):
            # no netlink involved: never queue a control packet behind a slow request
            self._send_control(command)
            return None
        async with self._lock:
            if self._closed:
                raise BackendError(f"{what}: the kernel backend is closed")
            await self._flush_deferred_deletes()
            return await handler(self, command)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for peer in list(self._peers.values()):
            self._forget(peer)  # no notifications, as the userspace backend
        self._keys.clear()
        if self._chan is not None:
            self._chan.close()
            self._chan = None
        iface, self._iface = self._iface, None
        if iface is not None:
            # like closing a TUN: the interface (and with it every peer) goes away
            with contextlib.suppress(BackendError, OSError):
                await asyncio.to_thread(_delete_link, "close", iface.index)
            log.info("kernel data channel: deleted %s", iface.name)

    # ------------------------------------------------------------------ commands

    async def _new_iface(self, cmd: NewIface) -> None:
        what = "NewIface"
        if self._iface is not None:
            raise BackendError(
                f"{what}: this backend already drives {self._iface.name}; use one backend per interface"
            )
        try:
            mode = IfaceMode(cmd.mode)
        except ValueError:
            raise BackendError(f"{what}: unknown interface mode {cmd.mode!r} (P2P or MP)") from None
        if not 68 <= cmd.mtu <= 65535:
            raise BackendError(f"{what}: MTU {cmd.mtu} out of range 68..65535")
        await self._ensure_channel(what)
        index, ifname = await asyncio.to_thread(_create_link, cmd.name, mode, cmd.mtu)
        if self._closed:
            with contextlib.suppress(BackendError):
                await asyncio.to_thread(_delete_link, what, index)
            raise BackendError(f"{what}: the kernel backend is closed")
        self._iface = _Iface(ifname, cmd.name, index, mode, cmd.mtu)
        log.info("kernel data channel: created %s (ovpn, %s, mtu %d)", ifname, mode.name, cmd.mtu)

    async def _del_iface(self, cmd: DelIface) -> None:
        what = "DelIface"
        iface = self._iface
        if iface is None or cmd.name not in (iface.name, iface.requested_name):
            raise BackendError(f"{what}: no interface named {cmd.name!r}")
        await asyncio.to_thread(_delete_link, what, iface.index)
        # the kernel sent PEER_DEL_NTF(TEARDOWN) for each peer before it answered: dispatch them
        if self._chan is not None:
            self._chan.drain()
        for peer in list(self._peers.values()):
            self._peer_gone(peer.peer_id, PeerDelReason.TEARDOWN)
        self._iface = None
        log.info("kernel data channel: deleted %s", iface.name)

    async def _new_peer(self, cmd: NewPeer) -> None:
        what = "NewPeer"
        iface = self._require_iface(what)
        tx_id = cmd.peer_id if cmd.tx_peer_id is None else cmd.tx_peer_id
        if iface.mode is IfaceMode.P2P and (cmd.vpn_ipv4 is not None or cmd.vpn_ipv6 is not None):
            raise BackendError(f"{what}: VPN IPs are not allowed in P2P mode (the kernel rejects them too)")
        check_keepalive(what, cmd.keepalive_interval, cmd.keepalive_timeout)
        check_new_peer_transport(cmd)
        if cmd.transport is Transport.TCP and cmd.local_ip is not None:
            raise BackendError(f"{what}: local_ip applies to UDP peers only")
        if cmd.tcp_backlog:
            raise BackendError(
                f"{what}: {len(cmd.tcp_backlog)} bytes were already read from the TCP stream past the last "
                "whole frame; the kernel ovpn driver parses the stream itself and needs the socket handed "
                "over exactly at a frame boundary (read no further than the last whole packet, or use "
                "--dco userspace)"
            )
        for label, value in (("peer id", cmd.peer_id), ("tx peer id", tx_id), ("socket fd", cmd.socket_fd)):
            if not 0 <= value <= 0xFFFFFFFF:
                raise BackendError(f"{what}: {label} {value} does not fit an unsigned 32-bit integer")
        try:
            sock = socket.socket(fileno=os.dup(cmd.socket_fd))
        except OSError as e:
            raise BackendError(
                f"{what}: socket fd {cmd.socket_fd} is not usable: {e.strerror or e}"
            ) from None
        try:
            peer_attrs, remote, send_addr = self._peer_attrs(what, cmd, sock, iface, tx_id)
            peer_attrs.insert(1, ["OVPN_A_PEER_SOCKET", sock.fileno()])
            key = socket_key(sock.fileno())
            # in P2P the kernel replaces any current peer; its PEER_DEL_NTF(TEARDOWN) arrives
            # before the ACK and is dispatched with the old peer's state still in place
            await self._genl(what, OvpnCmd.PEER_NEW, "OVPN_A_PEER", peer_attrs, peer_id=cmd.peer_id)
        except BaseException:
            sock.close()
            raise
        old = self._peers.get(cmd.peer_id)
        if old is not None:  # the kernel did not tell us (it always does): drop it silently
            self._forget(old)
        reader = self._readers.get(key)
        if reader is None:
            reader = _Reader(key, sock, cmd.transport)
            self._readers[key] = reader
            assert self._loop is not None
            callback = self._on_udp_readable if cmd.transport is Transport.UDP else self._on_tcp_readable
            self._loop.add_reader(reader.fd, callback, reader)
        else:
            sock.close()  # MP: several peers on one UDP socket, one reader
        peer = _Peer(cmd.peer_id, cmd.transport, reader)
        peer.remote = remote
        peer.send_addr = send_addr
        reader.peers.add(cmd.peer_id)
        self._peers[cmd.peer_id] = peer
        log.info(
            "kernel data channel: peer %d over %s%s",
            cmd.peer_id,
            cmd.transport.value,
            f" to {remote[0]}:{remote[1]}" if remote else "",
        )

    def _peer_attrs(
        self, what: str, cmd: NewPeer, sock: socket.socket, iface: _Iface, tx_id: int
    ) -> tuple[list[list[Any]], Address | None, tuple[Any, ...] | None]:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            raise BackendError(f"{what}: the socket is not an IPv4/IPv6 socket")
        want_type = socket.SOCK_DGRAM if cmd.transport is Transport.UDP else socket.SOCK_STREAM
        if sock.type != want_type:
            raise BackendError(f"{what}: the socket is not a {cmd.transport.value.upper()} socket")
        attrs: list[list[Any]] = [["OVPN_A_PEER_ID", cmd.peer_id]]
        remote = send_addr = None
        if cmd.transport is Transport.TCP:
            try:
                sock.getpeername()
            except OSError:
                raise BackendError(f"{what}: the TCP socket is not connected") from None
        else:
            assert cmd.remote is not None
            remote, send_addr, remote_attrs = self._remote(what, sock.family, cmd.remote)
            attrs += remote_attrs
            if cmd.local_ip is not None:
                try:
                    local = _ip(cmd.local_ip.split("%")[0])
                except ValueError:
                    raise BackendError(f"{what}: local_ip {cmd.local_ip!r} is not an IP address") from None
                if local.version != _ip(remote[0].split("%")[0]).version:
                    raise BackendError(
                        f"{what}: local_ip {local} and remote {remote[0]} differ in address family"
                    )
                attrs.append(
                    ["OVPN_A_PEER_LOCAL_IPV4" if local.version == 4 else "OVPN_A_PEER_LOCAL_IPV6", str(local)]
                )
        if iface.mode is IfaceMode.MP:
            for label, value, version, name in (
                ("vpn_ipv4", cmd.vpn_ipv4, 4, "OVPN_A_PEER_VPN_IPV4"),
                ("vpn_ipv6", cmd.vpn_ipv6, 6, "OVPN_A_PEER_VPN_IPV6"),
            ):
                if value is None:
                    continue
                try:
                    ip = ipaddress.ip_address(value)
                except ValueError:
                    raise BackendError(f"{what}: {label} {value!r} is not an IP address") from None
                if ip.version != version:
                    raise BackendError(f"{what}: {label} {value!r} is not an IPv{version} address")
                attrs.append([name, str(ip)])
        if cmd.keepalive_interval or cmd.keepalive_timeout:
            attrs.append(["OVPN_A_PEER_KEEPALIVE_INTERVAL", cmd.keepalive_interval])
            attrs.append(["OVPN_A_PEER_KEEPALIVE_TIMEOUT", cmd.keepalive_timeout])
        if tx_id != cmd.peer_id:
            attrs.append(["OVPN_A_PEER_TX_ID", tx_id])  # only recent kernels know it
        return attrs, remote, send_addr

    @staticmethod
    def _remote(
        what: str, family: int | None, remote: Address
    ) -> tuple[Address, tuple[Any, ...], list[list[Any]]]:
        """Validate a remote; returns it normalized, as a sendto() address for a socket of
        ``family`` (None: AF_INET6) and as OVPN_A_PEER_REMOTE_* attributes."""
        try:
            host = str(remote[0])
            ip = ipaddress.ip_address(host)
            port = int(remote[1])
        except (ValueError, TypeError, IndexError):
            raise BackendError(f"{what}: remote {remote!r} is not an (ip, port) pair") from None
        if not 1 <= port <= 65535:
            raise BackendError(f"{what}: remote port {port} out of range 1..65535")
        scope = 0
        if isinstance(ip, ipaddress.IPv6Address):
            scope = scope_index(ip.scope_id)
            if ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
        attrs: list[list[Any]]
        if ip.version == 4:
            attrs = [["OVPN_A_PEER_REMOTE_IPV4", str(ip)]]
        else:
            attrs = [["OVPN_A_PEER_REMOTE_IPV6", str(ip).split("%")[0]]]
            if scope:
                attrs.append(["OVPN_A_PEER_REMOTE_IPV6_SCOPE_ID", scope])
        attrs.append(["OVPN_A_PEER_REMOTE_PORT", port])
        if family == socket.AF_INET:
            if ip.version != 4:
                raise BackendError(f"{what}: remote {ip} is IPv6 but the socket is IPv4")
            send_addr: tuple[Any, ...] = (str(ip), port)
        elif ip.version == 4:
            send_addr = (f"::ffff:{ip}", port, 0, 0)
        else:
            send_addr = (str(ip).split("%")[0], port, 0, scope)
        return (str(ip), port), send_addr, attrs

    async def _set_peer(self, cmd: SetPeer) -> None:
        what = "SetPeer"
        self._require_iface(what)
        keepalive = check_set_peer_keepalive(cmd)
        peer = self._peers.get(cmd.peer_id)
        attrs: list[list[Any]] = [["OVPN_A_PEER_ID", cmd.peer_id]]
        remote = send_addr = None
        if cmd.remote is not None:
            if peer is not None and peer.transport is Transport.TCP:
                raise BackendError(f"{what}: a TCP peer's remote cannot change")
            family = peer.reader.sock.family if peer is not None else None
            remote, send_addr, remote_attrs = self._remote(what, family, cmd.remote)
            attrs += remote_attrs
        if keepalive:
            attrs.append(["OVPN_A_PEER_KEEPALIVE_INTERVAL", cmd.keepalive_interval])
            attrs.append(["OVPN_A_PEER_KEEPALIVE_TIMEOUT", cmd.keepalive_timeout])
        await self._genl(what, OvpnCmd.PEER_SET, "OVPN_A_PEER", attrs, peer_id=cmd.peer_id)
        if peer is not None and remote is not None:
            peer.remote = remote
            peer.send_addr = send_addr

    async def _get_peer(self, cmd: GetPeer) -> PeerInfo:
        what = "GetPeer"
        self._require_iface(what)
        replies = await self._genl(
            what, OvpnCmd.PEER_GET, "OVPN_A_PEER", [["OVPN_A_PEER_ID", cmd.peer_id]], peer_id=cmd.peer_id
        )
        for msg in replies:
            p = msg.get_attr("OVPN_A_PEER")
            if p is None or p.get_attr("OVPN_A_PEER_ID") != cmd.peer_id:
                continue

            def n(name: str, p: Any = p) -> int:
                return int(p.get_attr(name) or 0)

            return PeerInfo(
                peer_id=cmd.peer_id,
                remote=_nl_remote(p),
                keepalive_interval=n("OVPN_A_PEER_KEEPALIVE_INTERVAL"),
                keepalive_timeout=n("OVPN_A_PEER_KEEPALIVE_TIMEOUT"),
                vpn_rx_bytes=n("OVPN_A_PEER_VPN_RX_BYTES"),
                vpn_tx_bytes=n("OVPN_A_PEER_VPN_TX_BYTES"),
                vpn_rx_packets=n("OVPN_A_PEER_VPN_RX_PACKETS"),
                vpn_tx_packets=n("OVPN_A_PEER_VPN_TX_PACKETS"),
                link_rx_bytes=n("OVPN_A_PEER_LINK_RX_BYTES"),
                link_tx_bytes=n("OVPN_A_PEER_LINK_TX_BYTES"),
                link_rx_packets=n("OVPN_A_PEER_LINK_RX_PACKETS"),
                link_tx_packets=n("OVPN_A_PEER_LINK_TX_PACKETS"),
            )
        raise BackendError(f"{what}: the kernel answered PEER_GET without peer {cmd.peer_id}")

    async def _del_peer(self, cmd: DelPeer) -> None:
        what = "DelPeer"
        self._require_iface(what)
        peer = self._peers.get(cmd.peer_id)
        if peer is not None and peer.tcp_out:
            await self._tcp_flush(peer, _TCP_FLUSH_ON_DEL)  # e.g. an EXIT queued just before
        await self._genl(
            what, OvpnCmd.PEER_DEL, "OVPN_A_PEER", [["OVPN_A_PEER_ID", cmd.peer_id]], peer_id=cmd.peer_id
        )
        # the kernel's PEER_DEL_NTF(USERSPACE) came before the ACK and has been forwarded;
        # should it have been lost (receive queue overrun), say it ourselves
        if cmd.peer_id in self._peers:
            self._peer_gone(cmd.peer_id, PeerDelReason.USERSPACE)

    async def _new_key(self, cmd: NewKey) -> None:
        what = "NewKey"
        self._require_iface(what)
        slot, cipher = check_new_key(cmd)
        attrs = [
            ["OVPN_A_KEYCONF_PEER_ID", cmd.peer_id],
            ["OVPN_A_KEYCONF_SLOT", slot],
            ["OVPN_A_KEYCONF_KEY_ID", cmd.key_id],
            ["OVPN_A_KEYCONF_CIPHER_ALG", _CIPHER_ALG[cipher]],
            [
                "OVPN_A_KEYCONF_ENCRYPT_DIR",
                {
                    "attrs": [
                        ["OVPN_A_KEYDIR_CIPHER_KEY", bytes(cmd.encrypt.cipher_key)],
                        ["OVPN_A_KEYDIR_NONCE_TAIL", bytes(cmd.encrypt.nonce_tail)],
                    ]
                },
            ],
            [
                "OVPN_A_KEYCONF_DECRYPT_DIR",
                {
                    "attrs": [
                        ["OVPN_A_KEYDIR_CIPHER_KEY", bytes(cmd.decrypt.cipher_key)],
                        ["OVPN_A_KEYDIR_NONCE_TAIL", bytes(cmd.decrypt.nonce_tail)],
                    ]
                },
            ],
        ]
        await self._genl(what, OvpnCmd.KEY_NEW, "OVPN_A_KEYCONF", attrs, peer_id=cmd.peer_id, slot=slot)
        self._keys[(cmd.peer_id, slot)] = (cmd.key_id, cipher)

    async def _del_key(self, cmd: DelKey) -> None:
        what = "DelKey"
        self._require_iface(what)
        slot = check_slot(what, cmd.slot)
        attrs = [["OVPN_A_KEYCONF_PEER_ID", cmd.peer_id], ["OVPN_A_KEYCONF_SLOT", slot]]
        # an empty slot is not an error for the kernel either
        await self._genl(what, OvpnCmd.KEY_DEL, "OVPN_A_KEYCONF", attrs, peer_id=cmd.peer_id, slot=slot)
        self._keys.pop((cmd.peer_id, slot), None)

    async def _swap_keys(self, cmd: SwapKeys) -> None:
        what = "SwapKeys"
        self._require_iface(what)
        await self._genl(
            what,
            OvpnCmd.KEY_SWAP,
            "OVPN_A_KEYCONF",
            [["OVPN_A_KEYCONF_PEER_ID", cmd.peer_id]],
            peer_id=cmd.peer_id,
        )
        primary = self._keys.pop((cmd.peer_id, 0), None)
        secondary = self._keys.pop((cmd.peer_id, 1), None)
        if secondary is not None:
            self._keys[(cmd.peer_id, 0)] = secondary
        if primary is not None:
            self._keys[(cmd.peer_id, 1)] = primary

    async def _get_key(self, cmd: GetKey) -> KeyInfo:
        what = "GetKey"
        self._require_iface(what)
        slot = check_slot(what, cmd.slot)
        attrs = [["OVPN_A_KEYCONF_PEER_ID", cmd.peer_id], ["OVPN_A_KEYCONF_SLOT", slot]]
        replies = await self._genl(
            what, OvpnCmd.KEY_GET, "OVPN_A_KEYCONF", attrs, peer_id=cmd.peer_id, slot=slot
        )
        for msg in replies:
            kc = msg.get_attr("OVPN_A_KEYCONF")
            if kc is None:
                continue
            key_id = int(kc.get_attr("OVPN_A_KEYCONF_KEY_ID") or 0)
            alg = kc.get_attr("OVPN_A_KEYCONF_CIPHER_ALG")
            known = self._keys.get((cmd.peer_id, slot))
            if alg == OvpnCipherAlg.CHACHA20_POLY1305:
                cipher = Cipher.CHACHA20_POLY1305
            elif known is not None and known[0] == key_id and known[1] is not Cipher.CHACHA20_POLY1305:
                cipher = known[1]  # KEY_GET says AES-GCM, not which key size
            else:
                cipher = Cipher.AES_256_GCM
            return KeyInfo(peer_id=cmd.peer_id, slot=KeySlot(slot), key_id=key_id, cipher=cipher)
        raise BackendError(f"{what}: the kernel answered KEY_GET without a key")

    def _send_control(self, cmd: SendControl) -> None:
        what = "SendControl"
        peer = self._peers.get(cmd.peer_id)
        if peer is None:
            raise BackendError(f"{what}: unknown peer id {cmd.peer_id}")
        packet = cmd.packet
        if not packet:
            raise BackendError(f"{what}: empty packet")
        if peer.transport is Transport.TCP:
            if len(packet) > 0xFFFF:
                raise BackendError(f"{what}: {len(packet)} bytes do not fit a TCP frame (max 65535)")
            peer.tcp_out.append(_FRAME_LEN.pack(len(packet)) + bytes(packet))
            if len(peer.tcp_out) == 1 and peer.tcp_retry is None:
                self._tcp_pump(peer)
            return
        try:
            peer.reader.sock.sendto(packet, socket.MSG_DONTWAIT, peer.send_addr)
        except OSError as e:
            if e.errno in TRANSIENT_SEND_ERRNOS:
                return  # UDP is lossy anyway; the reliability layer retransmits
            raise BackendError(f"{what}: send to {peer.remote} failed: {e.strerror or e}") from None

    _handlers: dict[type, Callable[[KernelDataChannel, Any], Any]] = {
        NewIface: _new_iface,
        DelIface: _del_iface,
        NewPeer: _new_peer,
        SetPeer: _set_peer,
        GetPeer: _get_peer,
        DelPeer: _del_peer,
        NewKey: _new_key,
        DelKey: _del_key,
        SwapKeys: _swap_keys,
        GetKey: _get_key,
        SendControl: _send_control,
    }

    # ------------------------------------------------------------------ netlink

    async def _ensure_channel(self, what: str) -> _GenlChannel:
        if self._chan is not None:
            return self._chan
        assert self._loop is not None
        chan = _GenlChannel(self._loop, self._on_notification, self._on_overrun)
        try:
            await chan.open()
            chan.join(OVPN_MCGRP_PEERS)
        except KernelError as e:
            chan.close()
            if e.code in (errno.ENOENT, errno.EOPNOTSUPP):
                raise BackendError(f"{what}: {_NO_DRIVER}") from None
            if e.code in (errno.EPERM, errno.EACCES):
                raise BackendError(f"{what}: {_NEED_CAP}") from None
            raise BackendError(
                f"{what}: resolving generic netlink family 'ovpn' failed: {e.describe()}"
            ) from None
        except KeyError:
            chan.close()
            raise BackendError(
                f"{what}: the kernel's ovpn family has no '{OVPN_MCGRP_PEERS}' multicast group"
            ) from None
        except OSError as e:
            chan.close()
            raise BackendError(f"{what}: cannot open a generic netlink socket: {e.strerror or e}") from None
        self._chan = chan
        return chan

    async def _genl(
        self,
        what: str,
        cmd: int,
        nest: str,
        nest_attrs: list[list[Any]],
        *,
        peer_id: int | None = None,
        slot: int | None = None,
    ) -> list[ovpnmsg]:
        """One OVPN_CMD_* request on our interface; kernel errors become BackendError."""
        iface = self._require_iface(what)
        chan = self._chan
        if chan is None:
            raise BackendError(f"{what}: the kernel backend has no netlink socket")
        msg = ovpnmsg()
        msg["cmd"] = cmd
        msg["version"] = chan.version
        msg["attrs"] = [["OVPN_A_IFINDEX", iface.index], [nest, {"attrs": nest_attrs}]]
        try:
            return await chan.request(msg)
        except KernelError as e:
            raise self._explain(what, cmd, e, peer_id, slot) from None
        except struct.error as e:  # a value does not fit its attribute
            raise BackendError(f"{what}: a value does not fit its netlink attribute: {e}") from None

    @staticmethod
    def _explain(what: str, cmd: int, e: KernelError, peer_id: int | None, slot: int | None) -> BackendError:
        op = OvpnCmd.name(cmd)
        if e.code in (errno.EPERM, errno.EACCES):
            return BackendError(f"{what}: the kernel refused {op}: {_NEED_CAP}")
        text = (e.message or "").lower()
        if e.code == errno.ENOENT and peer_id is not None:
            if "slot" in text and slot is not None:
                return BackendError(
                    f"{what}: peer {peer_id} has no key in the {KeySlot(slot).name.lower()} slot "
                    f"(kernel {op}: {e.describe()})"
                )
            return BackendError(f"{what}: unknown peer id {peer_id} (kernel {op}: {e.describe()})")
        if e.code == errno.ENODEV:
            return BackendError(f"{what}: the ovpn interface is gone (kernel {op}: {e.describe()})")
        return BackendError(f"{what}: the kernel refused {op}: {e.describe()}")

    # ------------------------------------------------------------------ notifications

    def _on_notification(self, msg: ovpnmsg) -> None:
        iface = self._iface
        if iface is None or msg.get_attr("OVPN_A_IFINDEX") != iface.index:
            return  # another ovpn interface in this network namespace
        cmd = msg["cmd"]
        if cmd == OvpnCmd.PEER_DEL_NTF:
            p = msg.get_attr("OVPN_A_PEER")
            if p is None or p.get_attr("OVPN_A_PEER_ID") is None:
                return
            raw = p.get_attr("OVPN_A_PEER_DEL_REASON")
            try:
                reason = PeerDelReason(raw)
            except ValueError:
                log.warning("kernel data channel: unknown peer deletion reason %r", raw)
                reason = PeerDelReason.TRANSPORT_ERROR
            self._peer_gone(int(p.get_attr("OVPN_A_PEER_ID")), reason)
        elif cmd == OvpnCmd.KEY_SWAP_NTF:
            kc = msg.get_attr("OVPN_A_KEYCONF")
            if kc is None or kc.get_attr("OVPN_A_KEYCONF_PEER_ID") is None:
                return
            peer_id = int(kc.get_attr("OVPN_A_KEYCONF_PEER_ID"))
            key_id = int(kc.get_attr("OVPN_A_KEYCONF_KEY_ID") or 0)
            for slot in (0, 1):
                if self._keys.get((peer_id, slot), (None,))[0] == key_id:
                    del self._keys[(peer_id, slot)]
            log.warning("kernel data channel: key %d of peer %d exhausted its packet ids", key_id, peer_id)
            self._emit(KeyExhausted(peer_id, key_id))
        elif cmd == OvpnCmd.PEER_FLOAT_NTF:
            p = msg.get_attr("OVPN_A_PEER")
            remote = _nl_remote(p) if p is not None else None
            if p is None or remote is None or p.get_attr("OVPN_A_PEER_ID") is None:
                return
            peer_id = int(p.get_attr("OVPN_A_PEER_ID"))
            peer = self._peers.get(peer_id)
            if peer is not None and peer.transport is Transport.UDP:
                with contextlib.suppress(BackendError):
                    peer.remote, peer.send_addr, _ = self._remote("float", peer.reader.sock.family, remote)
            log.info("kernel data channel: peer %d floated to %s:%d", peer_id, *remote)
            self._emit(PeerFloated(peer_id, remote))

    def _on_overrun(self) -> None:
        # notifications were lost: ask the kernel which of our peers still exist
        if not self._closed and self._peers and self._loop is not None:
            self._spawn(self._resync())

    async def _resync(self) -> None:
        async with self._lock:
            for peer_id in list(self._peers):
                try:
                    await self._genl(
                        "resync",
                        OvpnCmd.PEER_GET,
                        "OVPN_A_PEER",
                        [["OVPN_A_PEER_ID", peer_id]],
                        peer_id=peer_id,
                    )
                except BackendError as e:
                    if "unknown peer" in str(e):
                        self._peer_gone(peer_id, PeerDelReason.TEARDOWN)

    def _emit(self, notification: Notification) -> None:
        # delivered from the loop, never re-entrantly from inside a reader or command
        if self._loop is not None and self._subscribers:
            self._loop.call_soon(self._dispatch, notification)

    def _dispatch(self, notification: Notification) -> None:
        for callback in self._subscribers:
            try:
                callback(notification)
            except Exception:
                log.exception("data-channel notification callback failed for %r", notification)

    # ------------------------------------------------------------------ peers

    def _peer_gone(self, peer_id: int, reason: PeerDelReason) -> None:
        """The kernel removed a peer (or we know it will): forget it and tell the subscribers.

        Notifications about peers we no longer track (already reported, e.g. a TCP peer we
        dropped at EOF and then deleted in the kernel) are not repeated.
        """
        peer = self._peers.get(peer_id)
        if peer is None:
            return
        self._forget(peer)
        log.info("kernel data channel: peer %d deleted (%s)", peer_id, reason.name)
        self._emit(PeerDeleted(peer_id, reason))

    def _local_remove(self, peer: _Peer, reason: PeerDelReason) -> None:
        """We saw the transport end (TCP EOF/error): report it and delete the kernel's peer."""
        if self._peers.get(peer.peer_id) is not peer:
            return
        self._peer_gone(peer.peer_id, reason)
        self._deferred_del.add(peer.peer_id)
        self._spawn(self._flush_deferred_locked())

    async def _flush_deferred_locked(self) -> None:
        async with self._lock:
            await self._flush_deferred_deletes()

    async def _flush_deferred_deletes(self) -> None:
        while self._deferred_del and self._iface is not None and self._chan is not None:
            peer_id = self._deferred_del.pop()
            if peer_id in self._peers:
                continue  # re-created since: not ours to delete
            with contextlib.suppress(BackendError):
                await self._genl(
                    "DelPeer", OvpnCmd.PEER_DEL, "OVPN_A_PEER", [["OVPN_A_PEER_ID", peer_id]], peer_id=peer_id
                )
        self._deferred_del.clear()

    def _forget(self, peer: _Peer) -> None:
        if self._peers.get(peer.peer_id) is peer:
            del self._peers[peer.peer_id]
        if peer.tcp_retry is not None:
            peer.tcp_retry.cancel()
            peer.tcp_retry = None
        peer.tcp_out.clear()
        for slot in (0, 1):
            self._keys.pop((peer.peer_id, slot), None)
        reader = peer.reader
        reader.peers.discard(peer.peer_id)
        if not reader.peers and self._readers.get(reader.key) is reader:
            del self._readers[reader.key]
            if self._loop is not None and reader.sock.fileno() >= 0:
                self._loop.remove_reader(reader.fd)
            reader.sock.close()

    def _spawn(self, coro: Any) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ socket readers

    def _on_udp_readable(self, reader: _Reader) -> None:
        sock = reader.sock
        for _ in range(_RX_BATCH):
            if self._readers.get(reader.key) is not reader:
                return
            try:
                data, addr = sock.recvfrom(0x10000, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # ICMP errors queued on the socket (e.g. port unreachable) are reported once
                if e.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    continue
                log.debug("kernel data channel: receive failed: %s", e)
                return
            if not data or (data[0] >> 3) in (OPCODE_DATA_V2, OPCODE_DATA_V1):
                # DATA_V2 for our peers never gets here; the rest the kernel drops too
                continue
            remote = _normalize(addr)
            self._emit(ControlPacket(self._udp_owner(reader, remote), data, remote))

    def _udp_owner(self, reader: _Reader, remote: Address) -> int:
        if len(reader.peers) == 1:
            return next(iter(reader.peers))
        for peer_id in reader.peers:
            peer = self._peers.get(peer_id)
            if peer is not None and peer.remote == remote:
                return peer_id
        return UNDEF_PEER_ID  # MP: a packet from an address no peer has (yet)

    def _on_tcp_readable(self, reader: _Reader) -> None:
        peer_id = next(iter(reader.peers), None)
        peer = self._peers.get(peer_id) if peer_id is not None else None
        if peer is None or peer.reader is not reader:
            return
        sock = reader.sock
        for _ in range(_RX_BATCH):
            try:
                data = sock.recv(_TCP_RX_BUF, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno == errno.EBADF:
                    # the kernel already dropped the peer (its PEER_DEL_NTF follows): stop reading
                    log.debug("kernel data channel: TCP peer %d detached by the kernel", peer.peer_id)
                    if self._loop is not None:
                        self._loop.remove_reader(reader.fd)
                    return
                reason = (
                    PeerDelReason.TRANSPORT_DISCONNECT
                    if e.errno in TCP_DISCONNECT_ERRNOS
                    else PeerDelReason.TRANSPORT_ERROR
                )
                log.info("kernel data channel: TCP peer %d: %s", peer.peer_id, e)
                self._local_remove(peer, reason)
                return
            if not data:
                self._local_remove(peer, PeerDelReason.TRANSPORT_DISCONNECT)
                return
            if len(data) < 2:
                continue
            size = _FRAME_LEN.unpack_from(data)[0]
            packet = data[2:]
            if size != len(packet):
                log.debug("kernel data channel: TCP frame says %d bytes, got %d", size, len(packet))
                packet = packet[:size]
            if packet:
                self._emit(ControlPacket(peer.peer_id, packet, None))

    # ------------------------------------------------------------------ TCP control output

    def _tcp_pump(self, peer: _Peer) -> None:
        """Send queued frames, one whole frame per send(); retry later on EAGAIN."""
        peer.tcp_retry = None
        sock = peer.reader.sock
        while peer.tcp_out:
            if self._peers.get(peer.peer_id) is not peer:
                peer.tcp_out.clear()
                return
            frame = peer.tcp_out[0]
            try:
                sock.send(frame, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                # a previous frame (ours or the kernel's data) is still in flight
                assert self._loop is not None
                peer.tcp_retry = self._loop.call_later(peer.tcp_delay, self._tcp_pump, peer)
                peer.tcp_delay = min(peer.tcp_delay * 2, _TCP_RETRY_MAX)
                return
            except OSError as e:
                if e.errno in (errno.EIO, errno.EBADF):
                    peer.tcp_out.clear()  # detached by the kernel: its PEER_DEL_NTF follows
                    return
                log.info("kernel data channel: TCP send to peer %d failed: %s", peer.peer_id, e)
                reason = (
                    PeerDelReason.TRANSPORT_DISCONNECT
                    if e.errno in TCP_DISCONNECT_ERRNOS
                    else PeerDelReason.TRANSPORT_ERROR
                )
                self._local_remove(peer, reason)
                return
            peer.tcp_out.popleft()
            peer.tcp_delay = _TCP_RETRY_MIN

    async def _tcp_flush(self, peer: _Peer, timeout: float) -> None:
        assert self._loop is not None
        deadline = self._loop.time() + timeout
        while peer.tcp_out and self._peers.get(peer.peer_id) is peer and self._loop.time() < deadline:
            if peer.tcp_retry is not None:
                peer.tcp_retry.cancel()
            self._tcp_pump(peer)
            if peer.tcp_out:
                await asyncio.sleep(0.005)

    # ------------------------------------------------------------------ helpers

    def _require_iface(self, what: str) -> _Iface:
        if self._iface is None:
            raise BackendError(f"{what}: no interface; send NewIface first")
        return self._iface
