"""The keepalive lane's steering, on loopback: which datagrams the kernel hands to which socket."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator

import pytest

from pyovpn.datachannel.lane import PING_DATAGRAM_SIZE, close_lane, open_lane
from pyovpn.edge.sockets import bind_server_socket as _bind_server_socket
from tests.unit.edgefakes import recv_all

PING_LIKE = bytes([9 << 3 | 2, 0, 0, 7]) + bytes(PING_DATAGRAM_SIZE - 4)  # DATA_V2, key id 2


@pytest.fixture
def main_socket() -> Iterator[socket.socket]:
    sock = _bind_server_socket(socket.AF_INET, ("127.0.0.1", 0), dual_stack=False)
    sock.setblocking(False)
    yield sock
    sock.close()


def _send_all(port: int, datagrams: list[bytes]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        for d in datagrams:
            tx.sendto(d, ("127.0.0.1", port))


def _settle(socks: list[socket.socket], expected: int) -> list[list[bytes]]:
    """Read every socket until ``expected`` datagrams arrived in all (loopback is synchronous)."""
    got: list[list[bytes]] = [[] for _ in socks]
    for _ in range(100):
        for i, s in enumerate(socks):
            got[i] += recv_all(s)
        if sum(map(len, got)) >= expected:
            break
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()  # a syscall's worth of waiting
    return got


def test_only_ping_shaped_datagrams_take_the_lane(main_socket: socket.socket) -> None:
    lane = open_lane(main_socket)
    assert lane is not None
    port = main_socket.getsockname()[1]
    assert lane.getsockname() == main_socket.getsockname()
    others = [
        PING_LIKE[:-1],  # 39 bytes
        PING_LIKE + b"\0",  # 41 bytes: a data packet
        bytes([6 << 3]) + PING_LIKE[1:],  # DATA_V1, 40 bytes
        bytes([4 << 3]) + PING_LIKE[1:],  # P_CONTROL_V1, 40 bytes
        bytes([7 << 3]) + PING_LIKE[1:],  # P_CONTROL_HARD_RESET_CLIENT_V2
        b"",
    ]
    try:
        _send_all(port, [PING_LIKE] * 5 + others)
        main_got, lane_got = _settle([main_socket, lane], 5 + len(others))
        assert lane_got == [PING_LIKE] * 5
        assert sorted(main_got) == sorted(others)
        # every sender address and key id counts, not one flow
        _send_all(port, [bytes([9 << 3 | k]) + PING_LIKE[1:] for k in range(8)])
        main_got, lane_got = _settle([main_socket, lane], 8)
        assert len(lane_got) == 8 and main_got == []
    finally:
        close_lane(lane)
    # alone again, the main socket gets everything, pings included
    _send_all(port, [PING_LIKE, PING_LIKE + b"\0"])
    assert sorted(_settle([main_socket], 2)[0]) == sorted([PING_LIKE, PING_LIKE + b"\0"])
    # and a new lane takes its place
    lane = open_lane(main_socket)
    assert lane is not None
    try:
        _send_all(port, [PING_LIKE])
        assert _settle([main_socket, lane], 1) == [[], [PING_LIKE]]
    finally:
        close_lane(lane)


def test_a_late_joiner_gets_nothing(main_socket: socket.socket) -> None:
    lane = open_lane(main_socket)
    assert lane is not None
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        stranger.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        stranger.bind(main_socket.getsockname())  # same user (the tests run as one): it may join
        stranger.setblocking(False)
        data = [PING_LIKE, b"\x38" + bytes(60)] * 20
        _send_all(main_socket.getsockname()[1], data)
        main_got, lane_got, stranger_got = _settle([main_socket, lane, stranger], len(data))
        assert stranger_got == []
        assert len(lane_got) == 20 and len(main_got) == 20
    finally:
        stranger.close()
        close_lane(lane)


def test_a_taken_port_still_fails_to_bind(main_socket: socket.socket) -> None:
    with pytest.raises(OSError) as exc:
        _bind_server_socket(socket.AF_INET, main_socket.getsockname(), dual_stack=False)
    assert exc.value.errno == errno.EADDRINUSE
    # and a plain program (stock OpenVPN) is refused too, not let into the group
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as plain, pytest.raises(OSError) as exc:
        plain.bind(main_socket.getsockname())
    assert exc.value.errno == errno.EADDRINUSE


def test_no_lane_without_reuseport() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as plain:
        plain.bind(("127.0.0.1", 0))
        assert open_lane(plain) is None


def test_dual_stack_lane() -> None:
    if not socket.has_ipv6:
        print("skipping: no IPv6 in this Python")
        pytest.skip("no IPv6")
    try:
        # the wildcard (a specific IPv6 address makes a socket IPv6-only); traffic stays on loopback
        main = _bind_server_socket(socket.AF_INET6, ("::", 0), dual_stack=True)
    except OSError as exc:
        print(f"skipping: cannot bind ::1 ({exc})")
        pytest.skip("no IPv6 loopback")
    main.setblocking(False)
    lane = open_lane(main)
    try:
        assert lane is not None
        assert lane.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        port = main.getsockname()[1]
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as tx:
            tx.sendto(PING_LIKE, ("::1", port))
            tx.sendto(b"\x38hello", ("::1", port))
        _send_all(port, [PING_LIKE, b"\x38v4"])  # IPv4 into the dual-stack pair
        main_got, lane_got = _settle([main, lane], 4)
        assert lane_got == [PING_LIKE, PING_LIKE] and sorted(main_got) == [b"\x38hello", b"\x38v4"]
    finally:
        if lane is not None:
            close_lane(lane)
        main.close()
