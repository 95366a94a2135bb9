"""Load generator: many simulated OpenVPN pull clients (own UDP socket and Session each) in one process.

Every simulated client is what a real ``client`` config would be on the wire, minus the TUN:
its own UDP socket (so its own source port), its own sans-I/O :class:`~pyovpn.proto.session.Session`
(pull mode, TLS client, the CA/cert/key and tls-auth/tls-crypt of the config), the handshake
driven by ``loop.call_later`` on :meth:`Session.next_timer`, and once ``TunnelUp`` and the first
``NewKey`` arrive it behaves like an idle real client: it keeps the data keys in
:class:`~pyovpn.datachannel.crypto.KeyState` objects, sends an encrypted ``PING_MAGIC``
DATA_V2 packet every pushed ``ping`` seconds, answers control traffic (ACKs, renegotiations)
and decrypts whatever data arrives only to count it.

It works against any OpenVPN 2.4+ server that pushes ``peer-id`` (stock OpenVPN or pyovpn).

Measured per client: connect time, from the first packet to ``TunnelUp``; overall: the time
until every client has connected (or failed). :func:`run_clients` is the API::

    res = await run_clients(1000, lambda i: cfg, ("172.31.254.2", 1194), concurrency=50, hold_seconds=30)

and the command line runs the same against a client config file::

    python -m pyovpn.tools.loadgen --config client.conf -n 1000 --concurrency 50 --hold 30

It prints ``LOADGEN SETTLED {json}`` once every client has connected or failed, then keeps
them for ``--hold`` seconds (``inf``: until SIGTERM/SIGINT), closes them (with an EXIT
control message when the server negotiated cc-exit) and prints ``LOADGEN RESULT {json}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import resource
import signal
import socket
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from pyovpn.datachannel.api import DelKey, KeySlot, NewKey, SwapKeys
from pyovpn.datachannel.crypto import PING_MAGIC, KeyState, PacketIdExhaustedError
from pyovpn.edge.sockets import first_remote, send_control
from pyovpn.errors import ProtocolError
from pyovpn.proto.packets import OPCODE_DATA_V1, OPCODE_DATA_V2
from pyovpn.proto.session import Session, SessionClosed, SessionConfig, TunnelUp

if TYPE_CHECKING:
    from pyovpn.config import Options

log = logging.getLogger("pyovpn.loadgen")

Addr = tuple[str, int]
RECV_BATCH = 64
DEFAULT_PING = 10  # used when the server pushes no keepalive


@dataclass
class Result:
    """What :func:`run_clients` measured. Times are seconds."""

    n: int
    connect_times: list[float] = field(default_factory=list)  # start -> TunnelUp, connected clients only
    failures: list[tuple[int, str]] = field(default_factory=list)  # (client index, reason)
    total_seconds: float = 0.0  # first client start -> last TunnelUp
    settle_seconds: float = 0.0  # first client start -> every client connected or failed
    connect_cpu_seconds: float = 0.0  # this process's CPU time over settle_seconds
    held_seconds: float = 0.0
    pings_sent: int = 0
    data_received: int = 0  # data packets that decrypted and passed the replay check
    pings_received: int = 0
    data_bad: int = 0  # data packets that did not decrypt (unknown key id, forged, replayed)
    data_before_keys: int = 0  # data packets that arrived before our first key (servers may send early)
    control_received: int = 0
    rekeys: int = 0  # data keys installed after the first one
    closed_after_up: list[tuple[int, str]] = field(default_factory=list)  # sessions that ended while held
    silent_at_end: int = 0  # connected clients that received nothing for the pushed ping-restart

    @property
    def connected(self) -> int:
        return len(self.connect_times)

    def summary(self) -> dict[str, object]:
        """The numbers as a JSON-friendly dict (connect-time percentiles instead of the raw list)."""
        times = sorted(self.connect_times)
        out: dict[str, object] = {
            k: v for k, v in asdict(self).items() if k not in ("connect_times", "failures", "closed_after_up")
        }
        out["connected"] = self.connected
        out["failed"] = len(self.failures)
        out["connect_p50"] = _percentile(times, 50)
        out["connect_p90"] = _percentile(times, 90)
        out["connect_p99"] = _percentile(times, 99)
        out["connect_max"] = times[-1] if times else None
        out["connect_mean"] = statistics.fmean(times) if times else None
        reasons: dict[str, int] = {}
        for _, why in self.failures:
            reasons[why] = reasons.get(why, 0) + 1
        out["failure_reasons"] = reasons
        out["closed_after_up"] = len(self.closed_after_up)
        closed: dict[str, int] = {}
        for _, why in self.closed_after_up:
            closed[why] = closed.get(why, 0) + 1
        out["closed_reasons"] = closed
        return out


def _percentile(sorted_values: list[float], pct: float) -> float | None:
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, math.ceil(pct / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


class SimClient:
    """One simulated client: a connected UDP socket, a Session, the data keys and a ping timer."""

    def __init__(self, index: int, cfg: SessionConfig, server: Addr, result: Result) -> None:
        self.index = index
        self.cfg = cfg
        self.server = server
        self.res = result
        self.loop = asyncio.get_running_loop()
        self.sock: socket.socket | None = None
        self.session: Session | None = None
        self.keys: dict[KeySlot, KeyState | None] = {KeySlot.PRIMARY: None, KeySlot.SECONDARY: None}
        self.peer_id: int | None = None
        self.ping_interval = DEFAULT_PING
        self.ping_restart = 0
        self.started = 0.0
        self.up_at: float | None = None
        self.last_rx = 0.0
        self.done: asyncio.Future[str | None] = self.loop.create_future()  # None: up, str: failure
        self._timer: asyncio.TimerHandle | None = None
        self._ping_timer: asyncio.TimerHandle | None = None
        self._keys_seen = 0
        self.closed_reason: str | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.server[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.connect(self.server)  # the kernel filters other sources for us
        self.sock = sock
        now = time.time()
        self.started = time.monotonic()
        self.last_rx = self.started
        self.session = Session(self.cfg, rng=os.urandom, now=now)
        self.loop.add_reader(sock.fileno(), self._on_readable)
        self.session.handle_timer(now)  # sends the hard reset
        self._pump()

    def close(self, *, notify: bool = True) -> None:
        """End the client: an EXIT control message if cc-exit was negotiated, then the socket goes."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._ping_timer is not None:
            self._ping_timer.cancel()
            self._ping_timer = None
        if self.session is not None and not self.session.closed:
            self.session.close(time.time(), notify=notify)
            self._send_packets()
        if self.sock is not None:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        if not self.done.done():
            self.done.set_result("closed before the tunnel came up")

    def _fail(self, reason: str) -> None:
        if self.up_at is None:
            if not self.done.done():
                self.done.set_result(reason)
            self.close(notify=False)
        elif self.closed_reason is None:
            self.closed_reason = reason
            self.res.closed_after_up.append((self.index, reason))
            self.close(notify=False)

    # ------------------------------------------------------------------ packets

    def _on_readable(self) -> None:
        sock, sess = self.sock, self.session
        if sock is None or sess is None:
            return
        got_control = False
        for _ in range(RECV_BATCH):
            try:
                data = sock.recv(65535)
            except BlockingIOError:
                break
            except OSError as exc:  # ICMP port unreachable etc.: keep going, the session retries
                log.debug("client %d: recv: %s", self.index, exc)
                break
            if not data:
                continue
            self.last_rx = time.monotonic()
            op = data[0] >> 3
            if op in (OPCODE_DATA_V2, OPCODE_DATA_V1):
                self._on_data(data)
                continue
            self.res.control_received += 1
            sess.receive(data, time.time())
            got_control = True
        if got_control:
            self._pump()

    def _on_data(self, data: bytes) -> None:
        if self._keys_seen == 0:
            self.res.data_before_keys += 1
            return
        key_id = data[0] & 7
        for ks in self.keys.values():
            if ks is not None and ks.key_id == key_id:
                try:
                    plain = ks.decrypt(data)
                except ProtocolError:
                    break
                self.res.data_received += 1
                if plain == PING_MAGIC:
                    self.res.pings_received += 1
                else:
                    log.debug("client %d: data %s", self.index, plain[:40].hex())
                return
        self.res.data_bad += 1

    def _send_packets(self) -> None:
        sess, sock = self.session, self.sock
        if sess is None or sock is None:
            return
        for pkt in sess.packets_to_send():
            failed = send_control(sock, pkt)
            if failed is not None:
                log.debug("client %d: send: %s", self.index, failed)

    def _pump(self) -> None:
        sess = self.session
        if sess is None:
            return
        self._send_packets()
        for ev in sess.events():
            if isinstance(ev, TunnelUp):
                self.up_at = time.monotonic()
                self.peer_id = ev.peer_id
                self.ping_interval = ev.keepalive_interval or DEFAULT_PING
                self.ping_restart = ev.keepalive_timeout
            elif isinstance(ev, NewKey):
                self._install_key(ev)
            elif isinstance(ev, SwapKeys):
                k = self.keys
                k[KeySlot.PRIMARY], k[KeySlot.SECONDARY] = k[KeySlot.SECONDARY], k[KeySlot.PRIMARY]
            elif isinstance(ev, DelKey):
                self.keys[ev.slot] = None
            elif isinstance(ev, SessionClosed):
                self._fail(ev.reason)
                return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = sess.next_timer()
        if deadline is not None and self.sock is not None:
            self._timer = self.loop.call_later(max(0.0, deadline - time.time()) + 0.001, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.session is not None and self.sock is not None:
            self.session.handle_timer(time.time())
            self._pump()

    # ------------------------------------------------------------------ data channel

    def _install_key(self, ev: NewKey) -> None:
        self.peer_id = ev.peer_id
        self.keys[ev.slot] = KeyState.from_directions(ev.key_id, ev.cipher, ev.encrypt, ev.decrypt)
        self._keys_seen += 1
        if self._keys_seen == 1:
            # the first key: the tunnel is up; spread the first pings over one interval
            if not self.done.done():
                self.done.set_result(None)
            self._ping_timer = self.loop.call_later(random.uniform(0, self.ping_interval), self._ping)
        else:
            self.res.rekeys += 1

    def _ping(self) -> None:
        self._ping_timer = None
        ks = self.keys[KeySlot.PRIMARY]
        if self.sock is None or ks is None or self.peer_id is None:
            return
        try:
            self.sock.send(ks.encrypt(PING_MAGIC, self.peer_id))
            self.res.pings_sent += 1
        except PacketIdExhaustedError:
            if self.session is not None:
                self.session.request_renegotiation(time.time())
                self._pump()
        except OSError as exc:
            log.debug("client %d: ping: %s", self.index, exc)
        self._ping_timer = self.loop.call_later(self.ping_interval, self._ping)


def raise_fd_limit(wanted: int) -> None:
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` (one socket per client), up to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


async def run_clients(
    n: int,
    make_config: Callable[[int], SessionConfig],
    server_addr: Addr,
    *,
    concurrency: int = 50,
    hold_seconds: float = 0,
    connect_timeout: float | None = None,
    on_settled: Callable[[Result], None] | None = None,
    stop: asyncio.Event | None = None,
    exit_notify: bool = True,
) -> Result:
    """Connect ``n`` simulated clients to ``server_addr``, at most ``concurrency`` handshakes at once.

    ``make_config(i)`` gives client ``i``'s SessionConfig (pull=True, is_tls_server=False;
    returning one shared config is fine and saves building a TLS context per client).
    A client that has not connected after ``connect_timeout`` (default: its hand-window plus
    5 s) counts as failed. Once every client has connected or failed, ``on_settled`` is
    called; connected clients are then kept alive with keepalive pings for ``hold_seconds``
    (or until ``stop`` is set), then closed (``exit_notify``: send EXIT when cc-exit was
    negotiated, so the server drops them at once).
    """
    if math.isinf(hold_seconds) and stop is None:
        raise ValueError("an infinite hold needs a stop event")
    raise_fd_limit(n + 256)
    res = Result(n=n)
    sem = asyncio.Semaphore(max(1, concurrency))
    clients: list[SimClient] = []
    t0 = time.monotonic()
    cpu0 = time.process_time()
    last_up = t0
    in_flight = 0

    async def one(i: int) -> None:
        nonlocal last_up, in_flight
        async with sem:
            if stop is not None and stop.is_set():
                res.failures.append((i, "not started: stopped"))
                return
            cfg = make_config(i)
            if cfg.is_tls_server or not cfg.pull:
                raise ValueError("loadgen clients need a pull client config (client / pull + tls-client)")
            c = SimClient(i, cfg, server_addr, res)
            clients.append(c)
            timeout = connect_timeout if connect_timeout is not None else cfg.hand_window + 5.0
            in_flight += 1
            try:
                c.start()
                try:
                    outcome = await asyncio.wait_for(asyncio.shield(c.done), timeout)
                except TimeoutError:
                    outcome = f"no TunnelUp within {timeout:.0f} s"
                    c.close(notify=False)
            except OSError as exc:
                outcome = f"socket error: {exc}"
                c.close(notify=False)
            finally:
                in_flight -= 1
            if outcome is None and c.up_at is not None:
                res.connect_times.append(c.up_at - c.started)
                last_up = max(last_up, c.up_at)
            else:
                res.failures.append((i, outcome or "unknown"))

    async def progress() -> None:
        while True:
            await asyncio.sleep(5)
            log.info(
                "loadgen: %d/%d connected, %d failed, %d in flight, %.1f s",
                res.connected,
                n,
                len(res.failures),
                in_flight,
                time.monotonic() - t0,
            )

    reporter = asyncio.create_task(progress())
    try:
        await asyncio.gather(*(one(i) for i in range(n)))
        res.settle_seconds = time.monotonic() - t0
        res.connect_cpu_seconds = time.process_time() - cpu0
        res.total_seconds = last_up - t0
        if on_settled is not None:
            on_settled(res)
        held_from = time.monotonic()
        if hold_seconds > 0 and not (stop is not None and stop.is_set()):
            waiter = stop or asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.wait(), None if math.isinf(hold_seconds) else hold_seconds)
        res.held_seconds = time.monotonic() - held_from
        now = time.monotonic()
        for c in clients:
            alive = c.up_at is not None and c.closed_reason is None
            if alive and c.ping_restart and now - c.last_rx > c.ping_restart:
                res.silent_at_end += 1
    finally:
        reporter.cancel()
        for c in clients:
            c.close(notify=exit_notify)
    return res


# ---------------------------------------------------------------------------- command line


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m pyovpn.tools.loadgen",
        description="Run N simulated OpenVPN pull clients against a server from one process.",
    )
    ap.add_argument("--config", required=True, help="an OpenVPN client config file")
    ap.add_argument("-n", type=int, default=100, help="number of clients (default 100)")
    ap.add_argument("--concurrency", type=int, default=50, help="handshakes in flight at once (default 50)")
    ap.add_argument(
        "--hold",
        type=float,
        default=0.0,
        help="seconds to keep the clients connected after they settle; inf = until SIGTERM/SIGINT",
    )
    ap.add_argument("--connect-timeout", type=float, default=None, help="per-client connect timeout (s)")
    ap.add_argument("--remote", default=None, help="HOST:PORT instead of the config's first remote")
    ap.add_argument("--no-exit-notify", action="store_true", help="close without sending EXIT")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap.parse_args(argv)


def _server_addr(opts: Options, override: str | None) -> Addr:
    if override:
        host, _, port = override.rpartition(":")
        return host.strip("[]"), int(port)
    found = first_remote(opts, socket.SOCK_DGRAM)
    if found is None:
        raise SystemExit("loadgen: the config has no remote; pass --remote HOST:PORT")
    return found[1]


async def _main(args: argparse.Namespace) -> int:
    from pyovpn.config import parse_args
    from pyovpn.daemon import session_config

    opts = parse_args(["--config", args.config])
    cfg = session_config(opts)
    server = _server_addr(opts, args.remote)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("loadgen: %d clients -> %s:%d, concurrency %d", args.n, *server, args.concurrency)

    def settled(res: Result) -> None:
        print("LOADGEN SETTLED " + json.dumps(res.summary()), flush=True)

    res = await run_clients(
        args.n,
        lambda _i: cfg,
        server,
        concurrency=args.concurrency,
        hold_seconds=args.hold,
        connect_timeout=args.connect_timeout,
        on_settled=settled,
        stop=stop,
        exit_notify=not args.no_exit_notify,
    )
    print("LOADGEN RESULT " + json.dumps(res.summary()), flush=True)
    for i, why in res.failures[:10]:
        print(f"loadgen: client {i} failed: {why}", file=sys.stderr)
    return 0 if not res.failures else 2


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
    )
    if not args.verbose:
        # one line per client handshake problem is noise at 1000 clients; the summary counts them
        logging.getLogger("pyovpn.session").setLevel(logging.ERROR)
    return asyncio.run(_main(args))


if __name__ == "__main__":
    raise SystemExit(main())
