"""The engine's message batches over a real SOCK_SEQPACKET pair: order, fds, size limits, errors."""

from __future__ import annotations

import os
import socket

import pytest

from pyovpn.datachannel import api
from pyovpn.datachannel.engine import wire
from pyovpn.errors import ProtocolError


def _pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def _drain(sock: socket.socket) -> list[list[tuple[wire.Message, list[int]]]]:
    sock.setblocking(False)
    out = []
    while True:
        try:
            batch = wire.recv_all(sock)
        except BlockingIOError:
            return out
        assert batch is not None
        out.append(batch)


def test_messages_of_a_turn_go_in_one_datagram_with_their_own_fds() -> None:
    a, b = _pair()
    pipes = [os.pipe() for _ in range(3)]
    try:
        out = wire.Outbox()
        out.add(wire.Kind.REQUEST, 1, {"op": "add_peer", "peer": {"peer_id": 1}}, [pipes[0][1]])
        out.add(wire.Kind.REQUEST, 2, {"op": "stats", "peer_id": 1})
        out.add(wire.Kind.NOTE, 0, api.PeerDeleted(9, api.PeerDelReason.EXPIRED))
        out.add(wire.Kind.REQUEST, 3, {"op": "add_peer"}, [pipes[1][1], pipes[2][1]])
        for _r, w in pipes:  # the outbox holds copies: the sender's own may go at once
            os.close(w)
        assert len(out) == 4
        out.flush(a)
        assert len(out) == 0
        datagrams = _drain(b)
        assert len(datagrams) == 1
        (batch,) = datagrams
        assert [(m.kind, m.rid) for m, _fds in batch] == [
            (wire.Kind.REQUEST, 1),
            (wire.Kind.REQUEST, 2),
            (wire.Kind.NOTE, 0),
            (wire.Kind.REQUEST, 3),
        ]
        assert batch[2][0].body == api.PeerDeleted(9, api.PeerDelReason.EXPIRED)
        assert [len(fds) for _m, fds in batch] == [1, 0, 0, 2]
        # each fd is the write end of the pipe its message named: a byte written shows up there
        for fd, (r, _w) in zip([*batch[0][1], *batch[3][1]], pipes, strict=True):
            os.write(fd, b"x")
            os.close(fd)
            assert os.read(r, 1) == b"x"
    finally:
        for r, _w in pipes:
            os.close(r)
        a.close()
        b.close()


def test_one_message_goes_plain_and_big_turns_are_split_in_order() -> None:
    a, b = _pair()
    try:
        out = wire.Outbox()
        out.add(wire.Kind.OK, 5, "alone")
        out.flush(a)
        b.setblocking(False)
        raw = b.recv(1 << 16)
        assert raw[0] == wire.Kind.OK  # a batch of one is just the message
        assert wire.unpack(raw).body == "alone"
        blob = os.urandom(20_000)  # two of these do not fit one batch datagram
        for rid in range(1, 6):
            out.add(wire.Kind.OK, rid, blob)
        out.flush(a)
        datagrams = _drain(b)
        assert len(datagrams) > 1
        got = [(m.rid, m.body) for batch in datagrams for m, _fds in batch]
        assert got == [(rid, blob) for rid in range(1, 6)]
    finally:
        a.close()
        b.close()


def test_a_failed_flush_keeps_what_is_unsent_and_take_closes_the_copies() -> None:
    a, b = _pair()
    r, w = os.pipe()
    try:
        out = wire.Outbox()
        out.add(wire.Kind.REQUEST, 7, {"op": "x"}, [w])
        out.add(wire.Kind.REQUEST, 8, {"op": "y"})
        b.close()
        with pytest.raises(OSError):
            out.flush(a)
        assert len(out) == 2
        copy = out.items[0][1][0]
        os.fstat(copy)
        assert out.take() == [7, 8]
        assert len(out) == 0
        with pytest.raises(OSError):
            os.fstat(copy)  # the outbox's copy of the fd is closed
        with pytest.raises(TypeError):
            out.add(wire.Kind.BATCH, 0, None)
    finally:
        os.close(r)
        os.close(w)
        a.close()


def test_a_batch_whose_fds_do_not_add_up_is_refused_and_its_fds_closed() -> None:
    a, b = _pair()
    r, w = os.pipe()
    try:
        item = wire.pack(wire.Kind.OK, 1, None)
        # claims no fds for its one message, but one arrives with it
        datagram = bytes([wire.Kind.BATCH]) + bytes(4) + len(item).to_bytes(4, "little") + b"\x00" + item
        socket.send_fds(a, [datagram], [w])
        with pytest.raises(ProtocolError, match="own 0 fds, 1 came"):
            wire.recv_all(b)
        os.close(w)
        assert os.read(r, 1) == b""  # the received copy was closed too: the pipe has no writer left
        nested = bytes([wire.Kind.BATCH]) + bytes(4)
        inner = len(nested).to_bytes(4, "little") + b"\x00" + nested
        with pytest.raises(ProtocolError):
            wire.unpack_batch(nested + inner, 0)
        with pytest.raises(ProtocolError, match="empty batch"):
            wire.unpack_batch(nested, 0)
        with pytest.raises(ProtocolError, match="unpack_batch"):
            wire.unpack(nested)
    finally:
        os.close(r)
        a.close()
        b.close()
