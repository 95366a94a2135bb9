"""Generic netlink to the ``ovpn`` family: the backend's asynchronous channel, the
synchronous pyroute2 socket for probes, and how a kernel refusal is put into words.

:class:`GenlChannel` is a plain non-blocking ``AF_NETLINK`` socket on the event loop
(``add_reader``), so no thread and no private pyroute2 loop is involved. It carries both
the requests (each with its own sequence number, each waiting for its ACK or error, with
the extended ACK decoded into :class:`KernelError`) and the ``peers`` multicast
notifications. The kernel queues a notification caused by a request before that
request's ACK, so the notification has been dispatched by the time the request returns.

:class:`OvpnNetlink` is pyroute2's synchronous socket bound to the family, for probes
(:mod:`pyovpn.datachannel.choice`) and scripts run outside an event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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
    nla,
    nlmsg,
)
from pyroute2.netlink.generic import GenericNetlinkSocket

from pyovpn.datachannel.kernel.uapi import OVPN_FAMILY_NAME, OVPN_FAMILY_VERSION, OvpnCmd, ovpnmsg
from pyovpn.net import rxbuf
from pyovpn.net.netlink import (
    NETLINK_ADD_MEMBERSHIP,
    NETLINK_CAP_ACK,
    NETLINK_EXT_ACK,
    NETLINK_GENERIC,
    NLA_F_NET_BYTEORDER,
    NLM_F_ACK_TLVS,
    NLM_F_CAPPED,
    NLMSGHDR,
    SOL_NETLINK,
    messages,
)

__all__ = ["NEED_CAP", "NO_DRIVER", "GenlChannel", "KernelError", "OvpnNetlink"]

log = logging.getLogger(__name__)

NEED_CAP = "needs CAP_NET_ADMIN: run as root (or grant the capability)"
NO_DRIVER = (
    "the kernel has no 'ovpn' driver: it needs Linux >= 6.16 with the ovpn module "
    "(modprobe ovpn), or use --dco userspace"
)

_NL_RX_BUF = 1 << 18  # dumps come in skbs of up to 32 KiB; keep margin
_NL_RX_BATCH = 256
_NL_SOCK_BUF = 1 << 20  # as OpenVPN: notifications must not be dropped
_NL_TIMEOUT = 10.0
_ERR_LEN = NLMSGHDR.size + 4  # nlmsghdr + the error code of an NLMSG_ERROR


class OvpnNetlink(GenericNetlinkSocket):  # type: ignore[misc]  # pyroute2 is untyped
    """pyroute2's synchronous generic-netlink socket bound to the ``ovpn`` family.

    Like pyroute2's ``WireGuard`` class. Use it from a thread without a running asyncio
    loop (pyroute2 0.9 refuses otherwise); the backend itself does not use it.
    """

    def bind(
        self, proto: str = OVPN_FAMILY_NAME, msg_class: type = ovpnmsg, *argv: object, **kwarg: object
    ) -> object:
        return super().bind(proto, msg_class, *argv, **kwarg)

    def peers(self, ifindex: int) -> list[ovpnmsg]:
        """All peers of an ``ovpn`` interface (OVPN_CMD_PEER_GET dump)."""
        msg = ovpnmsg()
        msg["cmd"] = OvpnCmd.PEER_GET
        msg["version"] = OVPN_FAMILY_VERSION
        msg["attrs"].append(["OVPN_A_IFINDEX", ifindex])
        return list(self.nlm_request(msg, msg_type=self.prid, msg_flags=NLM_F_REQUEST | NLM_F_DUMP))


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


# ---------------------------------------------------------------------------- extended ACK


class _extack(nlmsg):  # type: ignore[misc]  # pyroute2 is untyped
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


def _nla_map(cls: type) -> tuple[tuple[str, str], ...]:
    nla_map = getattr(cls, "nla_map", ())
    return nla_map if isinstance(nla_map, tuple) else ()


def _nested_class(cls: type, attr_type: int) -> type | None:
    nla_map = _nla_map(cls)
    if attr_type >= len(nla_map):
        return None
    sub = getattr(cls, nla_map[attr_type][1], None)
    if isinstance(sub, type) and issubclass(sub, nla) and sub is not cls and _nla_map(sub):
        return sub
    return None


def _attr_name(cls: type, attr_type: int) -> str:
    nla_map = _nla_map(cls)
    if attr_type < len(nla_map):
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
    body = NLMSGHDR.size + 4  # nlmsghdr + genlmsghdr
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


def _error(chunk: bytes, flags: int, code: int, request: bytes) -> KernelError:
    """The KernelError of an NLMSG_ERROR (or DONE) answering ``request``."""
    message = attribute = None
    if flags & NLM_F_ACK_TLVS and len(chunk) >= _ERR_LEN + NLMSGHDR.size:
        if flags & NLM_F_CAPPED:
            tlv = _ERR_LEN + NLMSGHDR.size
        else:
            tlv = _ERR_LEN + ((struct.unpack_from("=I", chunk, _ERR_LEN)[0] + 3) & ~3)
        tlvs = chunk[tlv:]
        ext = _extack(NLMSGHDR.pack(_ERR_LEN + len(tlvs), NLMSG_ERROR, 0, 0, 0) + chunk[16:20] + tlvs)
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


def _error_code(chunk: bytes, missing: int) -> int:
    """The positive errno of an NLMSG_ERROR/NLMSG_DONE; ``missing`` if it is too short to say."""
    if len(chunk) < _ERR_LEN:
        return missing
    code: int = -struct.unpack_from("=i", chunk, NLMSGHDR.size)[0]
    return code


# ---------------------------------------------------------------------------- the channel


@dataclass
class _Pending:
    # replies are pyroute2 messages (ovpnmsg, or ctrlmsg while resolving the family)
    future: asyncio.Future[list[Any]]
    request: bytes
    dump: bool
    replies: list[Any] = field(default_factory=list)


class GenlChannel:
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
        self.family_id = int(family.get_attr("CTRL_ATTR_FAMILY_ID"))
        self.version = int(family.get_attr("CTRL_ATTR_VERSION") or OVPN_FAMILY_VERSION)
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
                data = rxbuf.recv(sock, _NL_RX_BUF)
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
        for header, chunk in messages(data):
            mtype = header.type
            pending = self._pending.get(header.seq) if header.seq else None
            if pending is None:
                if header.seq == 0 and mtype == self.family_id and self.family_id:
                    self._notify(chunk)
                continue  # an answer nobody waits for any more (timed out)
            if pending.future.done():
                continue
            if mtype == NLMSG_ERROR:
                code = _error_code(chunk, errno.EIO)
                if code == 0:
                    pending.future.set_result(pending.replies)
                else:
                    pending.future.set_exception(_error(chunk, header.flags, code, pending.request))
            elif mtype == NLMSG_DONE:
                code = _error_code(chunk, 0)
                if code > 0:
                    pending.future.set_exception(_error(chunk, header.flags, code, pending.request))
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

    def _notify(self, chunk: bytes) -> None:
        try:
            msg = ovpnmsg(chunk)
            msg.decode()
        except Exception:
            log.warning("kernel data channel: undecodable ovpn notification", exc_info=True)
            return
        self._on_notification(msg)
