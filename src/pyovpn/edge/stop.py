"""Why a connection or server instance ended, and so what the daemon does next.

A :class:`Stop` is raised inside a connection to end it and is also what its ``run()``
returns; the daemon branches on :class:`StopReason`, never on the message text.
"""

from __future__ import annotations

import enum

# the signals the daemon handles; USR1 and HUP restart (OpenVPN's soft restart), TERM and INT exit
RESTART_SIGNALS = frozenset({"SIGUSR1", "SIGHUP"})
EXIT_SIGNALS = frozenset({"SIGTERM", "SIGINT"})
SIGNALS = RESTART_SIGNALS | EXIT_SIGNALS


class StopReason(enum.Enum):
    SIGNAL_EXIT = "signal-exit"  # SIGTERM/SIGINT: say goodbye to the peer, exit 0
    SIGNAL_RESTART = "signal-restart"  # SIGUSR1/SIGHUP: say goodbye, start again at once
    RESTART = "restart"  # an error or the peer went away: start again after a delay
    FATAL = "fatal"  # configuration or setup cannot work: exit non-zero


class Stop(Exception):
    """The end of one connection (or server instance): its reason kind, message and exit code."""

    def __init__(
        self,
        reason: StopReason,
        message: str,
        *,
        exit_code: int = 0,
        signal: str | None = None,
        first_packet: tuple[bytes, tuple[str, int] | None] | None = None,
        auth_failed: bool = False,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.exit_code = exit_code
        self.signal = signal
        #: a restarted peer's first packet (and its source): the next connection starts from it,
        #: at once, instead of waiting out the restart delay and the peer's retransmission
        self.first_packet = first_packet
        self.auth_failed = auth_failed  # the server said AUTH_FAILED: auth-retry may try again

    @classmethod
    def restart(cls, message: str) -> Stop:
        return cls(StopReason.RESTART, message)

    @classmethod
    def peer_restarted(cls, packet: bytes, source: tuple[str, int] | None) -> Stop:
        """The peer sent a new hard reset: start again now, answering that packet."""
        return cls(StopReason.RESTART, "peer restarted (new hard reset)", first_packet=(packet, source))

    @classmethod
    def fatal(cls, message: str, exit_code: int = 1) -> Stop:
        return cls(StopReason.FATAL, message, exit_code=exit_code)

    @classmethod
    def by_signal(cls, name: str) -> Stop:
        """The stop a delivered signal causes; ``name`` is one of :data:`SIGNALS`."""
        if name not in SIGNALS:
            raise ValueError(f"not a signal the daemon handles: {name!r}")
        kind = StopReason.SIGNAL_RESTART if name in RESTART_SIGNALS else StopReason.SIGNAL_EXIT
        return cls(kind, f"signal {name}", signal=name)

    @property
    def by_a_signal(self) -> bool:
        return self.reason in (StopReason.SIGNAL_EXIT, StopReason.SIGNAL_RESTART)

    def __repr__(self) -> str:
        return f"Stop({self.reason.name}, {self.message!r}, exit_code={self.exit_code})"
