"""The MP shared socket's address index: peers at one address, floats, and many peers leaving."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

from pyovpn.datachannel.api import Transport
from pyovpn.datachannel.userspace.peers import Peer as _Peer
from pyovpn.datachannel.userspace.peers import SharedUdp as _SharedUdp


@pytest.fixture
def sock() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        yield s


def _peer(sock: socket.socket, peer_id: int, ip: str, port: int) -> _Peer:
    iface: Any = None  # the index never looks at the interface
    p = _Peer(peer_id, peer_id, sock, Transport.UDP, iface)
    p.raw_ip, p.raw_port = ip, port
    return p


def test_peers_sharing_an_address_take_over_in_turn(sock: socket.socket) -> None:
    shared = _SharedUdp((0, 0), sock)
    a, b, c = (_peer(sock, i, "198.18.0.2", 1194) for i in range(3))
    for p in (a, b, c):
        shared.attach(p)
    addr = ("198.18.0.2", 1194)
    assert shared.by_addr[addr] is c  # the newest
    shared.detach(a)  # a waiting one leaves: nothing visible changes
    assert shared.by_addr[addr] is c
    shared.detach(c)
    assert shared.by_addr[addr] is b
    shared.detach(b)
    assert addr not in shared.by_addr and shared.shadowed == {}


def test_a_waiting_peer_that_leaves_first_leaves_no_entry_behind(sock: socket.socket) -> None:
    # a client restarting from the same address: the old peer waits behind the new one and goes first
    shared = _SharedUdp((0, 0), sock)
    for n in range(50):
        old, new = _peer(sock, 2 * n, "198.18.0.2", 1194), _peer(sock, 2 * n + 1, "198.18.0.2", 1194)
        shared.attach(old)
        shared.attach(new)
        shared.detach(old)
        assert shared.shadowed == {}  # nothing waits at the address any more
        shared.detach(new)
    assert shared.by_addr == {} and shared.shadowed == {}


def test_a_waiting_peer_that_floated_away_does_not_come_back(sock: socket.socket) -> None:
    shared = _SharedUdp((0, 0), sock)
    a, b = _peer(sock, 1, "198.18.0.2", 1194), _peer(sock, 2, "198.18.0.2", 1194)
    shared.attach(a)
    shared.attach(b)
    old = (a.raw_ip, a.raw_port)
    a.raw_port = 5000  # a floats while b is the indexed one
    shared.move(a, old)
    assert shared.by_addr[("198.18.0.2", 5000)] is a
    shared.detach(b)
    assert ("198.18.0.2", 1194) not in shared.by_addr
    assert shared.by_addr[("198.18.0.2", 5000)] is a


class _CountingSet(set):  # type: ignore[type-arg]
    scans = 0

    def __iter__(self) -> Iterator[Any]:
        _CountingSet.scans += 1
        return super().__iter__()


def test_leaving_never_scans_the_other_peers(sock: socket.socket) -> None:
    """Each leave used to walk every peer of the socket, so a mass disconnect of N clients cost N²."""
    shared = _SharedUdp((0, 0), sock)
    shared.peers = _CountingSet()
    peers = [_peer(sock, i, f"10.{i >> 8 & 255}.{i & 255}.1", 1194) for i in range(2000)]
    for p in peers:
        shared.attach(p)
    _CountingSet.scans = 0
    for p in peers:
        shared.detach(p)
    assert _CountingSet.scans == 0
    assert shared.by_addr == {} and len(shared.peers) == 0
