"""OpenVPN's `mute N` for the daemon's log handlers: at most N consecutive lines of one kind."""

from __future__ import annotations

import logging


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
