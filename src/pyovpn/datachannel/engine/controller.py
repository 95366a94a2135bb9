"""The engine's controller: executes data-channel commands and places peers on workers.

The control plane sends it every command but ``SendControl`` (over the unix socket given on
the command line), and it behaves like the kernel's generic-netlink side: it validates a
command, applies it to its own picture of the interface, peers and key slots, fans it out to
the workers that hold the peer (waiting for every acknowledgement before replying), and
turns worker events into notifications. It never touches a data packet, nor a control
packet: those travel between the workers and the proxy on direct sockets that the controller
hands to the proxy once (see ``wire.py``), so the proxy learns from ``NewPeer``'s reply which
worker sends for a peer.

Ordering across the two paths: a worker writes to the controller before it writes to the
proxy about the same thing, and each side drains the other path first (the controller reads
every worker event before a proxy request; the proxy reads the direct sockets before a
controller message), so nothing a worker said earlier is seen later.

Placement: worker 0 reads the TUN and owns every peer's transmit side (so every packet id
of a key comes from one counter, and the TUN's packets stay in order), the next worker owns
the receive sides (socket, replay window, decryption, GRO into the TUN). With one worker
both sides share it.

Multipoint (``IfaceMode.MP``, a P2MP server): UDP peers share the server's socket, which the
receiving worker reads once for all of them (DATA_V2 by peer id, the rest by source address,
a new client's control packets up with ``UNDEF_PEER_ID``); the transmitting worker sends each
TUN packet to the peer its destination routes to. The controller follows the system routes
through the interface (:class:`~pyovpn.datachannel.routing.RouteMonitor`, the same mirror the
kernel's own FIB lookup gives the ``ovpn`` driver) and copies them to the workers whenever they
change; each ``NewPeer`` brings the peer's VPN addresses. The peers' remote addresses are
slots of one shared mapping (:class:`~pyovpn.datachannel.engine.remote.RemoteArea`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pyovpn.datachannel import peer_socket, strangers
from pyovpn.datachannel.api import (
    Address,
    ControlPacket,
    DelIface,
    DelKey,
    DelPeer,
    Framing,
    GetKey,
    GetPeer,
    IfaceMode,
    KeyExhausted,
    KeyInfo,
    KeySlot,
    NewIface,
    NewKey,
    NewPeer,
    Notification,
    PeerDeleted,
    PeerDelReason,
    PeerFloated,
    PeerInfo,
    SendControl,
    SetPeer,
    Stats,
    SwapKeys,
    Transport,
    handler_for,
)
from pyovpn.datachannel.api import normalize_address as _normalize
from pyovpn.datachannel.crypto import DATA_V2_OVERHEAD
from pyovpn.datachannel.engine import wire
from pyovpn.datachannel.engine.remote import RemoteArea, RemoteCell
from pyovpn.datachannel.engine.wire import Kind, Message
from pyovpn.datachannel.routing import AddressInUseError, PeerRouter, RouteMonitor
from pyovpn.datachannel.validate import (
    check_fragment,
    check_new_key,
    check_null_dev_is_p2p,
    check_set_peer_keepalive,
    check_shaper,
    check_slot,
    no_key_in_slot,
)
from pyovpn.errors import BackendError, ProtocolError
from pyovpn.net import tun
from pyovpn.net.sockbuf import grow_buffers
from pyovpn.net.sockets import socket_key
from pyovpn.proto.packets import UNDEF_PEER_ID

log = logging.getLogger("pyovpn.engine")

IFF_VNET_HDR = 0x4000
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
TUNSETIFF = 0x400454CA
_IFREQ = struct.Struct("16sH22x")


@dataclass(slots=True)
class _KeyMeta:
    key_id: int
    cipher: Any
    serial: int


@dataclass(slots=True)  # one per client of a server
class _Peer:
    peer_id: int
    gen: int
    tx_peer_id: int
    sock: socket.socket
    transport: Transport
    workers: list[int]  # [tx worker, rx worker] (may be equal)
    remote: Address | None = None
    send_addr: tuple[Any, ...] | None = None
    raw_ip: str | None = None
    raw_port: int = 0
    ka_interval: int = 0
    ka_timeout: int = 0
    keys: list[_KeyMeta | None] = field(default_factory=lambda: [None, None])
    orig_blocking: bool = True
    orig_bufs: tuple[int, int] = (0, 0)
    gro: bool = False
    cell: RemoteCell | None = None  # UDP: the remote address shared with the workers
    shared_key: tuple[int, int] | None = None  # MP over UDP: the server socket, shared by peers
    cell_slot: int | None = None  # MP over UDP: the cell is this slot of the RemoteArea


@dataclass
class _SharedSocket:
    """MP: the server's UDP socket, set up by its first peer and given back by its last."""

    sock: socket.socket
    orig_blocking: bool
    gro: bool
    peers: set[int] = field(default_factory=set)


@dataclass
class _Iface:
    name: str
    requested_name: str
    fd: int
    mode: IfaceMode
    mtu: int
    vnet: bool


class _WorkerLink:
    def __init__(self, index: int, sock: socket.socket, pid: int) -> None:
        self.index = index
        self.sock = sock
        self.pid = pid
        self.next_id = 1
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.outbox = wire.Outbox()  # requests of this turn, sent together (Controller._flush)
        self.gone = False


class Controller:
    """Serves one proxy connection; ``workers`` are ``(index, channel, pid)`` of forked workers.

    ``direct`` are the proxy's ends of the workers' direct sockets (in worker order): they go
    to the proxy with the ready message, and the controller keeps no copy.
    """

    def __init__(
        self,
        proxy: socket.socket,
        workers: list[tuple[int, socket.socket, int]],
        opts: dict[str, Any],
        direct: Sequence[socket.socket] = (),
    ):
        self.proxy = proxy
        self.direct = list(direct)
        self.links = [_WorkerLink(i, s, pid) for i, s, pid in workers]
        self.opts = opts
        self.replay_window = int(opts.get("replay_window", 2048))
        self.want_gso = bool(opts.get("udp_gso", True))
        self.want_gro = bool(opts.get("udp_gro", True))
        self.tun_offload = bool(opts.get("tun_offload", True))
        self.mssfix = int(opts.get("mssfix") or 0)
        self.sock_buf = int(opts.get("socket_buffer", 4 << 20))
        self.iface: _Iface | None = None
        self.peers: dict[int, _Peer] = {}
        # MP: VPN addresses of the peers (by id) and the routes through the interface, which
        # the monitor keeps in step with the system's; the workers get copies (set_routes)
        self.router: PeerRouter[int] | None = None
        self.monitor: RouteMonitor | None = None
        self.routes_dirty = False
        self.shared: dict[tuple[int, int], _SharedSocket] = {}
        self.area: RemoteArea | None = None  # MP: the peers' remote addresses, one mapping
        self.queue: asyncio.Queue[tuple[Message, list[int]]] = asyncio.Queue()
        self.closed = False
        self.gen = 0
        self.serial = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.done: asyncio.Future[None] | None = None
        # what this turn says to the proxy, sent at its end with the workers' requests
        self.proxy_out = wire.Outbox()
        self.flush_due = False

    # ------------------------------------------------------------------ plumbing

    async def serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.done = self.loop.create_future()
        self.proxy.setblocking(False)
        self.loop.add_reader(self.proxy.fileno(), self._on_proxy)
        for link in self.links:
            link.sock.setblocking(False)
            self.loop.add_reader(link.sock.fileno(), self._on_worker, link)
        self._send_proxy(
            Kind.READY, 0, {"workers": [link.pid for link in self.links]}, [s.fileno() for s in self.direct]
        )
        self._flush()
        for s in self.direct:
            s.close()
        self.direct.clear()
        task = asyncio.create_task(self._process())
        try:
            await self.done
        finally:
            self._flush()  # the answer to "close"
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            await self._shutdown()

    def _send_proxy(self, kind: Kind, rid: int, body: object, fds: Sequence[int] = ()) -> None:
        self.proxy_out.add(kind, rid, body, fds)
        self._flush_soon()

    def _flush_soon(self) -> None:
        if not self.flush_due:
            self.flush_due = True
            assert self.loop is not None
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Send this turn's messages: the workers' requests, then the proxy's answers and notes.

        A full channel is waited out (nothing is dropped). A worker that cannot be reached
        fails the requests that were waiting to go to it; a proxy that cannot be reached ends
        the engine.
        """
        self.flush_due = False
        for link in self.links:
            if not link.outbox:
                continue
            try:
                link.outbox.flush(link.sock, wait=True)
            except OSError as e:
                for rid in link.outbox.take():
                    fut = link.pending.pop(rid, None)
                    if fut is not None and not fut.done():
                        fut.set_exception(BackendError(f"engine worker {link.index} is unreachable: {e}"))
        if self.proxy_out:
            try:
                self.proxy_out.flush(self.proxy, wait=True)
            except OSError:
                self.proxy_out.take()
                self._finish()

    def _finish(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    def _on_proxy(self) -> None:
        while True:
            try:
                batch = wire.recv_all(self.proxy)
            except BlockingIOError:
                return
            except ProtocolError as e:
                log.error("engine: dropped a malformed request: %s", e)
                continue
            except OSError:
                self._finish()
                return
            if batch is None:  # the control plane is gone: tear everything down
                assert self.loop is not None
                self.loop.remove_reader(self.proxy.fileno())
                self._finish()
                return
            # a worker event the proxy may already know of (a float it was told directly)
            # must be applied before the request that follows it
            for link in self.links:
                if link.sock.fileno() >= 0:
                    self._on_worker(link)
            for item in batch:
                self.queue.put_nowait(item)

    def _on_worker(self, link: _WorkerLink) -> None:
        while not link.gone:
            try:
                batch = wire.recv_all(link.sock)
            except BlockingIOError:
                return
            except ProtocolError as e:
                log.error("engine: dropped a malformed message from worker %d: %s", link.index, e)
                continue
            except OSError:
                batch = None
            if batch is None:
                assert self.loop is not None
                link.gone = True
                self.loop.remove_reader(link.sock.fileno())
                for fut in link.pending.values():
                    if not fut.done():
                        fut.set_exception(BackendError(f"engine worker {link.index} exited"))
                link.pending.clear()
                if not self.closed:
                    log.error("engine: worker %d exited unexpectedly", link.index)
                    self._finish()
                return
            for msg, fds in batch:
                for fd in fds:
                    os.close(fd)
                if msg.kind is Kind.EVENT:
                    self.queue.put_nowait((msg, []))
                    continue
                waiter = link.pending.pop(msg.rid, None)
                if waiter is None or waiter.done():
                    continue
                if msg.kind is Kind.ERR:
                    waiter.set_exception(BackendError(str(msg.body)))
                else:
                    waiter.set_result(msg.body)

    async def _call(self, index: int, op: str, fds: list[int] | tuple[int, ...] = (), **kw: Any) -> Any:
        return await self._start_call(index, op, fds, kw)

    def _start_call(self, index: int, op: str, fds: Sequence[int], kw: dict[str, Any]) -> asyncio.Future[Any]:
        """Send a request to worker ``index``; the future gets its answer."""
        link = self.links[index]
        if link.gone:
            raise BackendError(f"engine worker {index} is unreachable: it exited")
        rid = link.next_id
        link.next_id += 1
        assert self.loop is not None
        fut: asyncio.Future[Any] = self.loop.create_future()
        try:
            link.outbox.add(Kind.REQUEST, rid, {"op": op, **kw}, fds)
        except OSError as e:  # a descriptor to hand over is already gone
            raise BackendError(f"engine worker {index}: {e}") from None
        link.pending[rid] = fut
        self._flush_soon()
        return fut

    async def _call_each(self, calls: Sequence[tuple[int, str, Sequence[int], dict[str, Any]]]) -> list[Any]:
        """Send every request before waiting for any answer: the workers work at once.

        Every request that went out is waited for, even after one failed, so no answer is
        left behind; the first error is raised.
        """
        futs: list[asyncio.Future[Any]] = []
        failed: BaseException | None = None
        for index, op, fds, kw in calls:
            try:
                futs.append(self._start_call(index, op, fds, kw))
            except BackendError as e:
                failed = e
                break
        results = await asyncio.gather(*futs, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        if failed is not None:
            raise failed
        return results

    async def _call_peer(self, peer: _Peer, op: str, **kw: Any) -> list[Any]:
        args = dict(kw, peer_id=peer.peer_id, gen=peer.gen)
        return await self._call_each([(index, op, (), args) for index in sorted(set(peer.workers))])

    def _emit(self, n: Notification) -> None:
        self._send_proxy(Kind.NOTE, 0, n)

    async def _process(self) -> None:
        """Take requests and worker events in arrival order; run those of different peers at once.

        A server connecting many clients sends NewPeer and NewKey for dozens of them at a
        time; running them one after the other would cost each a round of process wakeups
        (proxy, controller, both workers). So each item waits only for what it must follow
        (see :meth:`_order_key`): the earlier items about the same peer, and the last
        barrier, an item that waits for everything before it and holds back everything
        after it. Since each handler sends its worker requests before its first wait on
        them, the workers see requests in the order the items began.
        """
        last: dict[int, asyncio.Task[None]] = {}  # the latest item about each peer
        barrier: asyncio.Task[None] | None = None
        while True:
            msg, fds = await self.queue.get()
            key = self._order_key(msg)
            if key is None:
                deps = [t for t in (*last.values(), barrier) if t is not None and not t.done()]
                last.clear()
            else:
                deps = [t for t in (last.get(key), barrier) if t is not None and not t.done()]
            task = asyncio.create_task(self._handle(msg, fds, deps))
            if key is None:
                barrier = task
            else:
                last[key] = task

                def forget(t: asyncio.Task[None], k: int = key) -> None:
                    if last.get(k) is t:
                        del last[k]

                task.add_done_callback(forget)
            if msg.kind is Kind.REQUEST and isinstance(msg.body, dict) and msg.body.get("op") == "close":
                await task
                self._finish()
                return

    def _order_key(self, msg: Message) -> int | None:
        """The peer an item is about, or None for a barrier.

        P2P runs one item at a time (NewPeer replaces the peer). Removing a peer is a barrier:
        it gives back its VPN addresses and perhaps the shared socket only after the workers
        let go, and a NewPeer reusing either must not overtake that.
        """
        if self.router is None:
            return None
        body = msg.body if isinstance(msg.body, dict) else {}
        peer_id: object = None
        if msg.kind is Kind.EVENT:
            if body.get("ev") not in ("expired", "tcp_closed"):
                peer_id = body.get("peer_id")
        elif msg.kind is Kind.REQUEST:
            op = body.get("op")
            if op in ("stats", "debug"):
                peer_id = body.get("peer_id")
            elif op == "cmd":
                cmd = body.get("cmd")
                if not isinstance(cmd, (DelPeer, NewIface, DelIface)):
                    peer_id = getattr(cmd, "peer_id", None)
        return peer_id if isinstance(peer_id, int) and not isinstance(peer_id, bool) else None

    async def _handle(self, msg: Message, fds: list[int], deps: list[asyncio.Task[None]]) -> None:
        if deps:
            await asyncio.wait(deps)
        body = msg.body if isinstance(msg.body, dict) else {}
        if msg.kind is Kind.EVENT:
            try:
                await self._worker_event(body)
            except Exception:
                log.exception("engine: handling worker event %r failed", body.get("ev"))
            return
        try:
            if msg.kind is not Kind.REQUEST:
                raise BackendError(f"unexpected {msg.kind.name} message")
            result = await self._request(body, fds)
            kind, answer = Kind.OK, result
        except BackendError as e:
            kind, answer = Kind.ERR, str(e)
        except Exception as e:
            log.exception("engine: request failed")
            kind, answer = Kind.ERR, f"engine internal error: {e}"
        self._send_proxy(kind, msg.rid, answer)

    # ------------------------------------------------------------------ requests

    async def _request(self, msg: dict[str, Any], fds: list[int]) -> Any:
        op = msg.get("op")
        if op == "close":
            await self._teardown()
            return None
        if op == "stats":
            return await self._stats(self._peer("GetPeer", msg["peer_id"]))
        if op == "mp_info":
            return await self._mp_info(bool(msg.get("resync")))
        if op == "debug":
            peer = self._peer("debug", msg["peer_id"])
            try:
                return await self._call(
                    peer.workers[0],
                    "debug",
                    peer_id=peer.peer_id,
                    gen=peer.gen,
                    what=msg["what"],
                    **{k: v for k, v in msg.items() if k not in ("op", "id", "what", "peer_id")},
                )
            except BackendError as e:
                raise BackendError(f"debug: {e}") from None
        if op != "cmd":
            for fd in fds:
                os.close(fd)
            raise BackendError(f"unknown engine request {op!r}")
        cmd = msg.get("cmd")
        what = type(cmd).__name__
        if isinstance(cmd, NewPeer):
            if not fds:
                raise BackendError(f"{what}: no socket descriptor was passed")
            await self._new_peer(cmd, fds[0])
            # the proxy sends this peer's control packets straight to its transmit worker
            return {"tx_worker": self.peers[cmd.peer_id].workers[0]}
        for fd in fds:
            os.close(fd)
        if self.closed:
            raise BackendError(f"{what}: the offload engine is closed")
        return await handler_for(self, cmd)(cmd)

    async def _new_iface(self, cmd: NewIface) -> dict[str, Any]:
        if self.iface is not None:
            raise BackendError(
                f"NewIface: this backend already drives {self.iface.name}; use one backend per interface"
            )
        check_null_dev_is_p2p(cmd)
        if not 68 <= cmd.mtu <= 65535:
            raise BackendError(f"NewIface: MTU {cmd.mtu} out of range 68..65535")
        if cmd.null:
            return await self._new_null_iface(cmd)
        try:
            fd, ifname, vnet = _open_tun(cmd.name or None, self.tun_offload)
        except BackendError as e:
            raise BackendError(f"NewIface: {e}") from None
        try:
            await asyncio.to_thread(_configure, ifname, cmd.mtu)
        except BaseException as e:
            os.close(fd)
            if isinstance(e, BackendError):
                raise BackendError(f"NewIface: {e}") from None
            raise
        iface = _Iface(ifname, cmd.name, fd, cmd.mode, cmd.mtu, vnet)
        mp = cmd.mode is IfaceMode.MP
        fds = [fd]
        if mp:
            self.area = RemoteArea()
            fds.append(self.area.fd)
        for link in self.links:
            await self._call(link.index, "set_tun", fds, vnet=vnet, mtu=cmd.mtu, read=link.index == 0, mp=mp)
        if self.area is not None:
            self.area.drop_fd()  # every worker has mapped it
        self.iface = iface
        if mp:
            assert self.loop is not None
            self.router = PeerRouter()
            try:
                self.monitor = RouteMonitor(
                    self.loop, socket.if_nametoindex(ifname), self.router, self._routes_changed
                )
            except OSError as e:
                await self._close_iface()
                raise BackendError(f"NewIface: cannot follow the routes through {ifname}: {e}") from None
        log.info("offload engine: created %s (mtu %d, vnet offloads %s)", ifname, cmd.mtu, vnet)
        return {"ifname": ifname, "vnet": vnet}

    async def _new_null_iface(self, cmd: NewIface) -> dict[str, Any]:
        """`dev null`: no device; the receiving worker writes what the peer sends to /dev/null."""
        try:
            fd = tun.open_null()
        except OSError as e:
            raise BackendError(f"NewIface: cannot open {os.devnull}: {e.strerror or e}") from None
        ifname = cmd.name or "null"
        try:
            for link in self.links:  # nothing to read: nothing ever comes from a null device
                await self._call(link.index, "set_tun", [fd], vnet=False, mtu=cmd.mtu, read=False, mp=False)
        except BaseException:
            os.close(fd)
            raise
        self.iface = _Iface(ifname, cmd.name, fd, cmd.mode, cmd.mtu, False)
        log.info("offload engine: null device (packets from the peer are discarded)")
        return {"ifname": ifname, "vnet": False}

    async def _del_iface(self, cmd: DelIface) -> None:
        iface = self.iface
        if iface is None or cmd.name not in (iface.name, iface.requested_name):
            raise BackendError(f"DelIface: no interface named {cmd.name!r}")
        for peer in list(self.peers.values()):
            await self._remove_peer(peer, PeerDelReason.TEARDOWN)
        await self._close_iface()

    async def _close_iface(self) -> None:
        iface = self.iface
        if iface is None:
            return
        self.iface = None
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
        self.router = None
        if self.area is not None:
            self.area.close()
            self.area = None
        for link in self.links:
            with contextlib.suppress(BackendError):
                await self._call(link.index, "clear_tun")
        with contextlib.suppress(OSError):
            os.close(iface.fd)

    async def _new_peer(self, cmd: NewPeer, fd: int) -> None:
        what = "NewPeer"
        sock = peer_socket.adopt_socket(what, cmd, fd)
        try:
            peer = self._check_new_peer(cmd, sock)
        except BaseException:
            sock.close()
            raise
        mp = self.router is not None
        if mp:
            self._attach_mp_peer(peer, cmd)
        else:
            for old in (self.peers.get(cmd.peer_id), *self.peers.values()):
                if old is not None and self.peers.get(old.peer_id) is old:
                    await self._remove_peer(old, PeerDelReason.TEARDOWN)  # P2P: one peer at a time
            self._configure_socket(peer)
            strangers.follow(peer)
        mss4 = mss6 = 0
        if self.mssfix:
            outer = (
                48
                if peer.sock.family == socket.AF_INET6 and not (peer.remote and "." in peer.remote[0])
                else 28
            )
            # comp-lzo/compress v1 framing adds a byte inside the encryption (v2 adds none to IP packets)
            framing_byte = 1 if cmd.framing in (Framing.LZO_PREFIX, Framing.SWAP) else 0
            base = self.mssfix - outer - DATA_V2_OVERHEAD - framing_byte
            mss4, mss6 = max(base - 40, 536), max(base - 60, 1220)
        desc: dict[str, Any] = {
            "peer_id": peer.peer_id,
            "gen": peer.gen,
            "tx_peer_id": peer.tx_peer_id,
            "transport": peer.transport.value,
            "send_addr": peer.send_addr,
            "raw_ip": peer.raw_ip,
            "raw_port": peer.raw_port,
            "gso": self.want_gso and peer.transport is Transport.UDP and peer_socket.gso_supported(peer.sock),
            "gro": peer.gro,
            "mss4": mss4,
            "mss6": mss6,
            "framing": cmd.framing.value,
            "passtos": cmd.passtos,
            "vpn4": cmd.vpn_ipv4,
            "vpn6": cmd.vpn_ipv6,
            "shared_key": peer.shared_key,
            "fragment": cmd.fragment,
            "shaper": cmd.shaper,
            "ka_interval": cmd.keepalive_interval,
            "ka_timeout": cmd.keepalive_timeout,
        }
        tx_w, rx_w = peer.workers
        self.peers[peer.peer_id] = peer
        fds = [peer.sock.fileno()]
        if peer.transport is Transport.UDP:
            assert peer.send_addr is not None
            slot = self.area.take() if self.area is not None else None
            if slot is not None:
                assert self.area is not None
                peer.cell = self.area.cell(slot)
                peer.cell_slot = desc["cell_slot"] = slot
            else:
                peer.cell = RemoteCell()
                fds.append(peer.cell.fd)
            peer.cell.store(peer.send_addr)
        peer.ka_interval, peer.ka_timeout = cmd.keepalive_interval, cmd.keepalive_timeout
        calls = []
        for index in sorted(set(peer.workers)):
            d = dict(desc, tx=index == tx_w, rx=index == rx_w)
            if index == rx_w:
                d["backlog"] = cmd.tcp_backlog
            calls.append((index, "add_peer", fds, {"peer": d}))
        try:
            await self._call_each(calls)
        except BaseException:
            await self._remove_peer(peer, None)
            raise
        if peer.cell is not None:
            peer.cell.drop_fd()  # the workers have mapped it; a server with many peers saves an fd each
        # a server logs each client itself; at thousands of clients this line is noise there
        (log.debug if mp else log.info)(
            "offload engine: peer %d over %s%s (tx worker %d, rx worker %d, gso=%s gro=%s)",
            peer.peer_id,
            peer.transport.value,
            f" to {peer.remote[0]}:{peer.remote[1]}" if peer.remote else "",
            tx_w,
            rx_w,
            desc["gso"],
            peer.gro,
        )

    def _check_new_peer(self, cmd: NewPeer, sock: socket.socket) -> _Peer:
        what = "NewPeer"
        if self.closed:
            raise BackendError(f"{what}: the offload engine is closed")
        if self.iface is None:
            raise BackendError(f"{what}: no interface; send NewIface first")
        mp = self.router is not None
        tx_id = peer_socket.check_new_peer(what, cmd, multipoint=mp)
        check_fragment(what, cmd, multipoint=mp)
        check_shaper(what, cmd, multipoint=mp)
        if mp:
            peer_socket.check_peer_id_free(what, cmd.peer_id, self.peers)
        n = len(self.links)
        self.gen += 1
        peer = _Peer(cmd.peer_id, self.gen, tx_id, sock, cmd.transport, [0, 1 % n])
        peer_socket.check_socket(what, cmd, peer)
        return peer

    def _attach_mp_peer(self, peer: _Peer, cmd: NewPeer) -> None:
        """MP: register the peer's VPN addresses; UDP peers share the server socket.

        The first UDP peer on a socket sets it up for all of them and the last one gives it
        back (see :meth:`_release_socket`); the others' copies of the descriptor are closed
        at once, so a server with many clients holds one descriptor, not one per client.
        """
        what = "NewPeer"
        assert self.router is not None
        key = socket_key(peer.sock.fileno())
        try:
            if peer.transport is Transport.TCP:
                tcp = self.peers.values()
                peer_socket.check_own_connection(
                    what, key, ((p.peer_id, p.sock.fileno()) for p in tcp if p.transport is Transport.TCP)
                )
            self.router.add_peer(peer.peer_id, cmd.vpn_ipv4, cmd.vpn_ipv6)
        except BackendError:
            peer.sock.close()
            raise
        except AddressInUseError as e:
            peer.sock.close()
            raise BackendError(f"{what}: {e} by peer {e.owner}") from None
        except ValueError as e:
            peer.sock.close()
            raise BackendError(f"{what}: {e}") from None
        if peer.transport is Transport.TCP:
            self._configure_socket(peer)
            return
        shared = self.shared.get(key)
        if shared is None:
            self._configure_socket(peer)
            shared = _SharedSocket(peer.sock, peer.orig_blocking, peer.gro)
            self.shared[key] = shared
        else:
            peer.sock.close()
            peer.sock = shared.sock
            peer.orig_blocking = shared.orig_blocking
            peer.gro = shared.gro
        shared.peers.add(peer.peer_id)
        peer.shared_key = key

    def _configure_socket(self, peer: _Peer) -> None:
        sock = peer.sock
        peer.orig_blocking, peer.gro = peer_socket.take_over(sock, peer.transport, want_gro=self.want_gro)
        peer.orig_bufs = (
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
        )
        if self.sock_buf:
            grow_buffers(sock, self.sock_buf)

    async def _set_peer(self, cmd: SetPeer) -> None:
        what = "SetPeer"
        peer = self._peer(what, cmd.peer_id)
        keepalive = check_set_peer_keepalive(cmd)
        if cmd.remote is not None:
            if peer.transport is Transport.TCP:
                raise BackendError(f"{what}: a TCP peer's remote cannot change")
            peer_socket.set_remote(what, peer, cmd.remote)
            assert peer.cell is not None and peer.send_addr is not None
            peer.cell.store(peer.send_addr)  # the workers pick it up before their next packet
            if self.router is None:
                strangers.follow(peer)
            else:
                await self._call_peer(peer, "sync_remote")  # MP: the receive side's address index
        if keepalive:
            assert cmd.keepalive_interval is not None and cmd.keepalive_timeout is not None
            await self._set_keepalive(peer, cmd.keepalive_interval, cmd.keepalive_timeout)

    async def _set_keepalive(self, peer: _Peer, interval: int, timeout: int) -> None:
        peer.ka_interval = interval
        peer.ka_timeout = timeout
        await self._call_peer(peer, "set_keepalive", interval=interval, timeout=timeout)

    async def _stats(self, peer: _Peer) -> Stats:
        total = Stats()
        for part in await self._call_peer(peer, "stats"):
            total.merge(part)
        return total

    async def _get_peer(self, cmd: GetPeer) -> PeerInfo:
        peer = self._peer("GetPeer", cmd.peer_id)
        st = await self._stats(peer)
        return st.peer_info(peer.peer_id, peer.remote, peer.ka_interval, peer.ka_timeout)

    async def _del_peer(self, cmd: DelPeer) -> None:
        await self._remove_peer(self._peer("DelPeer", cmd.peer_id), PeerDelReason.USERSPACE)

    async def _new_key(self, cmd: NewKey) -> None:
        what = "NewKey"
        peer = self._peer(what, cmd.peer_id)
        slot, cipher = check_new_key(cmd)  # every length and range: the workers' keys cannot fail
        self.serial += 1
        common: dict[str, Any] = {
            "peer_id": peer.peer_id,
            "gen": peer.gen,
            "slot": slot,
            "key_id": cmd.key_id,
            "cipher": cipher.value,
            "serial": self.serial,
            "replay_window": self.replay_window,
        }
        tx_w, rx_w = peer.workers
        calls = []
        for index in sorted(set(peer.workers)):
            # each worker gets the direction it works in: the sender encrypts, the receiver decrypts
            args = dict(common)
            if index == tx_w:
                args.update(enc_key=cmd.encrypt.cipher_key, enc_tail=cmd.encrypt.nonce_tail)
            if index == rx_w:
                args.update(dec_key=cmd.decrypt.cipher_key, dec_tail=cmd.decrypt.nonce_tail)
            calls.append((index, "new_key", (), args))
        await self._call_each(calls)
        peer.keys[slot] = _KeyMeta(cmd.key_id, cipher, self.serial)

    async def _del_key(self, cmd: DelKey) -> None:
        peer = self._peer("DelKey", cmd.peer_id)
        slot = check_slot("DelKey", cmd.slot)
        await self._call_peer(peer, "del_key", slot=slot)
        peer.keys[slot] = None

    async def _swap_keys(self, cmd: SwapKeys) -> None:
        peer = self._peer("SwapKeys", cmd.peer_id)
        await self._call_peer(peer, "swap_keys")
        peer.keys.reverse()

    async def _get_key(self, cmd: GetKey) -> KeyInfo:
        peer = self._peer("GetKey", cmd.peer_id)
        slot = check_slot("GetKey", cmd.slot)
        meta = peer.keys[slot]
        if meta is None:
            raise no_key_in_slot("GetKey", cmd.peer_id, slot)
        return KeyInfo(peer_id=peer.peer_id, slot=KeySlot(slot), key_id=meta.key_id, cipher=meta.cipher)

    async def _send_control(self, cmd: SendControl) -> None:
        what = "SendControl"
        peer = self._peer(what, cmd.peer_id)
        if not cmd.packet:
            raise BackendError(f"{what}: empty packet")
        if peer.transport is Transport.TCP and len(cmd.packet) > 0xFFFF:
            raise BackendError(f"{what}: {len(cmd.packet)} bytes do not fit a TCP frame (max 65535)")
        try:
            await self._call(
                peer.workers[0], "send_control", peer_id=peer.peer_id, gen=peer.gen, packet=cmd.packet
            )
        except BackendError as e:
            raise BackendError(f"{what}: {e}") from None

    # ------------------------------------------------------------------ MP routes

    def _routes_changed(self) -> None:
        """The route monitor changed the routes: copy them to the workers, once per loop turn."""
        if not self.routes_dirty and self.loop is not None:
            self.routes_dirty = True
            self.loop.create_task(self._push_routes())

    async def _push_routes(self) -> None:
        await asyncio.sleep(0)  # more changes of the same netlink read join this copy
        self.routes_dirty = False
        router = self.router
        if router is None or self.closed:
            return
        # IPv6 addresses do not fit the wire's 64-bit integers: they travel as decimal text
        routes4 = list(router.routes4)
        routes6 = [(str(net), plen, str(hop)) for net, plen, hop in router.routes6]
        for link in self.links:
            try:
                await self._call(link.index, "set_routes", routes4=routes4, routes6=routes6)
            except BackendError as e:
                log.error("engine: worker %d did not take the routes: %s", link.index, e)

    async def _mp_info(self, resync: bool) -> dict[str, Any]:
        """MP state for tests and diagnostics: shared sockets, the routes followed, drops without a peer.

        ``resync``: dump the routes again first (what the monitor does after lost notifications).
        """
        monitor = self.monitor
        if resync and monitor is not None:
            monitor.resync()
        stats = Stats()
        for link in self.links:
            part = await self._call(link.index, "mp_stats")
            if isinstance(part, Stats):
                stats.merge(part)
        return {
            "shared_sockets": len(self.shared),
            "routes": monitor.mirror.routes() if monitor is not None else [],
            "resyncs": monitor.resyncs if monitor is not None else 0,
            "synced": monitor.synced if monitor is not None else False,
            "stats": stats,
        }

    # ------------------------------------------------------------------ worker events

    async def _worker_event(self, msg: dict[str, Any]) -> None:
        ev = msg["ev"]
        if ev == "control" and msg.get("peer_id") == UNDEF_PEER_ID:  # MP: a new client's packet
            addr = msg.get("addr")
            self._emit(ControlPacket(UNDEF_PEER_ID, msg["packet"], _normalize(addr) if addr else None))
            return
        peer = self.peers.get(msg.get("peer_id", -1))
        if peer is None or peer.gen != msg.get("gen"):
            return  # about a peer that is already gone
        if ev == "control":  # from a worker without a direct socket to the proxy
            addr = msg.get("addr")
            self._emit(ControlPacket(peer.peer_id, msg["packet"], _normalize(addr) if addr else None))
        elif ev == "float":
            addr = msg["addr"]
            peer.send_addr = tuple(addr)
            peer.raw_ip = addr[0]
            peer.raw_port = addr[1]
            peer.remote = _normalize(addr)  # the receiving worker already moved both sides
            if self.router is None:
                strangers.follow(peer)
            log.info("offload engine: peer %d floated to %s:%d", peer.peer_id, *peer.remote)
            if not msg.get("noted"):  # else the worker told the proxy, in order with its control packets
                self._emit(PeerFloated(peer.peer_id, peer.remote))
        elif ev == "expired":
            await self._remove_peer(peer, PeerDelReason.EXPIRED)
        elif ev == "tcp_closed":
            await self._remove_peer(peer, msg["reason"])
        elif ev == "key_exhausted":
            serial = msg["serial"]
            for i in (0, 1):
                meta = peer.keys[i]
                if meta is not None and meta.serial == serial:
                    peer.keys[i] = None
            await self._call_peer(peer, "kill_key", serial=serial)
            log.warning(
                "offload engine: killing key %d of peer %d (packet ids exhausted)",
                msg["key_id"],
                peer.peer_id,
            )
            self._emit(KeyExhausted(peer.peer_id, msg["key_id"]))

    # ------------------------------------------------------------------ removal and shutdown

    async def _remove_peer(self, peer: _Peer, reason: PeerDelReason | None) -> None:
        if self.peers.get(peer.peer_id) is not peer:
            return
        del self.peers[peer.peer_id]
        flush = reason is PeerDelReason.USERSPACE
        for index in sorted(set(peer.workers)):
            with contextlib.suppress(BackendError):
                await self._call(index, "del_peer", peer_id=peer.peer_id, gen=peer.gen, flush=flush)
        self._release_socket(peer)
        if reason is not None:
            log.info("offload engine: peer %d deleted (%s)", peer.peer_id, reason.name)
            self._emit(PeerDeleted(peer.peer_id, reason))

    def _release_socket(self, peer: _Peer) -> None:
        if peer.cell is not None:
            peer.cell.close()
            peer.cell = None
        if peer.cell_slot is not None:
            if self.area is not None:
                self.area.give(peer.cell_slot)
            peer.cell_slot = None
        if self.router is not None:
            self.router.remove_peer(peer.peer_id)
        key, peer.shared_key = peer.shared_key, None
        if key is not None:
            shared = self.shared.get(key)
            if shared is None:
                return
            shared.peers.discard(peer.peer_id)
            if shared.peers:
                return  # other peers still use the socket
            del self.shared[key]
        # give the caller's socket back as we found it (flags live on the shared file)
        peer_socket.give_back(peer.sock, blocking=peer.orig_blocking, gro=peer.gro)
        peer.sock.close()

    async def _teardown(self) -> None:
        if self.closed:
            return
        self.closed = True
        for peer in list(self.peers.values()):
            del self.peers[peer.peer_id]
            for index in sorted(set(peer.workers)):
                with contextlib.suppress(BackendError):
                    await self._call(index, "del_peer", peer_id=peer.peer_id, gen=peer.gen, flush=False)
            self._release_socket(peer)
        await self._close_iface()

    async def _shutdown(self) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._teardown(), 5)
        self._flush()
        for link in self.links:
            with contextlib.suppress(OSError):
                link.sock.setblocking(True)
                wire.send(link.sock, Kind.REQUEST, 0, {"op": "exit"})
            with contextlib.suppress(OSError):
                link.sock.close()

    # ------------------------------------------------------------------ helpers

    def _peer(self, what: str, peer_id: int) -> _Peer:
        peer = self.peers.get(peer_id)
        if peer is None:
            raise BackendError(f"{what}: unknown peer id {peer_id}")
        return peer


def _open_tun(name: str | None, offload: bool) -> tuple[int, str, bool]:
    """A TUN with ``IFF_VNET_HDR`` and checksum/TSO/USO offloads, or a plain one if refused."""
    if not offload:
        fd, ifname = tun.open_tun(name)
        return fd, ifname, False
    pattern = "tun%d" if name in (None, "", "tun") else name
    assert pattern is not None
    raw = pattern.encode()
    if len(raw) >= 16:
        raise BackendError(f"interface name {pattern!r} is too long (at most 15 bytes)")
    try:
        fd = os.open(tun.TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        fd, ifname = tun.open_tun(name)  # let the plain path produce the detailed error
        return fd, ifname, False
    try:
        res = fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(raw, tun.IFF_TUN | tun.IFF_NO_PI | IFF_VNET_HDR))
    except OSError:
        os.close(fd)
        fd, ifname = tun.open_tun(name)
        return fd, ifname, False
    ifname = _IFREQ.unpack(res)[0].rstrip(b"\0").decode()
    base = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
    for flags in (base | TUN_F_USO4 | TUN_F_USO6, base, TUN_F_CSUM, 0):
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
            break
        except OSError:
            continue
    return fd, ifname, True


def _configure(ifname: str, mtu: int) -> None:
    tun.configure_link(ifname, mtu, True)
    # a longer queue in front of the engine, as OpenVPN's tuned `txqueuelen 1000`
    with contextlib.suppress(Exception):
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=ifname)
            if idx:
                ipr.link("set", index=idx[0], txqlen=1000)
