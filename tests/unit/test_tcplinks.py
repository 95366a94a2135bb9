"""The P2MP server's TCP streams (server/tcplinks.py) on loopback: framing across reads, the
hand-over at a frame boundary, and the bounds on connections that never come up."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import replace

import pytest

from pyovpn.config import Options
from pyovpn.proto.packets import frame
from pyovpn.server import tcplinks
from pyovpn.server.tcplinks import TcpLinks

Addr = tuple[str, int]


class Recorder:
    def __init__(self) -> None:
        self.packets: list[tuple[bytes, Addr]] = []
        self.closed: list[tuple[Addr, str]] = []
        self.up: set[Addr] = set()


def _links(loop: asyncio.AbstractEventLoop, rec: Recorder, hand_window: float = 30.0) -> tuple[TcpLinks, int]:
    links = TcpLinks(
        loop,
        lambda p, a: rec.packets.append((p, a)),
        lambda a, r: rec.closed.append((a, r)),
        hand_window=hand_window,
        is_up=lambda a: a in rec.up,
    )
    # port 0: the kernel picks a free one (a config could not say so)
    lsock = links.listen(replace(Options(), proto="tcp-server", local="127.0.0.1", port=0))
    return links, lsock.getsockname()[1]


async def _until(cond, timeout: float = 3.0) -> None:  # type: ignore[no-untyped-def]
    end = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < end, "timed out"
        await asyncio.sleep(0.01)


def test_frames_split_anyhow_arrive_whole_and_replies_are_framed() -> None:
    async def main() -> None:
        rec = Recorder()
        links, port = _links(asyncio.get_running_loop(), rec)
        client = socket.create_connection(("127.0.0.1", port))
        try:
            stream = frame(b"\x38first") + frame(b"\x20" + b"x" * 3000) + frame(b"\x28ack")
            for i in range(0, len(stream), 7):  # byte by byte-ish: frames cross every read boundary
                client.send(stream[i : i + 7])
                await asyncio.sleep(0)
            await _until(lambda: len(rec.packets) == 3)
            assert [p for p, _ in rec.packets] == [b"\x38first", b"\x20" + b"x" * 3000, b"\x28ack"]
            addr = rec.packets[0][1]
            assert addr == client.getsockname()[:2]
            assert links.send(addr, b"\x40reply")
            client.settimeout(2)
            assert client.recv(100) == frame(b"\x40reply")
        finally:
            client.close()
            links.close_all()

    asyncio.run(main())


def test_hand_over_gives_the_descriptor_and_the_bytes_past_the_last_frame() -> None:
    async def main() -> None:
        rec = Recorder()
        links, port = _links(asyncio.get_running_loop(), rec)
        client = socket.create_connection(("127.0.0.1", port))
        try:
            client.send(frame(b"\x38hello") + frame(b"\x48data")[:3])  # a whole frame, then a partial one
            await _until(lambda: len(rec.packets) == 1)
            await asyncio.sleep(0.05)
            addr = rec.packets[0][1]
            fd, backlog = links.hand_over(addr)
            assert backlog == frame(b"\x48data")[:3]
            assert not links.owns(addr) and not links.send(addr, b"\x20late")  # no longer ours to write
            client.send(b"more")
            await asyncio.sleep(0.1)
            assert len(rec.packets) == 1  # nor to read: the data channel reads it from here on
            with socket.socket(fileno=fd) as dup:
                assert dup.recv(100) == b"more"
                dup.detach()
        finally:
            client.close()
            links.close_all()

    asyncio.run(main())


def test_a_connection_without_a_tunnel_is_closed_after_hand_window() -> None:
    async def main() -> None:
        rec = Recorder()
        links, port = _links(asyncio.get_running_loop(), rec, hand_window=0.3)
        silent = socket.create_connection(("127.0.0.1", port))
        try:
            await _until(lambda: len(links.links) == 1)
            await _until(lambda: rec.closed != [], timeout=3)
            assert "hand-window" in rec.closed[0][1]
            silent.settimeout(2)
            assert silent.recv(10) == b""  # the server closed it
        finally:
            silent.close()
            links.close_all()

    asyncio.run(main())


def test_pending_connections_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tcplinks, "MAX_PENDING", 2)

    async def main() -> None:
        rec = Recorder()
        links, port = _links(asyncio.get_running_loop(), rec)
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        try:
            await asyncio.sleep(0.3)
            assert len(links.links) == 2
            socks[2].settimeout(2)
            assert socks[2].recv(10) == b""  # the third was closed at once
        finally:
            for s in socks:
                s.close()
            links.close_all()

    asyncio.run(main())


def test_a_zero_length_frame_ends_the_connection() -> None:
    async def main() -> None:
        rec = Recorder()
        links, port = _links(asyncio.get_running_loop(), rec)
        client = socket.create_connection(("127.0.0.1", port))
        try:
            client.send(b"\x00\x00")
            await _until(lambda: rec.closed != [])
            assert "zero-length frame" in rec.closed[0][1]
            assert links.links == {}
        finally:
            client.close()
            links.close_all()

    asyncio.run(main())
