"""net/mmsg.py: recvmmsg through ctypes, checked against the socket module on real loopback sockets."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from pyovpn.net import mmsg
from pyovpn.net.sockets import SOL_UDP, UDP_GRO, UDP_SEGMENT

pytestmark = pytest.mark.skipif(not mmsg.available(), reason="recvmmsg with the LP64 Linux layout is missing")


def _pair(family: int, host: str) -> tuple[socket.socket, socket.socket]:
    r = socket.socket(family, socket.SOCK_DGRAM)
    r.bind((host, 0))
    r.setblocking(False)
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((host, 0))
    return r, s


@pytest.mark.parametrize(
    ("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")], ids=["ipv4", "ipv6"]
)
def test_datagrams_lengths_and_senders_match_recvfrom(family: int, host: str) -> None:
    r, s = _pair(family, host)
    s2 = socket.socket(family, socket.SOCK_DGRAM)
    s2.bind((host, 0))
    buf = bytearray(8 * mmsg.SLOT)
    rcv = mmsg.BatchReceiver(r.fileno(), buf, 8)
    try:
        payloads = [os.urandom(n) for n in (1, 1400, 0, 9000, 77)]
        senders = [s, s2, s, s, s2]
        for p, who in zip(payloads, senders, strict=True):
            who.sendto(p, r.getsockname())
        n = rcv.recv()
        assert n == len(payloads)
        lens, addrs, segs, truncated = rcv.results(n)
        assert lens == [len(p) for p in payloads]
        assert segs == [0] * n and truncated == [False] * n
        for i, p in enumerate(payloads):
            assert bytes(buf[i * mmsg.SLOT : i * mmsg.SLOT + len(p)]) == p
        # the same tuples the socket module makes for these senders
        assert addrs == [who.getsockname() for who in senders]
        assert rcv.recv() == 0  # drained: EAGAIN is "nothing", not an error
    finally:
        for x in (r, s, s2):
            x.close()


def test_v4_mapped_sender_on_a_dual_stack_socket() -> None:
    r = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    r.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    r.bind(("::", 0))
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    ref = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    ref.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    ref.bind(("::", 0))
    ref.settimeout(2)
    try:
        s.sendto(b"x", ("127.0.0.1", r.getsockname()[1]))
        s.sendto(b"y", ("127.0.0.1", ref.getsockname()[1]))
        buf = bytearray(2 * mmsg.SLOT)
        rcv = mmsg.BatchReceiver(r.fileno(), buf, 2)
        for _ in range(100):
            n = rcv.recv()
            if n:
                break
        assert n == 1
        _lens, addrs, _segs, _t = rcv.results(n)
        _data, expected = ref.recvfrom(10)
        assert addrs == [expected]
        assert addrs[0][0] == "::ffff:127.0.0.1"
    finally:
        for x in (r, s, ref):
            x.close()


def test_a_gro_batch_reports_its_segment_size() -> None:
    r, s = _pair(socket.AF_INET, "127.0.0.1")
    try:
        r.setsockopt(SOL_UDP, UDP_GRO, 1)
        s.setsockopt(SOL_UDP, UDP_SEGMENT, 1000)
    except OSError as e:  # pragma: no cover - an old kernel
        pytest.skip(f"UDP GSO/GRO not available: {e}")
    try:
        payload = os.urandom(3500)  # 1000 + 1000 + 1000 + 500 on the wire
        s.sendto(payload, r.getsockname())
        buf = bytearray(4 * mmsg.SLOT)
        rcv = mmsg.BatchReceiver(r.fileno(), buf, 4)
        n = rcv.recv()
        lens, _addrs, segs, _t = rcv.results(n)
        # loopback hands the GSO packet to a GRO socket whole; every byte arrives in order
        assert sum(lens) == 3500
        assert (
            b"".join(bytes(buf[i * mmsg.SLOT : i * mmsg.SLOT + ln]) for i, ln in enumerate(lens)) == payload
        )
        if n == 1:
            assert segs == [1000]
        else:
            assert lens == [1000, 1000, 1000, 500]
    finally:
        r.close()
        s.close()


def test_gro_size_parser_skips_other_cmsgs_and_stops_on_garbage() -> None:
    ctl = bytearray(64)
    # a foreign cmsg (level 0, type 1, 4 bytes of data) then UDP_GRO = 1400
    struct.pack_into("=Qii", ctl, 0, 20, 0, 1)
    struct.pack_into("=Qii", ctl, 24, 20, SOL_UDP, UDP_GRO)
    struct.pack_into("=i", ctl, 40, 1400)
    assert mmsg._gro_size(ctl, 0, 44) == 1400
    assert mmsg._gro_size(bytearray(64), 0, 64) == 0  # cmsg_len 0: no loop forever
    assert mmsg._gro_size(ctl, 0, 10) == 0  # too short for a header


def test_unknown_families_and_short_addresses_give_none() -> None:
    assert mmsg.sockaddr_tuple(b"") is None
    assert mmsg.sockaddr_tuple(socket.AF_UNIX.to_bytes(2, "little") + b"\0" * 20) is None
    assert mmsg.sockaddr_tuple(socket.AF_INET6.to_bytes(2, "little") + b"\0" * 10) is None


def test_buffer_too_small_is_refused() -> None:
    with pytest.raises(ValueError, match="needs"):
        mmsg.BatchReceiver(0, bytearray(mmsg.SLOT), 2)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_slot_buffer_pages_become_resident_only_where_written() -> None:
    """A receiver's 2 MiB of slots must not cost 2 MiB of RSS (a P2MP server has one per socket)."""
    r, s = _pair(socket.AF_INET, "127.0.0.1")
    try:
        before = _resident_bytes()
        buf = mmsg.slot_buffer(32)
        rcv = mmsg.BatchReceiver(r.fileno(), buf, 32)
        for _ in range(4):
            s.sendto(b"p" * 1400, r.getsockname())
        assert rcv.recv() == 4
        grown = _resident_bytes() - before
        assert len(buf) == 32 * mmsg.SLOT
        assert grown < (1 << 20), f"{grown} bytes became resident for 4 datagrams"
        assert bytes(buf[mmsg.SLOT : mmsg.SLOT + 1400]) == b"p" * 1400
    finally:
        r.close()
        s.close()
