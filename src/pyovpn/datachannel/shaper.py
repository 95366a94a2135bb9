"""OpenVPN's `shaper`: the tunnel datagrams one P2P peer sends, held to a byte rate.

OpenVPN waits ``bytes / rate`` after each datagram it writes before it writes the next. The
userspace engine sends in batches, so the same budget is kept as a time debt: each batch pushes
``ready_at`` on by its bytes over the rate, and the engine reads no more from the TUN until then
(what waits meanwhile queues in the TUN, where the sending TCP feels it).

A batch is cut at :data:`BURST` bytes, far below the 208 KiB receive buffer a stock peer has by
default, so a shaped sender does not land more on it at once. Above 32 MB/s a batch grows to
:data:`TICK` seconds' worth: an epoll timer counts whole milliseconds, and smaller batches would
cap the rate. A timer that fires late must not lower the rate either, so lateness is credited
back, up to :data:`MAX_CREDIT` seconds and never more than one batch's time.

Pure arithmetic on the times it is given, so it is tested without a clock.
"""

from __future__ import annotations

from pyovpn.datachannel.api import SHAPER_MAX, SHAPER_MIN

__all__ = ["BURST", "MAX_CREDIT", "SHAPER_MAX", "SHAPER_MIN", "TICK", "Shaper"]
BURST = 64 * 1024  # bytes sent per wakeup of a shaped peer, at rates up to BURST / TICK
TICK = 0.002  # seconds: an epoll timer counts whole milliseconds, and wakes about one late
MAX_CREDIT = 0.005  # seconds of lateness credited back at most


class Shaper:
    """The send budget of one peer at ``rate`` bytes per second."""

    __slots__ = ("_slack", "burst", "rate", "ready_at")

    def __init__(self, rate: int) -> None:
        if not SHAPER_MIN <= rate <= SHAPER_MAX:
            raise ValueError(f"shaper rate {rate} is outside {SHAPER_MIN}..{SHAPER_MAX} bytes per second")
        self.rate = rate
        self.ready_at = 0.0
        # bytes per wakeup: above BURST / TICK (32 MB/s) a wakeup must carry a tick's worth,
        # or the timer's granularity would cap the rate
        self.burst = max(BURST, int(rate * TICK))
        self._slack = min(self.burst / rate, MAX_CREDIT)  # the lateness that is credited back

    def sent(self, nbytes: int, now: float) -> None:
        """``nbytes`` left at ``now``: the next send waits for them."""
        start = self.ready_at if self.ready_at > now - self._slack else now - self._slack
        self.ready_at = start + nbytes / self.rate

    def wait(self, now: float) -> float:
        """Seconds until the next send may start (0: now)."""
        return self.ready_at - now if self.ready_at > now else 0.0
