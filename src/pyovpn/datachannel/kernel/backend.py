"""The kernel data channel: :class:`KernelDataChannel` drives Linux's ``ovpn`` DCO driver.

It implements :class:`pyovpn.datachannel.api.DataChannel` with the same observable
behaviour as the userspace backend, but the packets never leave the kernel: ``NewIface``
creates an ``ovpn`` link over rtnetlink (:mod:`.rtnl`), every other command is one request
of the generic-netlink family ``ovpn`` (OPENVPN-PROTOCOL.md §7, :mod:`.genl`), and the
kernel's ``peers`` multicast notifications become ``PeerDeleted`` / ``KeyExhausted`` /
``PeerFloated``. Control packets go through the handed-over sockets (:mod:`.transport`).

Differences from the userspace backend: the kernel's replay window (2048 packets) is
fixed, statistics come from the kernel, and ``tcp_backlog`` must be empty (the kernel's
stream parser needs the handover at a frame boundary). One backend drives one interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from pyovpn.datachannel import api
from pyovpn.datachannel.kernel.genl import NEED_CAP, NO_DRIVER, GenlChannel, KernelError
from pyovpn.datachannel.kernel.rtnl import cleanup_stale_iface, create_link, delete_link
from pyovpn.datachannel.kernel.transport import Peer, Transports
from pyovpn.datachannel.kernel.uapi import CIPHER_ALG, OVPN_MCGRP_PEERS, OvpnCipherAlg, OvpnCmd, ovpnmsg
from pyovpn.datachannel.notify import Subscribers
from pyovpn.datachannel.validate import (
    check_keepalive,
    check_new_key,
    check_new_peer_transport,
    check_no_fragment,
    check_no_framing,
    check_no_null_dev,
    check_no_passtos,
    check_no_shaper,
    check_peer_socket,
    check_set_peer_keepalive,
    check_slot,
    no_key_in_slot,
)
from pyovpn.errors import BackendError
from pyovpn.net.sockets import scope_index, socket_key

__all__ = ["KernelDataChannel"]

log = logging.getLogger(__name__)

_TCP_FLUSH_ON_DEL = 0.25  # seconds DelPeer waits for queued control frames (e.g. EXIT) to leave

# one netlink attribute as pyroute2 takes it: [name, value or {"attrs": [...]}]
_Attr = list[Any]


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(text)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _nl_remote(peer: Any) -> api.Address | None:
    """The remote endpoint in a decoded OVPN_A_PEER nest (a pyroute2 nla)."""
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


def _remote(
    what: str, family: int | None, remote: api.Address
) -> tuple[api.Address, tuple[Any, ...], list[_Attr]]:
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
    attrs: list[_Attr]
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


def _keepalive_attrs(interval: int | None, timeout: int | None) -> list[_Attr]:
    return [["OVPN_A_PEER_KEEPALIVE_INTERVAL", interval], ["OVPN_A_PEER_KEEPALIVE_TIMEOUT", timeout]]


def _keydir(direction: api.KeyDirection) -> dict[str, list[_Attr]]:
    return {
        "attrs": [
            ["OVPN_A_KEYDIR_CIPHER_KEY", bytes(direction.cipher_key)],
            ["OVPN_A_KEYDIR_NONCE_TAIL", bytes(direction.nonce_tail)],
        ]
    }


def _peer_info(peer_id: int, p: Any) -> api.PeerInfo:
    """PeerInfo from a decoded OVPN_A_PEER nest (a pyroute2 nla)."""

    def n(name: str) -> int:
        return int(p.get_attr(name) or 0)

    return api.PeerInfo(
        peer_id=peer_id,
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


@dataclass
class _Iface:
    name: str
    requested_name: str
    index: int
    mode: api.IfaceMode
    mtu: int


class KernelDataChannel:
    """The :class:`~pyovpn.datachannel.api.DataChannel` backend on the kernel ``ovpn`` driver."""

    name = "kernel"
    capabilities = api.Capabilities(mp=True)

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._chan: GenlChannel | None = None
        self._iface: _Iface | None = None
        self._peers: dict[int, Peer] = {}
        self._io = Transports(self._peers, self._emit, self._local_remove)
        self._keys: dict[tuple[int, int], tuple[int, api.Cipher]] = {}  # (peer, slot) -> (key_id, cipher)
        self._deferred_del: set[int] = set()  # peers we dropped locally but not yet in the kernel
        self._subscribers = Subscribers()
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    # ------------------------------------------------------------------ public API

    @property
    def ifname(self) -> str | None:
        """The ovpn interface's actual name."""
        return self._iface.name if self._iface else None

    @property
    def ifindex(self) -> int | None:
        return self._iface.index if self._iface else None

    async def clean_stale_link(self, name: str) -> bool:
        """Remove an idle ``ovpn`` link called ``name`` that a killed earlier run left; True if one was."""
        return await asyncio.to_thread(cleanup_stale_iface, name)

    def subscribe(self, callback: Callable[[api.Notification], None]) -> None:
        self._subscribers.add(callback)

    async def request(self, command: api.Command) -> api.PeerInfo | api.KeyInfo | None:
        what = type(command).__name__
        self._check_open(what)
        self._loop = asyncio.get_running_loop()
        handler = api.handler_for(self, command)
        if isinstance(command, api.SendControl):
            # no netlink involved: never queue a control packet behind a slow request
            self._send_control(command)
            return None
        async with self._lock:
            self._check_open(what)
            await self._flush_deferred_deletes()
            result: api.PeerInfo | api.KeyInfo | None = await handler(command)
            return result

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
                await asyncio.to_thread(delete_link, "close", iface.index)
            log.info("kernel data channel: deleted %s", iface.name)

    # ------------------------------------------------------------------ commands

    async def _new_iface(self, cmd: api.NewIface) -> None:
        what = "NewIface"
        if self._iface is not None:
            raise BackendError(
                f"{what}: this backend already drives {self._iface.name}; use one backend per interface"
            )
        try:
            mode = api.IfaceMode(cmd.mode)
        except ValueError:
            raise BackendError(f"{what}: unknown interface mode {cmd.mode!r} (P2P or MP)") from None
        if not 68 <= cmd.mtu <= 65535:
            raise BackendError(f"{what}: MTU {cmd.mtu} out of range 68..65535")
        check_no_null_dev(cmd, "kernel")
        await self._ensure_channel(what)
        index, ifname = await asyncio.to_thread(create_link, cmd.name, mode, cmd.mtu)
        if self._closed:
            with contextlib.suppress(BackendError):
                await asyncio.to_thread(delete_link, what, index)
            self._check_open(what)
        self._iface = _Iface(ifname, cmd.name, index, mode, cmd.mtu)
        log.info("kernel data channel: created %s (ovpn, %s, mtu %d)", ifname, mode.name, cmd.mtu)

    async def _del_iface(self, cmd: api.DelIface) -> None:
        what = "DelIface"
        iface = self._iface
        if iface is None or cmd.name not in (iface.name, iface.requested_name):
            raise BackendError(f"{what}: no interface named {cmd.name!r}")
        await asyncio.to_thread(delete_link, what, iface.index)
        # the kernel sent PEER_DEL_NTF(TEARDOWN) for each peer before it answered: dispatch them
        if self._chan is not None:
            self._chan.drain()
        for peer in list(self._peers.values()):
            self._peer_gone(peer.peer_id, api.PeerDelReason.TEARDOWN)
        self._iface = None
        log.info("kernel data channel: deleted %s", iface.name)

    async def _new_peer(self, cmd: api.NewPeer) -> None:
        what = "NewPeer"
        iface = self._require_iface(what)
        tx_id = cmd.peer_id if cmd.tx_peer_id is None else cmd.tx_peer_id
        check_no_framing(cmd)
        check_no_passtos(cmd, "kernel")
        check_no_fragment(cmd, "kernel")
        check_no_shaper(cmd, "kernel")
        if iface.mode is api.IfaceMode.P2P and (cmd.vpn_ipv4 is not None or cmd.vpn_ipv6 is not None):
            raise BackendError(f"{what}: VPN IPs are not allowed in P2P mode (the kernel rejects them too)")
        check_keepalive(what, cmd.keepalive_interval, cmd.keepalive_timeout)
        check_new_peer_transport(cmd)
        if cmd.transport is api.Transport.TCP and cmd.local_ip is not None:
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
        sock = check_peer_socket(cmd)
        try:
            peer_attrs, remote, send_addr = self._peer_attrs(what, cmd, sock.family, iface, tx_id)
            peer_attrs.insert(1, ["OVPN_A_PEER_SOCKET", sock.fileno()])
            key = socket_key(sock.fileno())
            # in P2P the kernel replaces any current peer; its PEER_DEL_NTF(TEARDOWN) arrives
            # before the ACK and is dispatched with the old peer's state still in place
            await self._genl(what, OvpnCmd.PEER_NEW, "OVPN_A_PEER", peer_attrs, peer_id=cmd.peer_id)
        except BaseException:
            sock.close()
            raise
        if cmd.keepalive_interval or cmd.keepalive_timeout:
            await self._keepalive_after_new(what, cmd, sock)
        old = self._peers.get(cmd.peer_id)
        if old is not None:  # the kernel did not tell us (it always does): drop it silently
            self._forget(old)
        peer = self._io.attach(cmd.peer_id, cmd.transport, key, sock)
        peer.remote = remote
        peer.send_addr = send_addr
        self._peers[cmd.peer_id] = peer
        log.info(
            "kernel data channel: peer %d over %s%s",
            cmd.peer_id,
            cmd.transport.value,
            f" to {remote[0]}:{remote[1]}" if remote else "",
        )

    def _peer_attrs(
        self, what: str, cmd: api.NewPeer, family: int, iface: _Iface, tx_id: int
    ) -> tuple[list[_Attr], api.Address | None, tuple[Any, ...] | None]:
        """The OVPN_A_PEER attributes of a NewPeer on a checked socket of ``family``, and the
        remote as the API and as sendto() name it (None for TCP)."""
        attrs: list[_Attr] = [["OVPN_A_PEER_ID", cmd.peer_id]]
        remote: api.Address | None = None
        send_addr: tuple[Any, ...] | None = None
        if cmd.transport is api.Transport.UDP:
            assert cmd.remote is not None
            remote, send_addr, remote_attrs = _remote(what, family, cmd.remote)
            attrs += remote_attrs
            if cmd.local_ip is not None:
                attrs.append(self._local_attr(what, cmd.local_ip, remote))
        if iface.mode is api.IfaceMode.MP:
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
        if tx_id != cmd.peer_id:
            attrs.append(["OVPN_A_PEER_TX_ID", tx_id])  # only recent kernels know it
        return attrs, remote, send_addr

    async def _keepalive_after_new(self, what: str, cmd: api.NewPeer, sock: socket.socket) -> None:
        """Arm the keepalive of a peer PEER_NEW just added, with a PEER_SET of its own.

        Why not in PEER_NEW: the driver kicks its keepalive worker while it parses PEER_NEW, before it
        hashes the new peer; a worker that runs on another CPU in between finds no peer and does not
        rearm, so the peer would never expire (seen once in the emulated guest). Stock OpenVPN sends
        the keepalive in a PEER_SET after PEER_NEW too."""
        keepalive = _keepalive_attrs(cmd.keepalive_interval, cmd.keepalive_timeout)
        attrs: list[_Attr] = [["OVPN_A_PEER_ID", cmd.peer_id], *keepalive]
        try:
            await self._genl(what, OvpnCmd.PEER_SET, "OVPN_A_PEER", attrs, peer_id=cmd.peer_id)
        except BaseException:
            # all or nothing: a peer without its keepalive would never expire
            with contextlib.suppress(BackendError, OSError):
                await self._peer_request(what, OvpnCmd.PEER_DEL, cmd.peer_id)
            sock.close()
            raise

    @staticmethod
    def _local_attr(what: str, local_ip: str, remote: api.Address) -> _Attr:
        try:
            local = _ip(local_ip.split("%")[0])
        except ValueError:
            raise BackendError(f"{what}: local_ip {local_ip!r} is not an IP address") from None
        if local.version != _ip(remote[0].split("%")[0]).version:
            raise BackendError(f"{what}: local_ip {local} and remote {remote[0]} differ in address family")
        return ["OVPN_A_PEER_LOCAL_IPV4" if local.version == 4 else "OVPN_A_PEER_LOCAL_IPV6", str(local)]

    async def _set_peer(self, cmd: api.SetPeer) -> None:
        what = "SetPeer"
        self._require_iface(what)
        keepalive = check_set_peer_keepalive(cmd)
        peer = self._peers.get(cmd.peer_id)
        attrs: list[_Attr] = [["OVPN_A_PEER_ID", cmd.peer_id]]
        remote: api.Address | None = None
        send_addr: tuple[Any, ...] | None = None
        if cmd.remote is not None:
            if peer is not None and peer.transport is api.Transport.TCP:
                raise BackendError(f"{what}: a TCP peer's remote cannot change")
            family = peer.reader.sock.family if peer is not None else None
            remote, send_addr, remote_attrs = _remote(what, family, cmd.remote)
            attrs += remote_attrs
        if keepalive:
            attrs += _keepalive_attrs(cmd.keepalive_interval, cmd.keepalive_timeout)
        await self._genl(what, OvpnCmd.PEER_SET, "OVPN_A_PEER", attrs, peer_id=cmd.peer_id)
        if peer is not None and remote is not None:
            peer.remote = remote
            peer.send_addr = send_addr

    async def _get_peer(self, cmd: api.GetPeer) -> api.PeerInfo:
        what = "GetPeer"
        self._require_iface(what)
        replies = await self._peer_request(what, OvpnCmd.PEER_GET, cmd.peer_id)
        for msg in replies:
            p = msg.get_attr("OVPN_A_PEER")
            if p is not None and p.get_attr("OVPN_A_PEER_ID") == cmd.peer_id:
                return _peer_info(cmd.peer_id, p)
        raise BackendError(f"{what}: the kernel answered PEER_GET without peer {cmd.peer_id}")

    async def _del_peer(self, cmd: api.DelPeer) -> None:
        what = "DelPeer"
        self._require_iface(what)
        peer = self._peers.get(cmd.peer_id)
        if peer is not None and peer.tcp_out:
            await self._io.flush(peer, _TCP_FLUSH_ON_DEL)  # e.g. an EXIT queued just before
        await self._peer_request(what, OvpnCmd.PEER_DEL, cmd.peer_id)
        # the kernel's PEER_DEL_NTF(USERSPACE) came before the ACK and has been forwarded;
        # should it have been lost (receive queue overrun), say it ourselves
        if cmd.peer_id in self._peers:
            self._peer_gone(cmd.peer_id, api.PeerDelReason.USERSPACE)

    async def _new_key(self, cmd: api.NewKey) -> None:
        what = "NewKey"
        self._require_iface(what)
        slot, cipher = check_new_key(cmd)
        attrs: list[_Attr] = [
            ["OVPN_A_KEYCONF_PEER_ID", cmd.peer_id],
            ["OVPN_A_KEYCONF_SLOT", slot],
            ["OVPN_A_KEYCONF_KEY_ID", cmd.key_id],
            ["OVPN_A_KEYCONF_CIPHER_ALG", CIPHER_ALG[cipher]],
            ["OVPN_A_KEYCONF_ENCRYPT_DIR", _keydir(cmd.encrypt)],
            ["OVPN_A_KEYCONF_DECRYPT_DIR", _keydir(cmd.decrypt)],
        ]
        await self._genl(what, OvpnCmd.KEY_NEW, "OVPN_A_KEYCONF", attrs, peer_id=cmd.peer_id, slot=slot)
        self._keys[(cmd.peer_id, slot)] = (cmd.key_id, cipher)

    async def _del_key(self, cmd: api.DelKey) -> None:
        what = "DelKey"
        self._require_iface(what)
        slot = check_slot(what, cmd.slot)
        attrs: list[_Attr] = [["OVPN_A_KEYCONF_PEER_ID", cmd.peer_id], ["OVPN_A_KEYCONF_SLOT", slot]]
        # an empty slot is not an error for the kernel either
        await self._genl(what, OvpnCmd.KEY_DEL, "OVPN_A_KEYCONF", attrs, peer_id=cmd.peer_id, slot=slot)
        self._keys.pop((cmd.peer_id, slot), None)

    async def _swap_keys(self, cmd: api.SwapKeys) -> None:
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

    async def _get_key(self, cmd: api.GetKey) -> api.KeyInfo:
        what = "GetKey"
        self._require_iface(what)
        slot = check_slot(what, cmd.slot)
        attrs: list[_Attr] = [["OVPN_A_KEYCONF_PEER_ID", cmd.peer_id], ["OVPN_A_KEYCONF_SLOT", slot]]
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
                cipher = api.Cipher.CHACHA20_POLY1305
            elif known is not None and known[0] == key_id and known[1] is not api.Cipher.CHACHA20_POLY1305:
                cipher = known[1]  # KEY_GET says AES-GCM, not which key size
            else:
                cipher = api.Cipher.AES_256_GCM
            return api.KeyInfo(peer_id=cmd.peer_id, slot=api.KeySlot(slot), key_id=key_id, cipher=cipher)
        raise BackendError(f"{what}: the kernel answered KEY_GET without a key")

    def _send_control(self, cmd: api.SendControl) -> None:
        what = "SendControl"
        peer = self._peers.get(cmd.peer_id)
        if peer is None:
            raise BackendError(f"{what}: unknown peer id {cmd.peer_id}")
        if not cmd.packet:
            raise BackendError(f"{what}: empty packet")
        self._io.send(what, peer, cmd.packet)

    # ------------------------------------------------------------------ netlink

    async def _ensure_channel(self, what: str) -> GenlChannel:
        if self._chan is not None:
            return self._chan
        assert self._loop is not None
        chan = GenlChannel(self._loop, self._on_notification, self._on_overrun)
        try:
            await chan.open()
            chan.join(OVPN_MCGRP_PEERS)
        except KernelError as e:
            chan.close()
            if e.code in (errno.ENOENT, errno.EOPNOTSUPP):
                raise BackendError(f"{what}: {NO_DRIVER}") from None
            if e.code in (errno.EPERM, errno.EACCES):
                raise BackendError(f"{what}: {NEED_CAP}") from None
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
        nest_attrs: list[_Attr],
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
            replies: list[ovpnmsg] = await chan.request(msg)
        except KernelError as e:
            raise self._explain(what, cmd, e, peer_id, slot) from None
        except struct.error as e:  # a value does not fit its attribute
            raise BackendError(f"{what}: a value does not fit its netlink attribute: {e}") from None
        return replies

    async def _peer_request(self, what: str, cmd: int, peer_id: int) -> list[ovpnmsg]:
        """A request that names only the peer."""
        return await self._genl(what, cmd, "OVPN_A_PEER", [["OVPN_A_PEER_ID", peer_id]], peer_id=peer_id)

    @staticmethod
    def _explain(what: str, cmd: int, e: KernelError, peer_id: int | None, slot: int | None) -> BackendError:
        op = OvpnCmd.name(cmd)
        if e.code in (errno.EPERM, errno.EACCES):
            return BackendError(f"{what}: the kernel refused {op}: {NEED_CAP}")
        text = (e.message or "").lower()
        if e.code == errno.ENOENT and peer_id is not None:
            if "slot" in text and slot is not None:
                return no_key_in_slot(what, peer_id, slot, f"kernel {op}: {e.describe()}")
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
            self._on_peer_deleted(msg.get_attr("OVPN_A_PEER"))
        elif cmd == OvpnCmd.KEY_SWAP_NTF:
            self._on_key_exhausted(msg.get_attr("OVPN_A_KEYCONF"))
        elif cmd == OvpnCmd.PEER_FLOAT_NTF:
            self._on_peer_floated(msg.get_attr("OVPN_A_PEER"))

    def _on_peer_deleted(self, p: Any) -> None:
        if p is None or p.get_attr("OVPN_A_PEER_ID") is None:
            return
        raw = p.get_attr("OVPN_A_PEER_DEL_REASON")
        try:
            reason = api.PeerDelReason(raw)
        except ValueError:
            log.warning("kernel data channel: unknown peer deletion reason %r", raw)
            reason = api.PeerDelReason.TRANSPORT_ERROR
        self._peer_gone(int(p.get_attr("OVPN_A_PEER_ID")), reason)

    def _on_key_exhausted(self, kc: Any) -> None:
        if kc is None or kc.get_attr("OVPN_A_KEYCONF_PEER_ID") is None:
            return
        peer_id = int(kc.get_attr("OVPN_A_KEYCONF_PEER_ID"))
        key_id = int(kc.get_attr("OVPN_A_KEYCONF_KEY_ID") or 0)
        for slot in (0, 1):
            if self._keys.get((peer_id, slot), (None,))[0] == key_id:
                del self._keys[(peer_id, slot)]
        log.warning("kernel data channel: key %d of peer %d exhausted its packet ids", key_id, peer_id)
        self._emit(api.KeyExhausted(peer_id, key_id))

    def _on_peer_floated(self, p: Any) -> None:
        remote = _nl_remote(p) if p is not None else None
        if p is None or remote is None or p.get_attr("OVPN_A_PEER_ID") is None:
            return
        peer_id = int(p.get_attr("OVPN_A_PEER_ID"))
        peer = self._peers.get(peer_id)
        if peer is not None and peer.transport is api.Transport.UDP:
            with contextlib.suppress(BackendError):
                peer.remote, peer.send_addr, _ = _remote("float", peer.reader.sock.family, remote)
        log.info("kernel data channel: peer %d floated to %s:%d", peer_id, *remote)
        self._emit(api.PeerFloated(peer_id, remote))

    def _on_overrun(self) -> None:
        # notifications were lost: ask the kernel which of our peers still exist
        if not self._closed and self._peers and self._loop is not None:
            self._spawn(self._resync())

    async def _resync(self) -> None:
        async with self._lock:
            for peer_id in list(self._peers):
                try:
                    await self._peer_request("resync", OvpnCmd.PEER_GET, peer_id)
                except BackendError as e:
                    if "unknown peer" in str(e):
                        self._peer_gone(peer_id, api.PeerDelReason.TEARDOWN)

    def _emit(self, notification: api.Notification) -> None:
        self._subscribers.emit(self._loop, notification)

    # ------------------------------------------------------------------ peers

    def _peer_gone(self, peer_id: int, reason: api.PeerDelReason) -> None:
        """The kernel removed a peer (or we know it will): forget it and tell the subscribers.

        Notifications about peers we no longer track (already reported, e.g. a TCP peer we
        dropped at EOF and then deleted in the kernel) are not repeated.
        """
        peer = self._peers.get(peer_id)
        if peer is None:
            return
        self._forget(peer)
        log.info("kernel data channel: peer %d deleted (%s)", peer_id, reason.name)
        self._emit(api.PeerDeleted(peer_id, reason))

    def _local_remove(self, peer: Peer, reason: api.PeerDelReason) -> None:
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
                await self._peer_request("DelPeer", OvpnCmd.PEER_DEL, peer_id)
        self._deferred_del.clear()

    def _forget(self, peer: Peer) -> None:
        if self._peers.get(peer.peer_id) is peer:
            del self._peers[peer.peer_id]
        for slot in (0, 1):
            self._keys.pop((peer.peer_id, slot), None)
        self._io.detach(peer)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise BackendError(f"{what}: the kernel backend is closed")

    def _require_iface(self, what: str) -> _Iface:
        if self._iface is None:
            raise BackendError(f"{what}: no interface; send NewIface first")
        return self._iface
