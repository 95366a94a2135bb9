"""Tests for the MP peer lookup: the prefix table against a brute-force reference, the peer
router's kernel-like next-hop rules, rtnetlink route parsing and the route mirror."""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyovpn.datachannel.routing import (
    DIRECT,
    AddressInUseError,
    PeerRouter,
    PrefixTable,
    Route,
    RouteMirror,
    RouteMonitor,
    parse_route,
)

# ---------------------------------------------------------------------------- prefix table


def _mask(bits: int, plen: int) -> int:
    ones = (1 << bits) - 1
    return ones ^ (ones >> plen)


def _brute_lookup(entries: dict[tuple[int, int], int], bits: int, addr: int) -> int | None:
    best: tuple[int, int] | None = None
    for (network, plen), value in entries.items():
        if addr & _mask(bits, plen) == network and (best is None or plen > best[0]):
            best = (plen, value)
    return None if best is None else best[1]


@st.composite
def _table_case(draw: st.DrawFn, bits: int) -> tuple[list[tuple[str, int, int, int]], list[int]]:
    # a few base addresses, so prefixes nest and lookups hit them often
    bases = draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=1, max_size=4))
    ops = []
    for _ in range(draw(st.integers(0, 60))):
        base = draw(st.sampled_from(bases))
        plen = draw(st.integers(0, bits))
        op = draw(st.sampled_from(["set", "set", "set", "remove"]))
        ops.append((op, base & _mask(bits, plen), plen, draw(st.integers(0, 1000))))
    lookups = []
    for _ in range(draw(st.integers(1, 40))):
        addr = draw(st.sampled_from(bases))
        flip = draw(st.none() | st.integers(0, bits - 1))
        lookups.append(addr if flip is None else addr ^ (1 << flip))
    lookups.append(draw(st.integers(0, (1 << bits) - 1)))
    return ops, lookups


@pytest.mark.parametrize("bits", [32, 128])
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_prefix_table_matches_brute_force(bits: int, data: st.DataObject) -> None:
    ops, lookups = data.draw(_table_case(bits))
    table: PrefixTable[int] = PrefixTable(bits)
    ref: dict[tuple[int, int], int] = {}
    for op, network, plen, value in ops:
        if op == "set":
            table.set(network, plen, value)
            ref[(network, plen)] = value
        else:
            assert table.remove(network, plen) == ref.pop((network, plen), None)
        assert len(table) == len(ref)
    for addr in lookups:
        expected = _brute_lookup(ref, bits, addr)
        assert table.lookup(addr) == expected
        found = table.lookup_prefix(addr)
        assert (found[2] if found else None) == expected
        if found:
            network, plen, _ = found
            assert addr & _mask(bits, plen) == network
    assert sorted((n, p, v) for n, p, v in table) == sorted((n, p, v) for (n, p), v in ref.items())
    for (network, plen), value in ref.items():
        assert table.get(network, plen) == value


def test_prefix_table_rejects_bad_input_and_clears() -> None:
    t: PrefixTable[int] = PrefixTable(32)
    with pytest.raises(ValueError, match="host bits"):
        t.set(int(ipaddress.ip_address("10.0.0.1")), 24, 1)
    with pytest.raises(ValueError, match="prefix length 33"):
        t.set(0, 33, 1)
    with pytest.raises(ValueError, match="None"):
        t.set(0, 0, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="32 or 128"):
        PrefixTable(64)
    t.set(0, 0, 7)  # default route
    assert t.lookup(0xFFFFFFFF) == 7
    assert t.remove(0x0A000000, 8) is None
    t.clear()
    assert t.lookup(0) is None and len(t) == 0


# ---------------------------------------------------------------------------- peer router


def _ip4(s: str) -> int:
    return int(ipaddress.IPv4Address(s))


def _ip6(s: str) -> int:
    return int(ipaddress.IPv6Address(s))


def _v4_packet(src: str, dst: str) -> bytes:
    return bytes([0x45, 0, 0, 28]) + bytes(8) + socket.inet_aton(src) + socket.inet_aton(dst) + bytes(8)


def _v6_packet(src: str, dst: str) -> bytes:
    return (
        bytes([0x60, 0, 0, 0, 0, 8, 17, 64])
        + socket.inet_pton(socket.AF_INET6, src)
        + socket.inet_pton(socket.AF_INET6, dst)
        + bytes(8)
    )


class _P:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def test_router_exact_vpn_ip_then_route_gateway() -> None:
    r: PeerRouter[_P] = PeerRouter()
    a, b = _P("a"), _P("b")
    r.add_peer(a, "10.8.0.2", "fd00::2")
    r.add_peer(b, "10.8.0.3", None)
    r.routes4.set(_ip4("10.8.0.0"), 24, DIRECT)  # the connected subnet: no gateway
    r.routes4.set(_ip4("10.55.0.0"), 24, _ip4("10.8.0.3"))  # an iroute behind b
    r.routes4.set(_ip4("10.0.0.0"), 8, _ip4("10.8.0.2"))  # a shorter one behind a
    r.routes4.set(_ip4("10.77.0.0"), 16, _ip4("10.8.0.99"))  # gateway without a peer
    r.routes6.set(_ip6("fd55::"), 64, _ip6("fd00::2"))
    assert r.peer_for("10.8.0.2") is a and r.peer_for("10.8.0.3") is b
    assert r.peer_for("10.55.0.1") is b
    assert r.peer_for("10.9.9.9") is a
    # the longest route has no gateway: the kernel's next hop is the destination, no peer
    # has it, so the packet is dropped; a shorter gateway route must not catch it
    assert r.peer_for("10.8.0.77") is None
    assert r.peer_for("10.77.1.1") is None
    assert r.peer_for("192.0.2.1") is None
    assert r.peer_for("fd00::2") is a and r.peer_for("fd55::1234") is a
    assert r.peer_for("fd00::3") is None
    assert r.for_dst(_v4_packet("10.8.0.1", "10.55.0.9")) is b
    assert r.for_src(_v4_packet("10.55.0.9", "10.8.0.1")) is b
    assert r.for_src(_v4_packet("10.8.0.2", "10.8.0.1")) is a
    assert r.for_dst(_v6_packet("fd00::1", "fd55::1")) is a
    assert r.for_src(_v6_packet("fd00::2", "fd00::1")) is a
    assert r.for_src(_v6_packet("fe80::1", "fd00::1")) is None
    for junk in (b"", b"\x45" + bytes(10), b"\x60" + bytes(30), b"\x00" * 40):
        assert r.for_dst(junk) is None and r.for_src(junk) is None
    assert r.addresses(a) == ("10.8.0.2", "fd00::2")
    r.remove_peer(b)
    assert r.peer_for("10.55.0.1") is None and r.peer_for("10.8.0.3") is None
    assert r.addresses(b) == (None, None) and len(r) == 1


def test_router_rejects_conflicts_and_bad_addresses() -> None:
    r: PeerRouter[_P] = PeerRouter()
    a, b = _P("a"), _P("b")
    r.add_peer(a, "10.8.0.2", None)
    with pytest.raises(AddressInUseError) as info:
        r.add_peer(b, "10.8.0.2", None)
    assert info.value.owner is a
    with pytest.raises(ValueError, match="needs a VPN"):
        r.add_peer(b, None, None)
    with pytest.raises(ValueError, match="not an IPv4"):
        r.add_peer(b, "fd00::1", None)
    with pytest.raises(ValueError, match="not an IP address"):
        r.add_peer(b, "10.8.0", None)
    with pytest.raises(ValueError, match="cannot be"):
        r.add_peer(b, "0.0.0.0", None)
    assert r.peer_for("10.8.0.2") is a and len(r) == 1  # failed adds left nothing behind
    r.add_peer(b, None, "fd00::3")
    r.remove_peer(a)
    r.add_peer(_P("c"), "10.8.0.2", None)  # an address is free again once its peer left


# ---------------------------------------------------------------------------- rtnetlink parsing


def _attr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + bytes(-len(raw) % 4)


def _route_body(
    family: int,
    dst: str | None,
    dst_len: int,
    *,
    oif: int | None = None,
    gateway: str | None = None,
    table: int = 254,
    priority: int | None = None,
    rtype: int = 1,
    src_len: int = 0,
    extra: bytes = b"",
) -> bytes:
    body = struct.pack("=BBBBBBBBI", family, dst_len, src_len, 0, min(table, 255), 3, 0, rtype, 0)
    body += _attr(15, struct.pack("=I", table))
    if dst is not None:
        body += _attr(1, socket.inet_pton(family, dst))
    if oif is not None:
        body += _attr(4, struct.pack("=i", oif))
    if gateway is not None:
        body += _attr(5, socket.inet_pton(family, gateway))
    if priority is not None:
        body += _attr(6, struct.pack("=I", priority))
    return body + extra


def _nlmsg(mtype: int, body: bytes, *, flags: int = 0, seq: int = 0, pid: int = 0) -> bytes:
    raw = struct.pack("=IHHII", 16 + len(body), mtype, flags, seq, pid) + body
    return raw + bytes(-len(raw) % 4)


def test_parse_route_plain_gateway_and_direct() -> None:
    body = _route_body(socket.AF_INET, "10.55.0.0", 24, oif=5, gateway="10.8.0.3", priority=10)
    assert parse_route(body, 5) == Route(socket.AF_INET, _ip4("10.55.0.0"), 24, 254, 0, 10, _ip4("10.8.0.3"))
    assert parse_route(body, 6).gateway is None  # another interface: not ours
    direct = _route_body(socket.AF_INET6, "fd00::", 64, oif=5)
    assert parse_route(direct, 5) == Route(socket.AF_INET6, _ip6("fd00::"), 64, 254, 0, 0, DIRECT)
    default = _route_body(socket.AF_INET, None, 0, oif=5, gateway="10.8.0.2")
    assert parse_route(default, 5) == Route(socket.AF_INET, 0, 0, 254, 0, 0, _ip4("10.8.0.2"))
    # a route of the other family's gateway (RTA_VIA): the kernel's next hop is the destination
    via = _route_body(socket.AF_INET, "10.66.0.0", 16, oif=5, extra=_attr(18, b"\x0a\x00" + bytes(16)))
    assert parse_route(via, 5).gateway == DIRECT


def test_parse_route_skips_what_cannot_be_mirrored() -> None:
    assert parse_route(_route_body(socket.AF_INET, "10.8.0.1", 32, oif=5, table=255), 5) is None
    assert parse_route(_route_body(socket.AF_INET6, "fd00::", 64, oif=5, src_len=48), 5) is None
    assert parse_route(_route_body(socket.AF_INET, "10.8.0.0", 24, oif=5, rtype=6), 5).gateway is None
    assert parse_route(b"\x02\x18", 5) is None
    assert parse_route(_route_body(7, None, 0), 5) is None
    # truncated attribute lists end the parse without an exception
    body = _route_body(socket.AF_INET, "10.55.0.0", 24, oif=5, gateway="10.8.0.3")
    parse_route(body[:-3], 5)


def test_parse_route_multipath_picks_our_nexthop() -> None:
    def nexthop(ifindex: int, gateway: str | None) -> bytes:
        attrs = _attr(5, socket.inet_aton(gateway)) if gateway else b""
        return struct.pack("=HBBi", 8 + len(attrs), 0, 0, ifindex) + attrs

    mp = _attr(9, nexthop(3, "192.0.2.1") + nexthop(5, "10.8.0.3"))
    body = _route_body(socket.AF_INET, "10.55.0.0", 24, extra=mp)
    assert parse_route(body, 5).gateway == _ip4("10.8.0.3")
    assert parse_route(body, 4).gateway is None
    direct = _route_body(socket.AF_INET, "10.55.0.0", 24, extra=_attr(9, nexthop(5, None)))
    assert parse_route(direct, 5).gateway == DIRECT


def test_parse_route_agrees_with_pyroute2_encoder() -> None:
    from pyroute2.netlink.rtnl.rtmsg import rtmsg

    m = rtmsg()
    m["family"] = socket.AF_INET6
    m["dst_len"] = 56
    m["table"] = 254
    m["type"] = 1
    m["attrs"] = [("RTA_DST", "fd55:1::"), ("RTA_OIF", 9), ("RTA_GATEWAY", "fd00::3"), ("RTA_PRIORITY", 1024)]
    m["header"]["type"] = 24
    m.encode()
    route = parse_route(bytes(m.data)[16:], 9)
    assert route == Route(socket.AF_INET6, _ip6("fd55:1::"), 56, 254, 0, 1024, _ip6("fd00::3"))


# ---------------------------------------------------------------------------- route mirror


def _r(dst: str, plen: int, gw: int | None, *, table: int = 254, priority: int = 0) -> Route:
    ip = ipaddress.ip_address(dst)
    fam = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    return Route(fam, int(ip), plen, table, 0, priority, gw)


def test_mirror_notifications_preference_and_replace() -> None:
    router: PeerRouter[_P] = PeerRouter()
    b = _P("b")
    router.add_peer(b, "10.8.0.3", None)
    m = RouteMirror(router)
    gw_b, gw_x = _ip4("10.8.0.3"), _ip4("10.8.0.9")
    m.apply(_r("10.55.0.0", 24, gw_x, priority=20), deleted=False)
    assert router.routes4.lookup(_ip4("10.55.0.1")) == gw_x
    m.apply(_r("10.55.0.0", 24, gw_b, priority=10), deleted=False)  # a better metric wins
    assert router.peer_for("10.55.0.1") is b
    m.apply(_r("10.55.0.0", 24, gw_x, table=100), deleted=False)  # other tables rank after main
    assert router.peer_for("10.55.0.1") is b
    m.apply(_r("10.55.0.0", 24, gw_b, priority=10), deleted=True)
    assert router.routes4.lookup(_ip4("10.55.0.1")) == gw_x
    m.apply(_r("10.55.0.0", 24, None, priority=20), deleted=False)  # elsewhere, not a replace
    assert router.routes4.lookup(_ip4("10.55.0.1")) == gw_x
    m.apply(_r("10.55.0.0", 24, None, priority=20), deleted=False, replace=True)  # replaced away
    assert router.routes4.lookup(_ip4("10.55.0.1")) == gw_x  # the table-100 route remains
    m.apply(_r("10.55.0.0", 24, gw_x, table=100), deleted=True)
    assert router.routes4.lookup(_ip4("10.55.0.1")) is None
    m.apply(_r("10.55.0.0", 24, None), deleted=True)  # deleting a route elsewhere: no effect
    assert m.routes() == []


def test_mirror_resync_keeps_old_routes_until_the_dump_ends() -> None:
    router: PeerRouter[_P] = PeerRouter()
    m = RouteMirror(router)
    g1, g2, g3 = _ip4("10.8.0.2"), _ip4("10.8.0.3"), _ip4("10.8.0.4")
    m.apply(_r("10.1.0.0", 16, g1), deleted=False)
    m.apply(_r("10.2.0.0", 16, g1), deleted=False)
    m.begin_resync()
    m.apply(_r("10.1.0.0", 16, g2), deleted=False, from_dump=True)
    m.apply(_r("10.9.0.0", 16, None), deleted=False, from_dump=True)  # not ours: ignored
    assert router.routes4.lookup(_ip4("10.1.0.1")) == g1  # lookups still use the old set
    assert router.routes4.lookup(_ip4("10.2.0.1")) == g1
    m.apply(_r("fd55::", 64, _ip6("fd00::2")), deleted=False)  # a notification during the dump
    m.apply(_r("10.1.0.0", 16, g2), deleted=True)  # and a deletion after the dump saw it
    m.apply(_r("10.3.0.0", 16, g3), deleted=False, from_dump=True)
    m.end_resync()
    assert router.routes4.lookup(_ip4("10.1.0.1")) is None
    assert router.routes4.lookup(_ip4("10.2.0.1")) is None  # gone: the dump did not have it
    assert router.routes4.lookup(_ip4("10.3.0.1")) == g3
    assert router.routes6.lookup(_ip6("fd55::1")) == _ip6("fd00::2")
    assert m.routes() == [("10.3.0.0/16", "10.8.0.4"), ("fd55::/64", "fd00::2")]


class _FakeLoop:
    def __init__(self) -> None:
        self.readers: dict[int, Any] = {}
        self.timers: list[tuple[float, Any]] = []

    def add_reader(self, fd: int, cb: Any, *args: Any) -> None:
        self.readers[fd] = cb

    def remove_reader(self, fd: int) -> None:
        self.readers.pop(fd, None)

    def call_later(self, delay: float, cb: Any, *args: Any) -> Any:
        self.timers.append((delay, lambda: cb(*args)))
        return type("H", (), {"cancel": lambda self: None})()


def test_monitor_handles_dumps_notifications_and_resync_triggers() -> None:
    """The message state machine, fed synthesized netlink buffers (the socket is real but idle)."""
    loop = _FakeLoop()
    router: PeerRouter[_P] = PeerRouter()
    mon = RouteMonitor(loop, 1000, router)
    try:
        assert loop.readers and mon.mirror.resyncing and not mon.synced
        pid, seq = mon._portid, mon._dump_seq
        v4 = _route_body(socket.AF_INET, "10.55.0.0", 24, oif=1000, gateway="10.8.0.3")
        other = _route_body(socket.AF_INET, "10.66.0.0", 24, oif=2, gateway="192.0.2.1")
        mon.handle(_nlmsg(24, v4, flags=2, seq=seq, pid=pid) + _nlmsg(24, other, flags=2, seq=seq, pid=pid))
        assert router.routes4.lookup(_ip4("10.55.0.1")) is None  # staged, not live yet
        mon.handle(_nlmsg(3, b"\0\0\0\0", flags=2, seq=seq, pid=pid))  # IPv4 done: IPv6 dump next
        seq6 = mon._dump_seq
        assert seq6 != seq and mon.mirror.resyncing
        v6 = _route_body(socket.AF_INET6, "fd55::", 64, oif=1000, gateway="fd00::3")
        mon.handle(_nlmsg(24, v6, flags=2, seq=seq6, pid=pid) + _nlmsg(3, b"\0\0\0\0", seq=seq6, pid=pid))
        assert mon.synced and mon.resyncs == 1
        assert mon.mirror.routes() == [("10.55.0.0/24", "10.8.0.3"), ("fd55::/64", "fd00::3")]
        # notifications (another process's pid and seq) apply directly
        mon.handle(_nlmsg(25, v4, seq=77, pid=4242))
        assert mon.mirror.routes() == [("fd55::/64", "fd00::3")]
        # an address change on our interface starts a resync; on another interface it does not
        ifaddr = struct.pack("=BBBBI", socket.AF_INET, 24, 0, 0, 7)
        mon.handle(_nlmsg(21, ifaddr))
        assert not mon.mirror.resyncing
        mon.handle(_nlmsg(21, struct.pack("=BBBBI", socket.AF_INET, 24, 0, 0, 1000)))
        assert mon.mirror.resyncing
        seq = mon._dump_seq
        # a second trigger during the dump, and an interrupted dump, both ask for one more
        mon.handle(_nlmsg(16, struct.pack("=BBHiII", 0, 0, 0, 1000, 0, 0)))
        mon.handle(_nlmsg(3, b"\0\0\0\0", flags=2 | 0x10, seq=seq, pid=pid))
        seq6 = mon._dump_seq
        mon.handle(_nlmsg(3, b"\0\0\0\0", seq=seq6, pid=pid))
        assert mon.resyncs == 2 and mon.mirror.resyncing  # the follow-up dump runs
        assert mon.mirror.routes() == []  # the empty dump replaced everything
        # a failed dump is retried later, not in a tight loop
        mon.handle(_nlmsg(2, struct.pack("=i", -16) + bytes(16), seq=mon._dump_seq, pid=pid))
        assert not mon.mirror.resyncing and loop.timers and loop.timers[-1][0] == RouteMonitor.RETRY_SECONDS
        loop.timers[-1][1]()
        assert mon.mirror.resyncing
        # a dump whose end never arrives is abandoned after a while and retried
        delay, timeout = loop.timers[-1]
        assert delay == RouteMonitor.DUMP_TIMEOUT
        timeout()
        assert not mon.mirror.resyncing and loop.timers[-1][0] == RouteMonitor.RETRY_SECONDS
    finally:
        mon.close()
    assert not loop.readers
