"""Rate limits for what the server answers before a client has proved anything.

In the spirit of OpenVPN's connect-freq-initial, stateless replies are rate limited so a
replayed or spoofed reset cannot turn the server into a reflector; per source IP (a bounded
table) rather than globally, so a flood from some addresses does not lock out real clients.
"""

from __future__ import annotations

from collections import OrderedDict

CONNECT_FREQ_INITIAL = (100, 10.0)  # (replies, seconds) per source IP
RESET_LIMITER_ENTRIES = 16384


class TokenBucket:
    """``capacity`` tokens, refilled evenly over ``period`` seconds."""

    def __init__(self, capacity: int, period: float) -> None:
        self.capacity = capacity
        self.rate = capacity / period
        self.tokens = float(capacity)
        self.stamp: float | None = None

    def take(self, now: float) -> bool:
        if self.stamp is not None:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def refund(self) -> None:
        self.tokens = min(self.capacity, self.tokens + 1)


class ResetLimiter:
    """Per-source-IP token buckets in a bounded LRU table (memory stays flat under any flood)."""

    def __init__(self, capacity: int, period: float, entries: int = RESET_LIMITER_ENTRIES) -> None:
        self.capacity, self.period, self.entries = capacity, period, entries
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, ip: str, now: float) -> bool:
        bucket = self._buckets.pop(ip, None) or TokenBucket(self.capacity, self.period)
        self._buckets[ip] = bucket
        if len(self._buckets) > self.entries:
            self._buckets.popitem(last=False)
        return bucket.take(now)

    def refund(self, ip: str) -> None:
        bucket = self._buckets.get(ip)
        if bucket is not None:
            bucket.refund()
