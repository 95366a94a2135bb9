"""``EngineDataChannel``: the data channel in a separate multi-process engine, same command set.

This is the control plane's side of :mod:`pyovpn.datachannel.engine`. It implements
:class:`~pyovpn.datachannel.api.DataChannel` by sending every command, unchanged, to the
engine's controller over a ``SOCK_SEQPACKET`` unix socket (binary frames, see ``wire.py``)
and passing ``NewPeer``'s socket as an SCM_RIGHTS descriptor, exactly as the kernel ``ovpn``
driver receives it over netlink. Notifications (``PeerDeleted``, ``KeyExhausted``) come back
on the same socket and are delivered from the event loop, so the control plane cannot tell
this backend from the others.

Control packets take the short way: each worker has a direct socket to this process (handed
over in the engine's ready message), so a received ``ControlPacket`` (and ``PeerFloated``,
in order with them) comes straight from the worker, and ``SendControl`` goes straight to the
peer's transmit worker, whose one reply is all the caller waits for. Messages the controller
sends are handled only after the direct sockets are drained, so a ``ControlPacket`` a worker
received before its peer was deleted is delivered before the ``PeerDeleted``.

The proxy owns the engine's life: it spawns ``python -m pyovpn.datachannel.engine`` on the
first request (from the event loop's thread, whose network namespace the engine inherits),
shuts it down cleanly in :meth:`close`, and the engine is killed by the kernel if this
process dies (``PR_SET_PDEATHSIG``) or exits when the socket closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from pyovpn.datachannel.api import (
    Capabilities,
    Command,
    IfaceDeleted,
    KeyInfo,
    NewIface,
    NewPeer,
    Notification,
    PeerDeleted,
    PeerDelReason,
    PeerInfo,
    SendControl,
    Stats,
    Transport,
)
from pyovpn.datachannel.crypto import DEFAULT_REPLAY_WINDOW
from pyovpn.datachannel.engine import wire
from pyovpn.datachannel.engine.wire import Kind, Message
from pyovpn.datachannel.notify import Subscribers
from pyovpn.errors import BackendError, ProtocolError

__all__ = ["EngineDataChannel"]

log = logging.getLogger(__name__)

_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 5.0


class EngineDataChannel:
    """The :class:`~pyovpn.datachannel.api.DataChannel` backed by the multi-process offload engine.

    Options: ``workers`` (worker processes; default ``os.cpu_count()``, a P2P peer uses at
    most two: transmit and receive), ``replay_window``, ``udp_gso``/``udp_gro`` (socket
    batching), ``tun_offload`` (IFF_VNET_HDR + TSO/USO/checksum offloads on the TUN),
    ``tun_gro`` (coalesce received TCP segments into GSO writes), ``recvmmsg`` (many
    datagrams per receive call; off: one ``recvmsg`` each, the fallback path), ``mssfix`` (clamp the MSS of
    TCP SYNs so encrypted packets fit this many outer IP bytes, OpenVPN's default 1492;
    0 disables), ``socket_buffer`` (SO_SNDBUF/SO_RCVBUF of the handed-over socket).
    """

    name = "userspace-offload"
    capabilities = Capabilities(
        mp=True,
        lane=True,
        tcp_backlog=True,
        stats=True,
        gso=True,
        tun_offloads=True,
        hooks=True,
        drops_strangers=True,
        framing=True,
        passtos=True,
        null_dev=True,
        fragment=True,
        shaper=True,
    )

    def __init__(
        self,
        *,
        workers: int | None = None,
        replay_window: int = DEFAULT_REPLAY_WINDOW,
        udp_gso: bool = True,
        udp_gro: bool = True,
        tun_offload: bool = True,
        tun_gro: bool = True,
        verify_rx_checksums: bool = True,
        recvmmsg: bool = True,
        mssfix: int = 1492,
        socket_buffer: int = 4 << 20,
        python: str | None = None,
        log_level: str | None = None,
    ) -> None:
        if not 1 <= replay_window <= 65536:
            raise BackendError(f"replay window must be 1..65536 packets, got {replay_window}")
        if mssfix and not 576 <= mssfix <= 65535:
            raise BackendError(f"mssfix {mssfix} out of range 576..65535 (or 0 to disable)")
        self._workers = workers if workers is not None else (os.cpu_count() or 1)
        self._options = {
            "replay_window": replay_window,
            "udp_gso": udp_gso,
            "udp_gro": udp_gro,
            "tun_offload": tun_offload,
            "tun_gro": tun_gro,
            "verify_rx_checksums": verify_rx_checksums,
            "recvmmsg": recvmmsg,
            "mssfix": mssfix,
            "socket_buffer": socket_buffer,
        }
        self._python = python or sys.executable
        self._log_level = log_level or logging.getLevelName(logging.getLogger().getEffectiveLevel())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._ready: asyncio.Future[Any] | None = None
        self._direct: list[socket.socket] = []  # per worker, for control packets
        self._starting: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        # requests to the controller made in one turn go out together at its end
        self._out = wire.Outbox()
        self._out_what: dict[int, str] = {}  # the command each queued request is for (errors)
        self._flush_due = False
        self._next_id = 1
        self._subscribers = Subscribers()
        self._peers: set[int] = set()
        self._senders: dict[int, tuple[int, Transport]] = {}  # peer id: (transmit worker, transport)
        self._closed = False
        self._ifname: str | None = None
        self.worker_pids: list[int] = []

    # ------------------------------------------------------------------ public API

    @property
    def ifname(self) -> str | None:
        """The TUN interface's actual name once ``NewIface`` succeeded."""
        return self._ifname

    @property
    def engine_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def subscribe(self, callback: Callable[[Notification], None]) -> None:
        self._subscribers.add(callback)

    async def request(self, command: Command) -> PeerInfo | KeyInfo | None:
        what = type(command).__name__
        if self._closed:
            raise BackendError(f"{what}: the offload backend is closed")
        await self._ensure_started()
        if isinstance(command, SendControl):
            await self._send_control(command)
            return None
        fds: list[int] = []
        if isinstance(command, NewPeer):
            fds = [command.socket_fd]
            try:
                os.fstat(command.socket_fd)
            except OSError as e:
                raise BackendError(
                    f"{what}: socket fd {command.socket_fd} is not usable: {e.strerror or e}"
                ) from None
        result = await self._call({"op": "cmd", "cmd": command}, fds, what)
        if isinstance(command, NewIface) and isinstance(result, dict):
            self._ifname = result.get("ifname")
            return None
        if isinstance(command, NewPeer):
            self._peers.add(command.peer_id)
            if isinstance(result, dict):
                self._senders[command.peer_id] = (int(result.get("tx_worker", 0)), command.transport)
            return None
        if isinstance(result, (PeerInfo, KeyInfo)):
            return result
        return None

    async def _send_control(self, cmd: SendControl) -> None:
        """Straight to the peer's transmit worker; the controller's checks, made here."""
        what = "SendControl"
        sender = self._senders.get(cmd.peer_id)
        if sender is None:
            raise BackendError(f"{what}: unknown peer id {cmd.peer_id}")
        index, transport = sender
        if not cmd.packet:
            raise BackendError(f"{what}: empty packet")
        if transport is Transport.TCP and len(cmd.packet) > 0xFFFF:
            raise BackendError(f"{what}: {len(cmd.packet)} bytes do not fit a TCP frame (max 65535)")
        if index >= len(self._direct):
            raise BackendError(f"{what}: the offload engine has no worker {index}")
        try:
            await self._send(self._direct[index], Kind.SEND_CONTROL, cmd, (), what)
        except BackendError as e:
            if str(e).startswith(f"{what}:"):
                raise
            raise BackendError(f"{what}: {e}") from None

    async def peer_stats(self, peer_id: int) -> Stats:
        """All counters of a peer summed over the workers, including the ``extra`` drop reasons."""
        await self._ensure_started()
        result = await self._call({"op": "stats", "peer_id": peer_id}, what="GetPeer")
        if not isinstance(result, Stats):
            raise BackendError(f"GetPeer: the engine answered {type(result).__name__}, not Stats")
        return result

    async def mp_info(self, *, resync: bool = False) -> dict[str, Any]:
        """MP: ``shared_sockets``, ``routes`` (``(prefix, gateway)`` the workers follow), the route
        monitor's ``resyncs`` and ``synced``, and ``stats``: drops that belong to no peer."""
        await self._ensure_started()
        result = await self._call({"op": "mp_info", "resync": resync}, what="mp_info")
        if not isinstance(result, dict):
            raise BackendError(f"mp_info: the engine answered {type(result).__name__}")
        return result

    async def debug(self, peer_id: int, what: str, **kw: Any) -> Any:
        """Test hooks on the worker holding a peer's transmit side (``set_tx_pid``, ``encrypt``)."""
        await self._ensure_started()
        return await self._call({"op": "debug", "peer_id": peer_id, "what": what, **kw}, what="debug")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._starting is not None and not self._starting.done():
            with contextlib.suppress(BaseException):
                await self._starting
        if self._sock is not None and self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(BackendError, OSError, asyncio.TimeoutError):
                await asyncio.wait_for(self._call({"op": "close"}, what="close"), _STOP_TIMEOUT)
        self._disconnect()
        await self._reap()

    # ------------------------------------------------------------------ engine process

    async def _ensure_started(self) -> None:
        if self._sock is not None and self._starting is not None and self._starting.done():
            self._starting.result()
            return
        if self._starting is None:
            self._loop = asyncio.get_running_loop()
            self._starting = asyncio.ensure_future(self._start())
        await asyncio.shield(self._starting)

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            argv = [
                self._python,
                "-m",
                "pyovpn.datachannel.engine",
                "--fd",
                str(child.fileno()),
                "--parent",
                str(os.getpid()),
                "--workers",
                str(self._workers),
                "--options",
                json.dumps(self._options),
                "--log-level",
                str(self._log_level),
            ]
            # spawned from this (the loop's) thread: the engine inherits its network namespace,
            # and PR_SET_PDEATHSIG follows this thread's life
            self._proc = subprocess.Popen(argv, pass_fds=[child.fileno()], stdin=subprocess.DEVNULL)
        except OSError as e:
            parent.close()
            raise BackendError(f"cannot start the offload engine: {e}") from None
        finally:
            child.close()
        parent.setblocking(False)
        self._sock = parent
        self._ready = loop.create_future()
        loop.add_reader(parent.fileno(), self._on_readable)
        try:
            info = await asyncio.wait_for(asyncio.shield(self._ready), _START_TIMEOUT)
        except (TimeoutError, BackendError) as e:
            self._disconnect()
            await self._reap()
            raise BackendError(f"the offload engine did not start: {e}") from None
        self.worker_pids = list(info.get("workers", [])) if isinstance(info, dict) else []
        log.info("offload engine %d started with %d worker(s)", self._proc.pid, len(self.worker_pids))

    def _disconnect(self) -> None:
        sock = self._sock
        if sock is None:
            return
        if self._loop is not None and sock.fileno() >= 0:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(sock.fileno())
        sock.close()  # the engine sees EOF and exits
        self._sock = None
        self._drop_direct()
        self._fail_pending(BackendError("the offload engine connection is closed"))

    async def _reap(self) -> None:
        proc = self._proc
        if proc is None:
            return
        deadline = time.monotonic() + _STOP_TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if proc.poll() is None:
            proc.kill()
            await asyncio.to_thread(proc.wait)

    def _fail_pending(self, exc: BaseException) -> None:
        self._out.take()
        self._out_what.clear()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(exc)

    # ------------------------------------------------------------------ messages

    async def _call(self, body: dict[str, Any], fds: list[int] | None = None, what: str = "") -> Any:
        sock = self._sock
        if sock is None:
            raise BackendError("the offload engine is not running")
        return await self._send(sock, Kind.REQUEST, body, fds or (), what or str(body.get("op")))

    async def _send(
        self, sock: socket.socket, kind: Kind, body: object, fds: Sequence[int], what: str
    ) -> Any:
        """Send one request and wait for its reply; a full socket is waited out, never dropped."""
        assert self._loop is not None
        rid = self._next_id
        self._next_id = (self._next_id % 0xFFFFFFFF) + 1
        fut: asyncio.Future[Any] = self._loop.create_future()
        if sock is self._sock:
            try:
                self._out.add(kind, rid, body, fds)
            except OSError as e:
                raise BackendError(f"{what}: cannot hand over a descriptor: {e.strerror or e}") from None
            self._pending[rid] = fut
            self._out_what[rid] = what
            if not self._flush_due:
                self._flush_due = True
                self._loop.call_soon(self._flush)
            return await fut
        self._pending[rid] = fut
        while True:
            try:
                wire.send(sock, kind, rid, body, fds)
                break
            except BlockingIOError:
                await asyncio.sleep(0.001)
            except OSError as e:
                self._pending.pop(rid, None)
                raise BackendError(f"{what}: cannot reach the offload engine: {e.strerror or e}") from None
        return await fut

    def _flush(self) -> None:
        """Send the requests queued for the controller; a full socket is retried, never dropped."""
        self._flush_due = False
        sock = self._sock
        if sock is None or not self._out:
            return  # an engine that went away has failed every pending request already
        try:
            self._out.flush(sock)
        except BlockingIOError:
            assert self._loop is not None
            self._flush_due = True
            self._loop.call_later(0.001, self._flush)
            return
        except OSError as e:
            for rid in self._out.take():
                what = self._out_what.pop(rid, "")
                fut = self._pending.pop(rid, None)
                if fut is not None and not fut.done():
                    fut.set_exception(
                        BackendError(f"{what}: cannot reach the offload engine: {e.strerror or e}")
                    )
        self._out_what.clear()  # everything queued has gone out (or failed)

    def _reply(self, msg: Message) -> None:
        fut = self._pending.pop(msg.rid, None)
        if fut is None or fut.done():
            return
        if msg.kind is Kind.ERR:
            fut.set_exception(BackendError(str(msg.body)))
        elif msg.kind is Kind.OK:
            fut.set_result(msg.body)
        else:
            fut.set_exception(BackendError(f"unexpected {msg.kind.name} reply from the engine"))

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        while True:
            try:
                batch = wire.recv_all(sock)
            except BlockingIOError:
                return
            except ProtocolError as e:
                log.warning("offload engine sent an undecodable message: %s", e)
                continue
            except OSError:
                batch = None
            if batch is None:
                self._engine_gone()
                return
            # whatever a worker said before the events behind these messages comes first
            self._drain_direct()
            for msg, fds in batch:
                if msg.kind is Kind.READY:
                    self._adopt_direct(fds)
                    if self._ready is not None and not self._ready.done():
                        self._ready.set_result(msg.body)
                    continue
                for fd in fds:
                    os.close(fd)
                if msg.kind is Kind.NOTE:
                    self._note(msg.body)
                else:
                    self._reply(msg)
            if self._sock is None:
                return

    def _note(self, note: object) -> None:
        if not isinstance(note, Notification):
            log.warning("offload engine sent a %s as a notification", type(note).__name__)
            return
        if isinstance(note, PeerDeleted):
            self._peers.discard(note.peer_id)
            self._senders.pop(note.peer_id, None)
        self._emit(note)

    # ------------------------------------------------------------------ the workers' direct sockets

    def _adopt_direct(self, fds: list[int]) -> None:
        assert self._loop is not None
        self._drop_direct()
        for index, fd in enumerate(fds):
            sock = socket.socket(fileno=fd)
            sock.setblocking(False)
            self._direct.append(sock)
            self._loop.add_reader(fd, self._on_direct, index)

    def _drain_direct(self) -> None:
        for index, sock in enumerate(self._direct):
            if sock.fileno() >= 0:
                self._on_direct(index)

    def _on_direct(self, index: int) -> None:
        sock = self._direct[index]
        while sock.fileno() >= 0:
            try:
                msg, fds = wire.recv(sock)
            except BlockingIOError:
                return
            except ProtocolError as e:
                log.warning("offload engine worker %d sent an undecodable message: %s", index, e)
                continue
            except OSError:
                msg, fds = None, []
            for fd in fds:
                os.close(fd)
            if msg is None:  # the worker is gone; the controller reports what that means
                if self._loop is not None:
                    with contextlib.suppress(Exception):
                        self._loop.remove_reader(sock.fileno())
                sock.close()
                return
            if msg.kind in (Kind.CONTROL, Kind.NOTE):
                self._note(msg.body)
            else:
                self._reply(msg)

    def _drop_direct(self) -> None:
        for sock in self._direct:
            if sock.fileno() >= 0:
                if self._loop is not None:
                    with contextlib.suppress(Exception):
                        self._loop.remove_reader(sock.fileno())
                sock.close()
        self._direct.clear()

    def _engine_gone(self) -> None:
        closing = self._closed
        if self._loop is not None and self._sock is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._sock.fileno())
        self._fail_pending(BackendError("the offload engine exited"))
        self._drop_direct()
        # A dead engine is never reused: the next command starts a new one (the edge restarts
        # the connection on the notifications below and sends NewIface again).
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._starting = None
        if self._proc is not None:
            proc, self._proc = self._proc, None
            if self._loop is not None:
                self._loop.run_in_executor(None, proc.wait)  # reap it; it is already exiting
        ifname, self._ifname = self._ifname, None
        if not closing:
            log.error("the offload engine exited unexpectedly; a new one starts with the next command")
            if ifname is not None:
                self._emit(IfaceDeleted(ifname, "the offload engine exited"))
            for peer_id in sorted(self._peers):
                self._emit(PeerDeleted(peer_id, PeerDelReason.TRANSPORT_ERROR))
        self._peers.clear()
        self._senders.clear()

    def _emit(self, note: Notification) -> None:
        self._subscribers.emit(self._loop, note)
