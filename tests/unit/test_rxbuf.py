"""net/rxbuf: the same bytes, addresses and fds as recv/recvfrom/recvmsg, through one reused buffer."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from pyovpn.datachannel.engine import wire
from pyovpn.errors import ProtocolError
from pyovpn.net import rxbuf


def test_recv_and_recvfrom_return_exactly_what_arrived() -> None:
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        big, small = os.urandom(60_000), b"\x01\x02\x03"
        b.sendto(big, a.getsockname())
        b.sendto(small, a.getsockname())
        b.sendto(b"", a.getsockname())
        first, addr = rxbuf.recvfrom(a, 65535)
        second = rxbuf.recv(a, 65535)
        empty = rxbuf.recv(a, 65535)
        # the bigger datagram before does not leak into the smaller one after, and the first
        # result is a copy that the second receive did not overwrite
        assert (first, addr) == (big, b.getsockname())
        assert second == small and type(second) is bytes
        assert empty == b""
        a.setblocking(False)
        with pytest.raises(BlockingIOError):
            rxbuf.recvfrom(a, 65535)
        # a size below the datagram truncates it, as recvfrom(size) does
        b.sendto(b"abcdef", a.getsockname())
        a.setblocking(True)
        assert rxbuf.recvfrom(a, 4)[0] == b"abcd"
    finally:
        a.close()
        b.close()


def test_a_request_larger_than_the_buffer_so_far_grows_it() -> None:
    x, y = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        payload = os.urandom(150_000)  # over the 64 KiB the buffer starts at
        x.send(b"small")
        x.send(payload)
        assert rxbuf.recv(y, 16) == b"small"
        assert rxbuf.recv(y, 200_000) == payload
    finally:
        x.close()
        y.close()


def test_each_thread_has_its_own_buffer() -> None:
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(4)]
    got: dict[int, list[bytes]] = {}
    sent = {i: [bytes([i]) * (1000 + n) for n in range(200)] for i in range(4)}

    def reader(i: int) -> None:
        got[i] = [rxbuf.recv(pairs[i][1], 4096) for _ in range(200)]

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for n in range(200):
        for i in range(4):
            pairs[i][0].send(sent[i][n])
    for t in threads:
        t.join(10)
    for x, y in pairs:
        x.close()
        y.close()
    assert got == sent


def test_engine_messages_carry_their_fds_and_refuse_a_truncated_one() -> None:
    x, y = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        wire.send(x, wire.Kind.OK, 7, {"answer": [1, 2, 3]}, [r, w])
        msg, fds = wire.recv(y)
        assert msg == wire.Message(wire.Kind.OK, 7, {"answer": [1, 2, 3]})
        assert len(fds) == 2
        os.write(fds[1], b"through the passed pipe")
        assert os.read(r, 100) == b"through the passed pipe"
        for fd in fds:
            os.close(fd)
        # more descriptors than a worker count could need still arrive (the READY message)
        many = [os.dup(r) for _ in range(40)]
        wire.send(x, wire.Kind.READY, 0, {}, many)
        for fd in many:
            os.close(fd)
        _msg, fds = wire.recv(y)
        assert len(fds) == 40
        for fd in fds:
            os.close(fd)
        # a datagram beyond MAX_MESSAGE is cut by the kernel: refused, not half-decoded
        x.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * wire.MAX_MESSAGE)
        try:
            x.sendmsg([b"\x02" + bytes(wire.MAX_MESSAGE + 10)], [])
        except OSError as exc:  # a host whose limits refuse the datagram outright has nothing to cut
            pytest.skip(f"cannot send a datagram over MAX_MESSAGE here: {exc}")
        with pytest.raises(ProtocolError, match="longer than"):
            wire.recv(y)
    finally:
        os.close(r)
        os.close(w)
        x.close()
        y.close()
