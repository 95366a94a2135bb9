"""The P2P stranger filter (datachannel/strangers.py) decides in the kernel exactly as the data
path's own check does: real sockets on loopback, real datagrams, the kernel's verdict read back."""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Iterator

import pytest

from pyovpn.datachannel import strangers
from pyovpn.proto.packets import MIN_FIRST_PACKET_LEN, OPCODE_DATA_V1, OPCODE_DATA_V2, STRANGER_FIRST_BYTES

PEER_ID = 0x00ABCD


def passes_data_path(pkt: bytes, from_peer: bool) -> bool:
    """The backends' rule (userspace/udp.py, engine/worker.py) for what goes past the stranger check."""
    if not pkt:
        return False
    opcode = pkt[0] >> 3
    if from_peer:
        return True
    if opcode == OPCODE_DATA_V1 or (pkt[0] in STRANGER_FIRST_BYTES and len(pkt) >= MIN_FIRST_PACKET_LEN):
        return True
    return opcode == OPCODE_DATA_V2 and len(pkt) >= 4 and int.from_bytes(pkt[1:4], "big") == PEER_ID


def _receive_all(sock: socket.socket) -> list[tuple[bytes, int]]:
    got = []
    sock.settimeout(0.3)
    try:
        while True:
            data, addr = sock.recvfrom(4096)
            got.append((data, addr[1]))
    except TimeoutError:
        pass
    return got


def _udp(family: socket.AddressFamily, host: str) -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.bind((host, 0))
    return s


@pytest.fixture(params=["ipv4", "ipv6", "v4-mapped"])
def trio(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, socket.socket, socket.socket, str]]:
    """(our socket with the filter, the peer, a stranger, the peer's address as recvfrom spells it)"""
    if request.param == "ipv4":
        ours, peer, stranger = (_udp(socket.AF_INET, "127.0.0.1") for _ in range(3))
        raw_ip = "127.0.0.1"
    elif request.param == "ipv6":
        try:
            ours, peer, stranger = (_udp(socket.AF_INET6, "::1") for _ in range(3))
        except OSError as e:
            pytest.skip(f"no IPv6 loopback here: {e}")
        raw_ip = "::1"
    else:
        ours = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        ours.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        ours.bind(("::", 0))
        peer, stranger = (_udp(socket.AF_INET, "127.0.0.1") for _ in range(2))
        raw_ip = "::ffff:127.0.0.1"
    yield ours, peer, stranger, raw_ip
    for s in (ours, peer, stranger):
        s.close()


def _target(ours: socket.socket, peer: socket.socket) -> tuple[str, int]:
    port = ours.getsockname()[1]
    return ("::1", port) if peer.family == socket.AF_INET6 else ("127.0.0.1", port)


def test_filter_keeps_what_the_data_path_would_keep(
    trio: tuple[socket.socket, socket.socket, socket.socket, str],
) -> None:
    ours, peer, stranger, raw_ip = trio
    assert strangers.guard(ours, raw_ip, peer.getsockname()[1], PEER_ID)
    rng = random.Random(1234)
    cases: list[tuple[socket.socket, bytes]] = [
        (stranger, b"\x20" + b"c" * 30),  # CONTROL_V1 from a stranger
        (stranger, b"\x28" + b"a" * 20),  # ACK_V1
        (stranger, b"\x38" + os.urandom(13)),  # HARD_RESET_CLIENT_V2: a restarting client
        (stranger, b"\x50" + os.urandom(40)),  # HARD_RESET_CLIENT_V3
        (stranger, b"\x51" + os.urandom(40)),  # ... with a key id other than 0: not a first packet
        (stranger, b"\x38" + os.urandom(12)),  # ... too short to be one
        (stranger, bytes([OPCODE_DATA_V2 << 3]) + PEER_ID.to_bytes(3, "big") + b"x" * 30),  # may float
        (stranger, bytes([OPCODE_DATA_V2 << 3]) + (PEER_ID + 1).to_bytes(3, "big") + b"x" * 30),
        (stranger, bytes([OPCODE_DATA_V1 << 3 | 1]) + b"y" * 30),
        (stranger, b""),
        (peer, b"\x20" + b"c" * 30),
        (peer, b"\x28" + b"a" * 20),
        (peer, bytes([OPCODE_DATA_V2 << 3]) + b"\xff\xff\xff" + b"z" * 30),
    ]
    for _ in range(300):  # garbage of every first byte, from both
        cases.append((rng.choice([peer, stranger]), rng.randbytes(rng.randrange(1, 120))))
    for first in sorted(STRANGER_FIRST_BYTES):  # first packets of every length around the limit
        for n in range(MIN_FIRST_PACKET_LEN - 3, MIN_FIRST_PACKET_LEN + 3):
            cases.append((stranger, bytes([first]) + rng.randbytes(n - 1)))
    target = _target(ours, peer)
    before = strangers.socket_drops(ours)
    expected = []
    for src, pkt in cases:
        src.sendto(pkt, target)
        if passes_data_path(pkt, src is peer):
            expected.append((pkt, src.getsockname()[1]))
    got = _receive_all(ours)
    assert got == expected
    assert strangers.socket_drops(ours) - before == len(cases) - len(expected)
    # and the filter is gone once the socket is given back: a new handshake from anyone is seen
    strangers.unguard(ours)
    stranger.sendto(b"\x20after", target)
    assert _receive_all(ours) == [(b"\x20after", stranger.getsockname()[1])]


def test_filter_follows_the_peer(trio: tuple[socket.socket, socket.socket, socket.socket, str]) -> None:
    """After a float the new address is the peer: its control packets pass, the old one's do not."""
    ours, peer, stranger, raw_ip = trio
    target = _target(ours, peer)
    assert strangers.guard(ours, raw_ip, peer.getsockname()[1], PEER_ID)
    stranger.sendto(b"\x20before", target)
    assert _receive_all(ours) == []
    assert strangers.guard(ours, raw_ip, stranger.getsockname()[1], PEER_ID)
    stranger.sendto(b"\x20after", target)
    peer.sendto(b"\x20old peer", target)
    assert _receive_all(ours) == [(b"\x20after", stranger.getsockname()[1])]


def test_nothing_to_guard() -> None:
    """No remote yet, or a TCP socket: nothing attached, and the caller is told so."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        assert not strangers.guard(s, None, 0, PEER_ID)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        assert not strangers.guard(s, "127.0.0.1", 1194, PEER_ID)
