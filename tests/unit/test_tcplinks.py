"""The P2MP server's TCP streams (server/tcplinks.py) on loopback: framing across reads, the
hand-over at a frame boundary, and the bounds on connections that never come up."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

import pytest

from pyovpn.config import Options
from pyovpn.proto.packets import frame
from pyovpn.server import tcplinks
from pyovpn.server.tcplinks import TcpLinks

Addr = tuple[str, int]


@dataclass
class Server:
    links: TcpLinks
    port: int
    packets: list[tuple[bytes, Addr]] = field(default_factory=list)
    closed: list[tuple[Addr, str]] = field(default_factory=list)

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.settimeout(2)
        return sock


@asynccontextmanager
async def serving(hand_window: float = 30.0) -> AsyncIterator[Server]:
    packets: list[tuple[bytes, Addr]] = []
    closed: list[tuple[Addr, str]] = []
    links = TcpLinks(
        asyncio.get_running_loop(),
        lambda p, a: packets.append((p, a)),
        lambda a, r: closed.append((a, r)),
        hand_window=hand_window,
        is_up=lambda a: False,
    )
    # port 0: the kernel picks a free one (a config could not say so)
    lsock = links.listen(replace(Options(), proto="tcp-server", local="127.0.0.1", port=0))
    links.accept()
    try:
        yield Server(links, lsock.getsockname()[1], packets, closed)
    finally:
        links.close_all()


async def until(cond: Callable[[], bool], timeout: float = 3.0) -> None:
    end = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < end, "timed out"
        await asyncio.sleep(0.01)


def test_frames_split_anyhow_arrive_whole_and_replies_are_framed() -> None:
    async def main() -> None:
        async with serving() as srv:
            with srv.connect() as client:
                stream = frame(b"\x38first") + frame(b"\x20" + b"x" * 3000) + frame(b"\x28ack")
                for i in range(0, len(stream), 7):  # frames cross every read boundary
                    client.send(stream[i : i + 7])
                    await asyncio.sleep(0)
                await until(lambda: len(srv.packets) == 3)
                assert [p for p, _ in srv.packets] == [b"\x38first", b"\x20" + b"x" * 3000, b"\x28ack"]
                addr = srv.packets[0][1]
                assert addr == client.getsockname()[:2]
                assert srv.links.send(addr, b"\x40reply")
                assert client.recv(100) == frame(b"\x40reply")

    asyncio.run(main())


def test_hand_over_gives_the_descriptor_and_the_bytes_past_the_last_frame() -> None:
    async def main() -> None:
        async with serving() as srv:
            with srv.connect() as client:
                client.send(frame(b"\x38hello") + frame(b"\x48data")[:3])  # a frame and a partial one
                await until(lambda: len(srv.packets) == 1)
                await asyncio.sleep(0.05)
                addr = srv.packets[0][1]
                fd, backlog = srv.links.hand_over(addr)
                assert backlog == frame(b"\x48data")[:3]
                assert not srv.links.owns(addr)
                assert not srv.links.send(addr, b"\x20late")  # no longer ours to write
                client.send(b"more")
                await asyncio.sleep(0.1)
                assert len(srv.packets) == 1  # nor to read: the data channel reads it from here on
                with socket.socket(fileno=fd) as handed:
                    assert handed.recv(100) == b"more"
                    handed.detach()

    asyncio.run(main())


def test_a_connection_without_a_tunnel_is_closed_after_hand_window() -> None:
    async def main() -> None:
        async with serving(hand_window=0.3) as srv:
            with srv.connect() as silent:
                await until(lambda: srv.closed != [])
                assert "hand-window" in srv.closed[0][1]
                assert silent.recv(10) == b""  # the server closed it

    asyncio.run(main())


def test_pending_connections_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tcplinks, "MAX_PENDING", 2)

    async def main() -> None:
        async with serving() as srv:
            socks = [srv.connect() for _ in range(3)]
            try:
                await asyncio.sleep(0.3)
                assert len(srv.links.links) == 2
                assert socks[2].recv(10) == b""  # the third was closed at once
            finally:
                for s in socks:
                    s.close()

    asyncio.run(main())


def test_a_zero_length_frame_ends_the_connection() -> None:
    async def main() -> None:
        async with serving() as srv:
            with srv.connect() as client:
                client.send(b"\x00\x00")
                await until(lambda: srv.closed != [])
                assert "zero-length frame" in srv.closed[0][1]
                assert srv.links.links == {}

    asyncio.run(main())
