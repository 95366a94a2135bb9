"""bench/faultrelay.py, the netem stand-in of bench/faults.py: its fault schedule, and real
datagrams through it on loopback (delayed, held back, doubled, dropped as asked)."""

from __future__ import annotations

import asyncio
import random
import socket
import time

from bench.faultrelay import Faults, Relay


def test_schedule_drops_delays_holds_back_and_doubles_at_the_rates_asked() -> None:
    rng = random.Random(7)
    f = Faults(delay_ms=200, jitter_ms=50, reorder=0.25, reorder_extra_ms=20, duplicate=0.2, loss=0.1)
    plans = [f.schedule(rng) for _ in range(20000)]
    dropped = sum(1 for p in plans if not p)
    doubled = sum(1 for p in plans if len(p) == 2)
    kept = [p[0] for p in plans if p]
    assert 0.08 < dropped / len(plans) < 0.12
    assert 0.17 < doubled / len(kept) < 0.23
    assert min(kept) >= 0.150 and max(kept) <= 0.270  # 200 ± 50 ms, plus 20 ms when held back
    held = sum(1 for d in kept if d > 0.250)
    assert held > 0  # only a held-back datagram can wait longer than 250 ms
    assert Faults().schedule(rng) == [0.0]  # no faults: sent at once, once


def test_relay_forwards_both_ways_with_the_delay_and_drops_what_it_should() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        server.bind(("127.0.0.1", 0))
        listen = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        listen.bind(("127.0.0.1", 0))
        upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        relay = Relay(listen, upstream, server.getsockname(), Faults(delay_ms=50), seed=1)
        relay.start(loop)
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        server.setblocking(False)
        client.setblocking(False)
        try:
            sent = time.monotonic()
            client.sendto(b"hello", listen.getsockname())
            data, addr = await asyncio.wait_for(loop.sock_recvfrom(server, 100), 2)
            assert data == b"hello" and time.monotonic() - sent >= 0.045
            server.sendto(b"reply", addr)  # to the relay's upstream socket, which knows the client
            back, _ = await asyncio.wait_for(loop.sock_recvfrom(client, 100), 2)
            assert back == b"reply"
            relay.faults = Faults(loss=1.0)
            client.sendto(b"lost", listen.getsockname())
            await asyncio.sleep(0.2)
            assert relay.counts["dropped"] == 1
        finally:
            for s in (listen, upstream):
                loop.remove_reader(s.fileno())
            for s in (server, listen, upstream, client):
                s.close()

    asyncio.run(main())
