"""Where the daemon's log lines go (stderr, a `log` file or syslog) and OpenVPN's `mute` limit."""

from __future__ import annotations

import logging
import logging.handlers
import os
import socket

SYSLOG_SOCKET = "/dev/log"


def destination_handler(
    *, log_file: str | None, append: bool, syslog_ident: str | None, syslog_socket: str = SYSLOG_SOCKET
) -> tuple[logging.Handler, str | None]:
    """The handler for the configured destination, and a warning to log if syslog was unavailable.

    As in OpenVPN, a log file wins over syslog. Syslog lines carry their own time, so the caller
    formats them without one.
    """
    if log_file:
        return logging.FileHandler(log_file, mode="a" if append else "w"), None
    if syslog_ident is not None:
        problem = _unreachable(syslog_socket)
        if problem is not None:
            # Nothing listens (a container, a minimal chroot): rather than drop every line the
            # way openlog() would, they go to stderr.
            return logging.StreamHandler(), (
                f"syslog: cannot reach the system logger at {syslog_socket} ({problem}); "
                "logging to stderr instead"
            )
        handler = logging.handlers.SysLogHandler(
            address=syslog_socket, facility=logging.handlers.SysLogHandler.LOG_DAEMON
        )
        handler.ident = f"{syslog_ident}[{os.getpid()}]: "
        return handler, None
    return logging.StreamHandler(), None


def _unreachable(path: str) -> str | None:
    """Why nothing accepts log lines at the unix socket ``path``, or None if something does."""
    reason = "no such socket"
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):  # syslog daemons listen on either
        with socket.socket(socket.AF_UNIX, kind) as probe:
            try:
                probe.connect(path)
            except OSError as exc:
                reason = exc.strerror or str(exc)
                continue
            return None
    return reason


class MuteFilter(logging.Filter):
    """`mute N`: pass at most N consecutive records of one kind, then count the rest.

    A record's kind is its level and message template (the text before %-formatting), the
    closest thing to OpenVPN's message categories. When a different kind arrives, one line
    says how many were left out.
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self._kind: tuple[int, object] | None = None
        self._run = 0
        self._suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        kind = (record.levelno, record.msg)
        if kind == self._kind:
            self._run += 1
            if self._run > self.limit:
                self._suppressed += 1
                return False
            return True
        if self._suppressed:
            # Prepend the summary to this record so it reaches exactly the same handlers.
            note = f"{self._suppressed} message(s) like the previous one suppressed by --mute"
            record.msg = f"{note}\n{record.getMessage()}"
            record.args = None
        self._kind, self._run, self._suppressed = kind, 1, 0
        return True
