"""``OffloadDataChannel``: the data channel in a separate multi-process engine, same command set.

This is the control plane's side of :mod:`pyovpn.datachannel.engine`. It implements
:class:`~pyovpn.datachannel.api.DataChannel` by sending every command, unchanged, to the
engine over a ``SOCK_SEQPACKET`` unix socket (tagged JSON, see ``engine/wire.py``) and
passing ``NewPeer``'s socket as an SCM_RIGHTS descriptor, exactly as the kernel ``ovpn``
driver receives it over netlink. Notifications (``ControlPacket``, ``PeerDeleted``,
``PeerFloated``, ``KeyExhausted``) come back on the same socket and are delivered from the
event loop, so the control plane cannot tell this backend from the others.

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
from collections.abc import Callable
from typing import Any

from pyovpn.datachannel.api import (
    Capabilities,
    Command,
    KeyInfo,
    NewIface,
    NewPeer,
    Notification,
    PeerDeleted,
    PeerDelReason,
    PeerInfo,
    Stats,
)
from pyovpn.datachannel.crypto import DEFAULT_REPLAY_WINDOW
from pyovpn.datachannel.engine.wire import decode, encode, recv_msg, send_msg
from pyovpn.errors import BackendError

__all__ = ["OffloadDataChannel"]

log = logging.getLogger(__name__)

_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 5.0


class OffloadDataChannel:
    """The :class:`~pyovpn.datachannel.api.DataChannel` backed by the multi-process offload engine.

    Options: ``workers`` (worker processes; default ``os.cpu_count()``, a P2P peer uses at
    most two: transmit and receive), ``replay_window``, ``udp_gso``/``udp_gro`` (socket
    batching), ``tun_offload`` (IFF_VNET_HDR + TSO/USO/checksum offloads on the TUN),
    ``tun_gro`` (coalesce received TCP segments into GSO writes), ``mssfix`` (clamp the MSS of
    TCP SYNs so encrypted packets fit this many outer IP bytes, OpenVPN's default 1492;
    0 disables), ``socket_buffer`` (SO_SNDBUF/SO_RCVBUF of the handed-over socket).
    """

    name = "userspace-offload"
    capabilities = Capabilities(tcp_backlog=True, stats=True, gso=True, tun_offloads=True, hooks=True)

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
            "mssfix": mssfix,
            "socket_buffer": socket_buffer,
        }
        self._python = python or sys.executable
        self._log_level = log_level or logging.getLevelName(logging.getLogger().getEffectiveLevel())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._ready: asyncio.Future[dict[str, Any]] | None = None
        self._starting: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next_id = 1
        self._subscribers: list[Callable[[Notification], None]] = []
        self._peers: set[int] = set()
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
        self._subscribers.append(callback)

    async def request(self, command: Command) -> PeerInfo | KeyInfo | None:
        what = type(command).__name__
        if self._closed:
            raise BackendError(f"{what}: the offload backend is closed")
        await self._ensure_started()
        fds: list[int] = []
        body = command
        if isinstance(command, NewPeer):
            fds = [command.socket_fd]
            try:
                os.fstat(command.socket_fd)
            except OSError as e:
                raise BackendError(
                    f"{what}: socket fd {command.socket_fd} is not usable: {e.strerror or e}"
                ) from None
        result = await self._call({"op": "cmd", "cmd": encode(body)}, fds)
        if isinstance(command, NewIface) and isinstance(result, dict):
            self._ifname = result.get("ifname")
            return None
        if isinstance(command, NewPeer):
            self._peers.add(command.peer_id)
        return result  # type: ignore[no-any-return]

    async def peer_stats(self, peer_id: int) -> Stats:
        """All counters of a peer summed over the workers, including the ``extra`` drop reasons."""
        await self._ensure_started()
        return await self._call({"op": "stats", "peer_id": peer_id})  # type: ignore[no-any-return]

    async def debug(self, peer_id: int, what: str, **kw: Any) -> Any:
        """Test hooks on the worker holding a peer's transmit side (``set_tx_pid``, ``encrypt``)."""
        await self._ensure_started()
        return await self._call(
            {"op": "debug", "peer_id": peer_id, "what": what, **{k: encode(v) for k, v in kw.items()}}
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._starting is not None and not self._starting.done():
            with contextlib.suppress(BaseException):
                await self._starting
        if self._sock is not None and self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(BackendError, OSError, asyncio.TimeoutError):
                await asyncio.wait_for(self._call({"op": "close"}), _STOP_TIMEOUT)
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
        self.worker_pids = list(info.get("workers", []))
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
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(exc)

    # ------------------------------------------------------------------ messages

    async def _call(self, msg: dict[str, Any], fds: list[int] | None = None) -> Any:
        sock = self._sock
        if sock is None:
            raise BackendError("the offload engine is not running")
        assert self._loop is not None
        rid = self._next_id
        self._next_id += 1
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._pending[rid] = fut
        msg = {"id": rid, **msg}
        while True:
            try:
                send_msg(sock, msg, fds or ())
                break
            except BlockingIOError:
                await asyncio.sleep(0.001)
            except OSError as e:
                self._pending.pop(rid, None)
                what = (
                    msg.get("cmd", {}).get("$d", msg.get("op"))
                    if isinstance(msg.get("cmd"), dict)
                    else msg["op"]
                )
                raise BackendError(f"{what}: cannot reach the offload engine: {e.strerror or e}") from None
        return await fut

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        while True:
            try:
                msg, fds = recv_msg(sock)
            except BlockingIOError:
                return
            except OSError:
                msg, fds = None, []
            for fd in fds:
                os.close(fd)
            if msg is None:
                self._engine_gone()
                return
            if "note" in msg:
                try:
                    note = decode(msg["note"])
                except (ValueError, TypeError):
                    log.warning("offload engine sent an undecodable notification")
                    continue
                if isinstance(note, PeerDeleted):
                    self._peers.discard(note.peer_id)
                self._emit(note)
            elif "ready" in msg:
                if self._ready is not None and not self._ready.done():
                    self._ready.set_result(msg["ready"])
            else:
                fut = self._pending.pop(msg.get("id", -1), None)
                if fut is None or fut.done():
                    continue
                if "err" in msg:
                    fut.set_exception(BackendError(msg["err"]))
                else:
                    try:
                        fut.set_result(decode(msg.get("ok")))
                    except (ValueError, TypeError) as e:
                        fut.set_exception(BackendError(f"undecodable engine reply: {e}"))

    def _engine_gone(self) -> None:
        closing = self._closed
        if self._loop is not None and self._sock is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._sock.fileno())
        self._fail_pending(BackendError("the offload engine exited"))
        if not closing:
            log.error("the offload engine exited unexpectedly")
            for peer_id in sorted(self._peers):
                self._emit(PeerDeleted(peer_id, PeerDelReason.TRANSPORT_ERROR))
            self._peers.clear()

    def _emit(self, note: Notification) -> None:
        if self._loop is not None and self._subscribers:
            self._loop.call_soon(self._dispatch, note)

    def _dispatch(self, note: Notification) -> None:
        for callback in self._subscribers:
            try:
                callback(note)
            except Exception:
                log.exception("data-channel notification callback failed for %r", note)
