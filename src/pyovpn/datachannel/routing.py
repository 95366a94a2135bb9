"""Peer selection for the multipoint (MP) data channel: prefix tables and a mirror of system routes.

The kernel ``ovpn`` driver in MP mode picks the peer for an outgoing packet from the route
the kernel chose for it: the route's gateway (or, for a route without one, the destination)
is looked up among the peers' VPN addresses (``ovpn_peer_get_by_dst``). An iroute is
therefore just an ordinary route through the ovpn device with the client's VPN IP as its
gateway, and the reverse-path check on decrypted packets (``ovpn_peer_check_by_src``) does the
same lookup for the source address and drops the packet unless it names the sending peer.

A TUN device does not tell userspace which route sent a packet its way, so the userspace
backend keeps its own copy of the routes through its interface and repeats the lookup:

* :class:`PrefixTable`: longest-prefix match over one address family, one dict per prefix
  length, probed from the longest length present to the shortest (a /32 or /128 host entry
  is therefore the first, single dict probe).
* :class:`PeerRouter`: the per-packet lookup. The exact VPN address of a peer wins; otherwise
  the longest route through the interface gives the next hop, which must again be a peer's
  VPN address. Routes without a gateway point at :data:`DIRECT` (the next hop is the
  destination itself, which already missed), so they end the search exactly as the kernel's
  FIB lookup would end it, instead of letting a shorter gateway route catch the packet.
* :class:`RouteMirror`: the route entries through one interface, with the kernel's choice
  among routes to the same prefix (main table first, then lowest metric), fed from rtnetlink.
* :class:`RouteMonitor`: a non-blocking rtnetlink socket on the asyncio loop. It subscribes
  to route, address and link notifications, applies route changes incrementally and dumps
  the routes through the interface again (a "resync") at start, when the socket overflowed
  (ENOBUFS: notifications were lost), when a dump was interrupted (NLM_F_DUMP_INTR) and when
  an address or the link state of the interface changes, because the kernel then flushes
  IPv4 routes silently, without RTM_DELROUTE. During a resync lookups keep using the old
  routes; the new set replaces them when the dump ends. The dump asks the kernel to filter
  by output interface (NETLINK_GET_STRICT_CHK, Linux >= 4.20), and filters again itself.

The netlink socket is plain ``socket.AF_NETLINK`` with a small parser for ``rtmsg`` rather
than pyroute2: pyroute2's synchronous API cannot run inside a thread with a running asyncio
loop (see :mod:`pyovpn.net.tun`), and a socket read by the loop itself needs no thread and
sees notifications in order with the dump on the same socket.

Policy routing is not modelled: every table but ``local`` counts, and for one prefix the
main table wins. Source-specific IPv6 routes (``from ...``) are ignored. Of a multipath route
the first next hop through the interface counts.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any, Generic, NamedTuple, TypeVar

from pyovpn.net import rxbuf
from pyovpn.net.sockbuf import grow_buffers

__all__ = [
    "DIRECT",
    "AddressInUseError",
    "PeerRouter",
    "PrefixTable",
    "Route",
    "RouteMirror",
    "RouteMonitor",
    "parse_route",
]

log = logging.getLogger(__name__)

V = TypeVar("V")
P = TypeVar("P")

DIRECT = -1  # a route through the interface without a gateway: the next hop is the destination

_AF_BITS = {socket.AF_INET: 32, socket.AF_INET6: 128}
_BE32 = struct.Struct(">I")  # unpack_from is several times faster than int.from_bytes on a slice
_BE128 = struct.Struct(">QQ")


# ---------------------------------------------------------------------------- prefix table


class PrefixTable(Generic[V]):
    """Longest-prefix match for one address family; addresses are ints, values never None."""

    __slots__ = ("_bits", "_by_len", "_levels")

    def __init__(self, bits: int) -> None:
        if bits not in (32, 128):
            raise ValueError(f"address width must be 32 or 128 bits, got {bits}")
        self._bits = bits
        self._by_len: dict[int, dict[int, V]] = {}
        # (mask, entries) from the longest prefix length present to the shortest
        self._levels: tuple[tuple[int, dict[int, V]], ...] = ()

    @property
    def bits(self) -> int:
        return self._bits

    def _mask(self, prefixlen: int) -> int:
        all_ones = (1 << self._bits) - 1
        return all_ones ^ (all_ones >> prefixlen)

    def _check(self, network: int, prefixlen: int) -> None:
        if not 0 <= prefixlen <= self._bits:
            raise ValueError(f"prefix length {prefixlen} out of range 0..{self._bits}")
        if not 0 <= network < (1 << self._bits):
            raise ValueError(f"network {network:#x} does not fit {self._bits} bits")
        if network & ~self._mask(prefixlen):
            raise ValueError(f"network {network:#x} has host bits set for /{prefixlen}")

    def _relevel(self) -> None:
        self._levels = tuple((self._mask(n), self._by_len[n]) for n in sorted(self._by_len, reverse=True))

    def set(self, network: int, prefixlen: int, value: V) -> None:
        """Add or replace the entry for ``network/prefixlen``."""
        if value is None:
            raise ValueError("a prefix table value must not be None")
        self._check(network, prefixlen)
        level = self._by_len.get(prefixlen)
        if level is None:
            level = self._by_len[prefixlen] = {}
            self._relevel()
        level[network] = value

    def remove(self, network: int, prefixlen: int) -> V | None:
        """Remove the entry for exactly ``network/prefixlen``; return its value (None if absent)."""
        level = self._by_len.get(prefixlen)
        if level is None:
            return None
        value = level.pop(network, None)
        if not level:
            del self._by_len[prefixlen]
            self._relevel()
        return value

    def get(self, network: int, prefixlen: int) -> V | None:
        """The value stored for exactly ``network/prefixlen`` (no longest-prefix match)."""
        level = self._by_len.get(prefixlen)
        return None if level is None else level.get(network)

    def lookup(self, addr: int) -> V | None:
        """The value of the longest prefix containing ``addr``, or None."""
        for mask, level in self._levels:
            value = level.get(addr & mask)
            if value is not None:
                return value
        return None

    def lookup_prefix(self, addr: int) -> tuple[int, int, V] | None:
        """Like :meth:`lookup`, also naming the matching prefix: ``(network, prefixlen, value)``."""
        for prefixlen in sorted(self._by_len, reverse=True):
            network = addr & self._mask(prefixlen)
            value = self._by_len[prefixlen].get(network)
            if value is not None:
                return network, prefixlen, value
        return None

    def clear(self) -> None:
        self._by_len.clear()
        self._levels = ()

    def __len__(self) -> int:
        return sum(len(level) for level in self._by_len.values())

    def __iter__(self) -> Iterator[tuple[int, int, V]]:
        for prefixlen in sorted(self._by_len, reverse=True):
            for network, value in self._by_len[prefixlen].items():
                yield network, prefixlen, value


# ---------------------------------------------------------------------------- peer router


class AddressInUseError(ValueError):
    """A VPN address is already assigned to another peer (the kernel says -EADDRINUSE)."""

    def __init__(self, address: str, owner: Any) -> None:
        super().__init__(f"VPN address {address} is already in use")
        self.address = address
        self.owner = owner


def _parse_vpn_ip(text: str, version: int, label: str) -> int:
    try:
        ip = ipaddress.ip_address(text)
    except (ValueError, TypeError):
        raise ValueError(f"{label} {text!r} is not an IP address") from None
    if ip.version != version:
        raise ValueError(f"{label} {text!r} is not an IPv{version} address")
    if ip.is_unspecified or ip.is_multicast:
        raise ValueError(f"{label} {text!r} cannot be a peer's VPN address")
    return int(ip)


def _by_header_address(
    v4_at: int, v6_at: int, doc: str
) -> Callable[[PeerRouter[P], bytes | bytearray | memoryview], P | None]:
    """A :class:`PeerRouter` lookup by the address at ``v4_at`` (IPv4) or ``v6_at`` (IPv6) in a packet."""

    def lookup(self: PeerRouter[P], pkt: bytes | bytearray | memoryview) -> P | None:
        n = len(pkt)
        if not n:
            return None
        version = pkt[0] >> 4
        if version == 4:
            if n < 20:
                return None
            addr = _BE32.unpack_from(pkt, v4_at)[0]
            vpn = self.vpn4
        elif version == 6:
            if n < 40:
                return None
            hi, lo = _BE128.unpack_from(pkt, v6_at)
            addr = (hi << 64) | lo
            vpn = self.vpn6
        else:
            return None
        peer = vpn.get(addr)
        if peer is None:
            hop = (self.routes4 if version == 4 else self.routes6).lookup(addr)
            if hop is not None:
                peer = vpn.get(hop)  # DIRECT (-1) is never a key
        return peer

    lookup.__doc__ = doc
    return lookup


class PeerRouter(Generic[P]):
    """Which peer an IP packet goes to (by destination) or may come from (by source).

    ``vpn4``/``vpn6`` map VPN addresses (ints) to peers; ``routes4``/``routes6`` map
    prefixes through the interface to next-hop addresses (ints) or :data:`DIRECT`.
    """

    __slots__ = ("_addrs", "routes4", "routes6", "vpn4", "vpn6")

    def __init__(self) -> None:
        self.vpn4: dict[int, P] = {}
        self.vpn6: dict[int, P] = {}
        self.routes4: PrefixTable[int] = PrefixTable(32)
        self.routes6: PrefixTable[int] = PrefixTable(128)
        self._addrs: dict[P, tuple[int | None, int | None]] = {}

    # -------------------------------------------------------------- peers

    def add_peer(self, peer: P, vpn_ipv4: str | None, vpn_ipv6: str | None) -> None:
        """Register ``peer``'s VPN addresses; ValueError if malformed, AddressInUseError if taken."""
        if vpn_ipv4 is None and vpn_ipv6 is None:
            raise ValueError("a peer needs a VPN IPv4 or IPv6 address in MP mode")
        if peer in self._addrs:
            raise ValueError("peer is already registered")
        a4 = _parse_vpn_ip(vpn_ipv4, 4, "vpn_ipv4") if vpn_ipv4 is not None else None
        a6 = _parse_vpn_ip(vpn_ipv6, 6, "vpn_ipv6") if vpn_ipv6 is not None else None
        if a4 is not None and (owner := self.vpn4.get(a4)) is not None:
            raise AddressInUseError(str(ipaddress.IPv4Address(a4)), owner)
        if a6 is not None and (owner := self.vpn6.get(a6)) is not None:
            raise AddressInUseError(str(ipaddress.IPv6Address(a6)), owner)
        if a4 is not None:
            self.vpn4[a4] = peer
        if a6 is not None:
            self.vpn6[a6] = peer
        self._addrs[peer] = (a4, a6)

    def remove_peer(self, peer: P) -> None:
        """Forget ``peer``'s VPN addresses (routes through them stay, and then lead nowhere)."""
        a4, a6 = self._addrs.pop(peer, (None, None))
        if a4 is not None and self.vpn4.get(a4) is peer:
            del self.vpn4[a4]
        if a6 is not None and self.vpn6.get(a6) is peer:
            del self.vpn6[a6]

    def addresses(self, peer: P) -> tuple[str | None, str | None]:
        a4, a6 = self._addrs.get(peer, (None, None))
        return (
            str(ipaddress.IPv4Address(a4)) if a4 is not None else None,
            str(ipaddress.IPv6Address(a6)) if a6 is not None else None,
        )

    def __len__(self) -> int:
        return len(self._addrs)

    # -------------------------------------------------------------- lookups

    def peer_for(self, address: str) -> P | None:
        """The peer for an address given as text (for tests and diagnostics), as the packet lookups."""
        ip = ipaddress.ip_address(address)
        vpn, routes = (self.vpn4, self.routes4) if ip.version == 4 else (self.vpn6, self.routes6)
        peer = vpn.get(int(ip))
        if peer is None and (hop := routes.lookup(int(ip))) is not None:
            peer = vpn.get(hop)
        return peer

    # one lookup for both directions, specialised per header offset (no extra call per packet)
    for_dst = _by_header_address(
        16, 24, "The peer an IP packet read from the interface goes to, or None (drop it)."
    )
    for_src = _by_header_address(
        12, 8, "The only peer allowed to send this decrypted IP packet (reverse-path check), or None."
    )

    def set_routes(self, routes4: PrefixTable[int], routes6: PrefixTable[int]) -> None:
        """Swap in complete route tables (lookups see either the old or the new set)."""
        if routes4.bits != 32 or routes6.bits != 128:
            raise ValueError("routes4 must be a 32-bit table and routes6 a 128-bit one")
        self.routes4 = routes4
        self.routes6 = routes6


# ---------------------------------------------------------------------------- rtnetlink parsing

RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_NEWROUTE = 24
RTM_DELROUTE = 25
RTM_GETROUTE = 26
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_DUMP_INTR = 0x10
NLM_F_REPLACE = 0x100
NLM_F_DUMP = 0x300
RTN_UNICAST = 1
RT_TABLE_MAIN = 254
RT_TABLE_LOCAL = 255
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_PRIORITY = 6
RTA_MULTIPATH = 9
RTA_TABLE = 15
RTA_VIA = 18
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
SOL_NETLINK = 270
NETLINK_GET_STRICT_CHK = 12

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
_RTATTR = struct.Struct("=HH")  # len, type
_RTNEXTHOP = struct.Struct("=HBBi")  # len, flags, hops, ifindex
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")


class Route(NamedTuple):
    """One route as the mirror sees it. ``gateway`` is an int, :data:`DIRECT`, or None when
    the route does not go through the watched interface (or is not a plain unicast route)."""

    family: int
    dst: int
    dst_len: int
    table: int
    tos: int
    priority: int
    gateway: int | None


def _attrs(buf: memoryview) -> Iterator[tuple[int, memoryview]]:
    off = 0
    end = len(buf)
    while off + 4 <= end:
        length, kind = _RTATTR.unpack_from(buf, off)
        if length < 4 or off + length > end:
            return
        yield kind & 0x3FFF, buf[off + 4 : off + length]  # strip NLA_F_NESTED/NET_BYTEORDER
        off += (length + 3) & ~3


def parse_route(body: bytes | bytearray | memoryview, ifindex: int) -> Route | None:
    """Parse the payload of an RTM_NEWROUTE/RTM_DELROUTE message (after the nlmsghdr).

    Returns None for routes the mirror never tracks (not IPv4/IPv6, the ``local`` table,
    source-specific routes, malformed messages).
    """
    mv = memoryview(body)
    if len(mv) < _RTMSG.size:
        return None
    family, dst_len, src_len, tos, table, _proto, _scope, rtype, _flags = _RTMSG.unpack_from(mv)
    bits = _AF_BITS.get(family)
    if bits is None or src_len or dst_len > bits:
        return None
    alen = bits // 8
    dst = 0
    oif = 0
    gateway: int | None = None
    via = False
    priority = 0
    multipath: memoryview | None = None
    for kind, value in _attrs(mv[_RTMSG.size :]):
        if kind == RTA_DST and len(value) == alen:
            dst = int.from_bytes(value, "big")
        elif kind == RTA_OIF and len(value) >= 4:
            oif = _I32.unpack_from(value)[0]
        elif kind == RTA_GATEWAY and len(value) == alen:
            gateway = int.from_bytes(value, "big")
        elif kind == RTA_VIA:
            via = True  # a gateway of the other family: the kernel's next hop is the destination
        elif kind == RTA_PRIORITY and len(value) >= 4:
            priority = _U32.unpack_from(value)[0]
        elif kind == RTA_TABLE and len(value) >= 4:
            table = _U32.unpack_from(value)[0]
        elif kind == RTA_MULTIPATH:
            multipath = value
    if table == RT_TABLE_LOCAL:
        return None
    dst &= ((1 << bits) - 1) ^ (((1 << bits) - 1) >> dst_len)
    hop: int | None = None
    if rtype == RTN_UNICAST:
        if oif == ifindex:
            hop = DIRECT if via or gateway is None else gateway
        elif multipath is not None:
            hop = _multipath_hop(multipath, ifindex, alen)
    return Route(family, dst, dst_len, table, tos, priority, hop)


def _multipath_hop(buf: memoryview, ifindex: int, alen: int) -> int | None:
    off = 0
    end = len(buf)
    while off + _RTNEXTHOP.size <= end:
        length, _flags, _hops, index = _RTNEXTHOP.unpack_from(buf, off)
        if length < _RTNEXTHOP.size or off + length > end:
            return None
        if index == ifindex:
            gateway: int = DIRECT
            for kind, value in _attrs(buf[off + _RTNEXTHOP.size : off + length]):
                if kind == RTA_GATEWAY and len(value) == alen:
                    gateway = int.from_bytes(value, "big")
            return gateway
        off += (length + 3) & ~3
    return None


# ---------------------------------------------------------------------------- the mirror

_PrefixKey = tuple[int, int, int]  # family, dst, dst_len
_RouteKey = tuple[int, int, int]  # table, tos, priority


def _preference(key: _RouteKey) -> tuple[bool, bool, int, int, int]:
    table, tos, priority = key
    return (table != RT_TABLE_MAIN, tos != 0, priority, table, tos)


class RouteMirror:
    """The routes through one interface and, per prefix, the one the kernel would use.

    :meth:`apply` takes notifications; :meth:`begin_resync`, :meth:`apply` with
    ``from_dump=True`` and :meth:`end_resync` replace everything with a fresh dump while
    lookups keep using the previous routes. Notifications that arrive during a dump go to
    both the live set and the one being built, in the order the socket delivered them.
    """

    def __init__(self, router: PeerRouter[Any], on_change: Callable[[], None] | None = None) -> None:
        self.router = router
        # called after the router's live routes changed (the offload engine copies them to its workers)
        self.on_change = on_change
        self._routes: dict[_PrefixKey, dict[_RouteKey, int]] = {}
        self._staging: dict[_PrefixKey, dict[_RouteKey, int]] | None = None

    @property
    def resyncing(self) -> bool:
        return self._staging is not None

    def routes(self) -> list[tuple[str, str | None]]:
        """The live routes as ``(prefix, gateway)``, gateway None for a route without one."""
        out: list[tuple[str, str | None]] = []
        for (family, dst, dst_len), entries in self._routes.items():
            hop = entries[min(entries, key=_preference)]
            v4 = family == socket.AF_INET
            ip_type = ipaddress.IPv4Address if v4 else ipaddress.IPv6Address
            out.append((f"{ip_type(dst)}/{dst_len}", None if hop == DIRECT else str(ip_type(hop))))
        return sorted(out)

    def apply(self, route: Route, *, deleted: bool, replace: bool = False, from_dump: bool = False) -> None:
        """One route from a dump or notification. ``replace`` is NLM_F_REPLACE on a new route."""
        pkey = (route.family, route.dst, route.dst_len)
        rkey = (route.table, route.tos, route.priority)
        if from_dump:
            if self._staging is not None and route.gateway is not None and not deleted:
                self._staging.setdefault(pkey, {})[rkey] = route.gateway
            return
        if route.gateway is not None and not deleted:
            gone = False
        elif deleted and route.gateway is not None:
            gone = True  # one of ours was deleted
        elif not deleted and replace:
            gone = True  # ours (if it was) was replaced by a route elsewhere
        else:
            return  # a route elsewhere came or went: not ours
        for store, live in ((self._routes, True), (self._staging, False)):
            if store is None:
                continue
            entries = store.get(pkey)
            if gone:
                if entries is None or entries.pop(rkey, None) is None:
                    continue
                if not entries:
                    del store[pkey]
            else:
                assert route.gateway is not None
                store.setdefault(pkey, {})[rkey] = route.gateway
            if live:
                self._publish(pkey)

    def _publish(self, pkey: _PrefixKey) -> None:
        family, dst, dst_len = pkey
        table = self.router.routes4 if family == socket.AF_INET else self.router.routes6
        entries = self._routes.get(pkey)
        if entries:
            table.set(dst, dst_len, entries[min(entries, key=_preference)])
        else:
            table.remove(dst, dst_len)
        if self.on_change is not None:
            self.on_change()

    def begin_resync(self) -> None:
        self._staging = {}

    def abort_resync(self) -> None:
        self._staging = None

    def end_resync(self) -> None:
        if self._staging is None:
            return
        self._routes = self._staging
        self._staging = None
        routes4: PrefixTable[int] = PrefixTable(32)
        routes6: PrefixTable[int] = PrefixTable(128)
        for (family, dst, dst_len), entries in self._routes.items():
            table = routes4 if family == socket.AF_INET else routes6
            table.set(dst, dst_len, entries[min(entries, key=_preference)])
        self.router.set_routes(routes4, routes6)
        if self.on_change is not None:
            self.on_change()


# ---------------------------------------------------------------------------- the monitor


class RouteMonitor:
    """Keeps a :class:`RouteMirror` in step with the kernel's routes through ``ifindex``.

    Runs on ``loop`` (call it from the loop's thread: the netlink socket belongs to the
    calling thread's network namespace). See the module docstring for the strategy.
    """

    RETRY_SECONDS = 1.0
    DUMP_TIMEOUT = 10.0  # a dump that never ends (a lost NLMSG_DONE) is abandoned and retried
    _RECV_SIZE = 1 << 18
    _READS_PER_WAKEUP = 64

    def __init__(
        self, loop: Any, ifindex: int, router: PeerRouter[Any], on_change: Callable[[], None] | None = None
    ) -> None:
        self.ifindex = ifindex
        self.mirror = RouteMirror(router, on_change)
        self.resyncs = 0  # completed dumps
        self.overflows = 0  # ENOBUFS: notifications were lost
        self._loop = loop
        self._seq = 0
        self._dump_seq = -1
        self._pending_families: list[int] = []
        self._again = False
        self._filter = True
        self._retry: Any = None
        self._dump_timer: Any = None
        self._closed = False
        sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, 0
        )
        try:
            grow_buffers(sock, 4 << 20, send=False)
            try:
                sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
            except OSError:
                self._filter = False  # old kernel: dump everything and filter here
            sock.bind(
                (
                    0,
                    RTMGRP_LINK
                    | RTMGRP_IPV4_IFADDR
                    | RTMGRP_IPV4_ROUTE
                    | RTMGRP_IPV6_IFADDR
                    | RTMGRP_IPV6_ROUTE,
                )
            )
            self._portid = sock.getsockname()[0]
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        loop.add_reader(sock.fileno(), self._on_readable)
        self.resync()

    @property
    def synced(self) -> bool:
        """True once a first dump completed and no resync is running."""
        return self.resyncs > 0 and not self._pending_families and not self.mirror.resyncing

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for timer in (self._retry, self._dump_timer):
            if timer is not None:
                timer.cancel()
        self._retry = self._dump_timer = None
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()

    def resync(self) -> None:
        """Dump the routes again (after the running dump, if one runs)."""
        if self._closed:
            return
        if self.mirror.resyncing:
            self._again = True
            return
        self._again = False
        self.mirror.begin_resync()
        self._pending_families = [socket.AF_INET, socket.AF_INET6]
        self._next_dump()

    def _next_dump(self) -> None:
        family = self._pending_families.pop(0)
        self._seq = (self._seq + 1) & 0x7FFFFFFF or 1
        self._dump_seq = self._seq
        body = _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)
        if self._filter:
            body += _RTATTR.pack(8, RTA_OIF) + _I32.pack(self.ifindex)
        msg = _NLMSGHDR.pack(16 + len(body), RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, self._seq, 0) + body
        self._cancel_dump_timer()
        try:
            self._sock.send(msg)
        except OSError as e:
            log.warning("route monitor: cannot request a route dump: %s; retrying", e)
            self._fail_dump()
            return
        self._dump_timer = self._loop.call_later(self.DUMP_TIMEOUT, self._dump_timed_out, self._seq)

    def _cancel_dump_timer(self) -> None:
        if self._dump_timer is not None:
            self._dump_timer.cancel()
            self._dump_timer = None

    def _dump_timed_out(self, seq: int) -> None:
        self._dump_timer = None
        if seq == self._dump_seq and self.mirror.resyncing and not self._closed:
            log.warning("route monitor: a route dump did not finish; retrying")
            self._fail_dump()

    def _fail_dump(self) -> None:
        self._cancel_dump_timer()
        self.mirror.abort_resync()
        self._pending_families = []
        self._dump_seq = -1
        if self._retry is None and not self._closed:
            self._retry = self._loop.call_later(self.RETRY_SECONDS, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        self.resync()

    def _on_readable(self) -> None:
        for _ in range(self._READS_PER_WAKEUP):
            if self._closed:
                return
            try:
                data = rxbuf.recv(self._sock, self._RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self.overflows += 1
                    log.info("route monitor: netlink overflow, routes will be dumped again")
                    self.resync()  # after the running dump, if any
                    continue
                log.warning("route monitor: netlink receive failed: %s", e)
                return
            self.handle(data)

    def handle(self, data: bytes) -> None:
        """Process a buffer of netlink messages (public for tests)."""
        mv = memoryview(data)
        off = 0
        end = len(mv)
        while off + _NLMSGHDR.size <= end:
            length, mtype, flags, seq, pid = _NLMSGHDR.unpack_from(mv, off)
            if length < _NLMSGHDR.size or off + length > end:
                return
            body = mv[off + _NLMSGHDR.size : off + length]
            off += (length + 3) & ~3
            dump = seq == self._dump_seq and pid == self._portid and self.mirror.resyncing
            if dump and flags & NLM_F_DUMP_INTR:
                self._again = True  # the table changed under the dump: do it once more
            if mtype in (RTM_NEWROUTE, RTM_DELROUTE):
                route = parse_route(body, self.ifindex)
                if route is not None:
                    self.mirror.apply(
                        route,
                        deleted=mtype == RTM_DELROUTE,
                        replace=bool(flags & NLM_F_REPLACE),
                        from_dump=dump,
                    )
            elif mtype in (RTM_NEWADDR, RTM_DELADDR, RTM_NEWLINK, RTM_DELLINK):
                # both start with a 4-byte-aligned index at offset 4; address removal and
                # link down flush IPv4 routes without RTM_DELROUTE
                if len(body) >= 8 and _I32.unpack_from(body, 4)[0] == self.ifindex:
                    self.resync()
            elif mtype == NLMSG_DONE and dump:
                self._dump_seq = -1
                self._cancel_dump_timer()
                if self._pending_families:
                    self._next_dump()
                else:
                    self.mirror.end_resync()
                    self.resyncs += 1
                    if self._again:
                        self.resync()
            elif mtype == NLMSG_ERROR and dump:
                code = -_I32.unpack_from(body)[0] if len(body) >= 4 else 0
                if code and self._filter and code in (errno.EINVAL, errno.EOPNOTSUPP):
                    log.info("route monitor: kernel refuses filtered route dumps; filtering here")
                    self._filter = False
                    self._cancel_dump_timer()
                    self.mirror.abort_resync()
                    self._pending_families = []
                    self._dump_seq = -1
                    self.resync()
                elif code:
                    log.warning("route monitor: route dump failed: %s; retrying", os.strerror(code))
                    self._fail_dump()
