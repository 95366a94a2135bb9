"""The client's connection list (OpenVPN's `remote` lines / `<connection>` blocks): which entry to
try next, how long to wait before it, and when to give up.

Sans-I/O: the caller opens sockets and resolves names, and reports what happened; randomness comes
in as a function and time as ``now``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pyovpn.config import Options

#: OpenVPN's cap on the backoff exponent: the delay is at most ``base << 15`` before the max clamps it.
_MAX_BACKOFF_SHIFT = 15
#: Attempts per entry before the delay starts doubling (OpenVPN slows down after 5 rounds).
_FREE_ROUNDS = 4


@dataclass(frozen=True)
class Entry:
    """One connection profile, every field already resolved against the global options."""

    host: str
    port: int
    proto: str  # "udp", "tcp-client" or "tcp-server"
    family: int | None = None  # 4 or 6 when forced (udp4, tcp6-client, ...)
    connect_retry: int = 1
    connect_retry_max_seconds: int = 300
    server_poll_timeout: int = 120


class GiveUp(Exception):
    """The list is exhausted (connect-retry-max, resolv-retry): the client exits with this message."""


def randomized_hostname(host: str, random_bytes: Callable[[int], bytes]) -> str:
    """`remote-random-hostname`: a fresh random hex label in front of a DNS name (not an address)."""
    if _is_address(host):
        return host
    return f"{random_bytes(6).hex()}.{host}"


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class ConnectionList:
    """The entries, the cursor and the counters OpenVPN keeps across restarts.

    ``advance()`` is called before every attempt. It moves to the next entry unless the previous
    attempt reached "Initialization Sequence Completed": then the first restart after it stays on the
    same entry (OpenVPN's ``no_advance``), and only a further failure moves on.
    """

    def __init__(
        self,
        entries: Sequence[Entry],
        *,
        connect_retry_max: int = 0,
        resolv_retry: int | None = None,
        shuffle: Callable[[int], int] | None = None,
    ) -> None:
        if not entries:
            raise ValueError("a connection list needs at least one entry")
        self.entries = list(entries)
        if shuffle is not None:
            # Fisher-Yates, once at start, as `remote-random` does; shuffle(n) returns 0..n-1
            for i in range(len(self.entries) - 1, 0, -1):
                j = shuffle(i + 1)
                self.entries[i], self.entries[j] = self.entries[j], self.entries[i]
        self.connect_retry_max = connect_retry_max
        self.resolv_retry = resolv_retry
        self.index = -1
        self.unsuccessful_attempts = 0
        self._no_advance = False
        self._attempts_started = 0
        self._resolve_failing_since: float | None = None

    @property
    def current(self) -> Entry:
        if self.index < 0:
            raise RuntimeError("advance() before asking for the current entry")
        return self.entries[self.index]

    def advance(self) -> Entry:
        """The entry for the next attempt; raises GiveUp once connect-retry-max rounds failed."""
        if self._no_advance and self.index >= 0:
            self._no_advance = False
        else:
            self.unsuccessful_attempts += 1
            self.index = (self.index + 1) % len(self.entries)
        limit = len(self.entries) * self.connect_retry_max
        if limit > 0 and self.unsuccessful_attempts > limit:
            raise GiveUp(
                f"All connections have been connect-retry-max ({self.connect_retry_max}) times "
                "unsuccessful, exiting"
            )
        self._attempts_started += 1
        return self.entries[self.index]

    def delay(self) -> float:
        """Seconds to wait before the attempt ``advance()`` just chose (0 for the very first one)."""
        if self._attempts_started <= 1:
            return 0.0
        entry = self.current
        seconds = 1 if entry.proto == "tcp-server" else entry.connect_retry
        backoff = self.unsuccessful_attempts // len(self.entries) - _FREE_ROUNDS
        if backoff > 0:
            seconds = max(seconds, 1) << min(backoff, _MAX_BACKOFF_SHIFT)
        return float(min(seconds, entry.connect_retry_max_seconds))

    def connected(self) -> None:
        """The tunnel came up: reset the failure count, and stay on this entry after a restart."""
        self.unsuccessful_attempts = 0
        self._no_advance = True
        self._resolve_failing_since = None

    def resolved(self) -> None:
        self._resolve_failing_since = None

    def resolve_failed(self, now: float, why: str) -> None:
        """A name did not resolve; raises GiveUp once it has failed for longer than resolv-retry."""
        if self._resolve_failing_since is None:
            self._resolve_failing_since = now
        if self.resolv_retry is not None and now - self._resolve_failing_since >= self.resolv_retry:
            raise GiveUp(f"{why} (resolv-retry {self.resolv_retry} s has run out), exiting")


def from_options(opts: Options, randbelow: Callable[[int], int]) -> ConnectionList | None:
    """The list for a client's `remote` lines or `<connection>` blocks; None with no remote.

    ``randbelow(n)`` (0..n-1) shuffles it when `remote-random` is set.
    """
    if not opts.remotes:
        return None
    entries = [
        Entry(
            host=r.host,
            port=opts.remote_port_for(r),
            proto=r.proto or opts.proto,
            family=r.family or opts.family,
            connect_retry=opts.connect_retry if r.connect_retry is None else r.connect_retry,
            connect_retry_max_seconds=(
                opts.connect_retry_max_seconds
                if r.connect_retry_max_seconds is None
                else r.connect_retry_max_seconds
            ),
            server_poll_timeout=(
                opts.server_poll_timeout if r.server_poll_timeout is None else r.server_poll_timeout
            ),
        )
        for r in opts.remotes
    ]
    return ConnectionList(
        entries,
        connect_retry_max=opts.connect_retry_max,
        resolv_retry=opts.resolv_retry,
        shuffle=randbelow if opts.remote_random else None,
    )
