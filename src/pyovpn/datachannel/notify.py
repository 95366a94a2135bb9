"""How a data-channel backend hands its notifications to the subscribers.

Every backend delivers ``PeerDeleted``, ``KeyExhausted``, ``PeerFloated`` and
``ControlPacket`` the same way: from the event loop, never re-entrantly from inside the
reader or command that caused them, and a failing callback is logged without keeping the
notification from the others.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from pyovpn.datachannel.api import Notification

__all__ = ["Subscribers"]

log = logging.getLogger(__name__)


class Subscribers:
    """The callbacks registered with one backend's ``subscribe``."""

    def __init__(self) -> None:
        self._callbacks: list[Callable[[Notification], None]] = []

    def __bool__(self) -> bool:
        return bool(self._callbacks)

    def add(self, callback: Callable[[Notification], None]) -> None:
        self._callbacks.append(callback)

    def emit(self, loop: asyncio.AbstractEventLoop | None, notification: Notification) -> None:
        """Deliver ``notification`` on the loop's next turn (dropped without loop or subscribers)."""
        if loop is not None and self._callbacks:
            loop.call_soon(self.deliver, notification)

    def deliver(self, notification: Notification) -> None:
        """Call every subscriber now, in the order they subscribed."""
        for callback in self._callbacks:
            try:
                callback(notification)
            except Exception:
                log.exception("data-channel notification callback failed for %r", notification)
