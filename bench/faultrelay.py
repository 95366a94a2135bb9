#!/usr/bin/env python3
"""A UDP relay that delays, reorders, duplicates and drops datagrams: netem for a kernel without it.

    python3 bench/faultrelay.py LISTEN_PORT SERVER_HOST SERVER_PORT [--delay MS] [--jitter MS]
        [--reorder P] [--reorder-extra MS] [--duplicate P] [--loss P] [--seed N]

Listens on 127.0.0.1:LISTEN_PORT for one client (the last address heard from is the client) and
forwards each datagram to SERVER_HOST:SERVER_PORT from a socket of its own; the server's replies
go back to the client. Every datagram, both ways, is dropped with probability ``--loss``, else
sent after ``--delay`` ms plus a uniform jitter of ±``--jitter`` ms; with probability
``--reorder`` it waits ``--reorder-extra`` ms more (so later datagrams overtake it), and with
probability ``--duplicate`` a second copy follows 1 ms later. bench/faults.py runs one in the
client's namespace and points the client at it.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
from dataclasses import dataclass


@dataclass
class Faults:
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    reorder: float = 0.0
    reorder_extra_ms: float = 20.0
    duplicate: float = 0.0
    loss: float = 0.0

    def schedule(self, rng: random.Random) -> list[float]:
        """Delays in seconds for the copies of one datagram to send (none: dropped)."""
        if rng.random() < self.loss:
            return []
        delay = self.delay_ms + rng.uniform(-self.jitter_ms, self.jitter_ms)
        if rng.random() < self.reorder:
            delay += self.reorder_extra_ms
        delay = max(0.0, delay) / 1000
        return [delay, delay + 0.001] if rng.random() < self.duplicate else [delay]


class Relay:
    """The two sockets and the forwarding; runs on the caller's event loop."""

    def __init__(
        self,
        listen: socket.socket,
        upstream: socket.socket,
        server: tuple[str, int],
        faults: Faults,
        seed: int,
    ):
        self.listen = listen
        self.upstream = upstream
        self.server = server
        self.faults = faults
        self.rng = random.Random(seed)
        self.client: tuple[str, int] | None = None
        self.counts = {"in": 0, "sent": 0, "dropped": 0}

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        for sock in (self.listen, self.upstream):
            sock.setblocking(False)
        loop.add_reader(self.listen.fileno(), self._from_client)
        loop.add_reader(self.upstream.fileno(), self._from_server)

    def _forward(self, sock: socket.socket, data: bytes, dest: tuple[str, int]) -> None:
        self.counts["in"] += 1
        delays = self.faults.schedule(self.rng)
        if not delays:
            self.counts["dropped"] += 1
        for d in delays:
            self.loop.call_later(d, self._send, sock, data, dest)

    def _send(self, sock: socket.socket, data: bytes, dest: tuple[str, int]) -> None:
        try:
            sock.sendto(data, dest)
            self.counts["sent"] += 1
        except OSError:
            self.counts["dropped"] += 1

    def _from_client(self) -> None:
        while True:
            try:
                data, addr = self.listen.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            self.client = addr[:2]
            self._forward(self.upstream, data, self.server)

    def _from_server(self) -> None:
        while True:
            try:
                data, _ = self.upstream.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ICMP errors from the server side: nothing to relay
                continue
            if self.client is not None:
                self._forward(self.listen, data, self.client)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("listen_port", type=int)
    ap.add_argument("server_host")
    ap.add_argument("server_port", type=int)
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--jitter", type=float, default=0.0)
    ap.add_argument("--reorder", type=float, default=0.0)
    ap.add_argument("--reorder-extra", type=float, default=20.0)
    ap.add_argument("--duplicate", type=float, default=0.0)
    ap.add_argument("--loss", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    listen = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listen.bind(("127.0.0.1", a.listen_port))
    upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    faults = Faults(a.delay, a.jitter, a.reorder, a.reorder_extra, a.duplicate, a.loss)
    relay = Relay(listen, upstream, (a.server_host, a.server_port), faults, a.seed)
    loop = asyncio.new_event_loop()
    relay.start(loop)
    print(f"relay listening on 127.0.0.1:{a.listen_port}", flush=True)
    loop.run_forever()


if __name__ == "__main__":
    main()
