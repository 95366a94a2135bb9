"""systemd's readiness protocol (sd_notify): ``READY=1`` once traffic can flow, ``STATUS=``, ``STOPPING=1``.

A ``Type=notify`` unit sets ``NOTIFY_SOCKET`` (a path, or an abstract socket name starting
with ``@``); each state is one datagram of ``KEY=value`` lines. Without the variable nothing is
sent. OpenVPN says READY=1 while it starts, before the tunnel is up; pyovpn says it when the
tunnel (or the server) is actually up, which is what units ordered ``After=`` it need.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("pyovpn")


class SystemdNotifier:
    """Sends states to the service manager; does nothing when not run by one."""

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._address = "\0" + address[1:] if address and address.startswith("@") else address
        self._ready = False

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def send(self, **state: str) -> bool:
        """Send ``KEY=value`` lines (``send(READY="1", STATUS="...")``); whether it was delivered."""
        if not self._address:
            return False
        payload = "\n".join(f"{k}={v}" for k, v in state.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(payload, self._address)
        except OSError as e:
            log.warning("sd_notify to %s failed: %s", self._address.lstrip("\0"), e)
            return False
        return True

    def ready(self, status: str) -> None:
        """READY=1 the first time, then only the status line."""
        if self._ready:
            self.send(STATUS=status)
        else:
            self._ready = self.send(READY="1", STATUS=status) or self._ready

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def reloading(self) -> None:
        """SIGHUP: systemd then waits for READY=1 again, sent when the tunnel is back."""
        self.send(RELOADING="1", STATUS="restarting")
        self._ready = False

    def stopping(self) -> None:
        self.send(STOPPING="1", STATUS="exiting")
