"""What the daemon runs, one at a time: a one-peer connection or the P2MP server.

Both own a socket they read until the data channel takes it over, a queue of data-channel
commands worked off in order by one task, and the :class:`Stop` that ends them (the first
:meth:`Instance.stop` wins; the daemon acts on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Generic, TypeVar

from pyovpn.datachannel.api import Notification
from pyovpn.edge.stop import Stop

C = TypeVar("C")

WORKER_DRAIN_SECONDS = 5.0


class Instance(Generic[C]):
    """The shared lifecycle of :class:`pyovpn.p2p.Connection` and :class:`pyovpn.server.multi.MultiServer`."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock: socket.socket | None = None
        self._done: asyncio.Future[Stop] = self.loop.create_future()
        self._reading = False
        self._cmds: asyncio.Queue[C | None] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None

    async def run(self) -> Stop:
        raise NotImplementedError

    def on_notification(self, n: Notification) -> None:
        raise NotImplementedError

    def stop(self, stop: Stop) -> None:
        if not self._done.done():
            self._done.set_result(stop)

    @property
    def stopped(self) -> Stop | None:
        """How it ended, once :meth:`stop` was called."""
        return self._done.result() if self._done.done() else None

    async def _until_stopped(self) -> Stop:
        try:
            return await self._done
        finally:
            await self._teardown()

    async def _teardown(self) -> None:
        """Release what the running instance holds; runs once :meth:`stop` was called."""

    # ------------------------------------------------------------------ the socket

    def _on_readable(self) -> None:
        raise NotImplementedError

    def _start_reading(self) -> None:
        if not self._reading and self.sock is not None:
            self.loop.add_reader(self.sock.fileno(), self._on_readable)
            self._reading = True

    def _stop_reading(self) -> None:
        """The data channel reads the socket from now on (or it is about to close)."""
        if self._reading and self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self._reading = False

    # ------------------------------------------------------------------ data-channel commands

    async def _command_worker(self) -> None:
        raise NotImplementedError

    def _start_worker(self) -> None:
        self._worker = asyncio.create_task(self._command_worker())

    async def _drain_worker(self) -> None:
        """Let queued commands finish so the backend state stays consistent, then end the worker."""
        if self._worker:
            await self._cmds.put(None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._worker, WORKER_DRAIN_SECONDS)
