"""The server's address pool (``ifconfig-pool``, ``ifconfig-ipv6-pool``, ``ifconfig-pool-persist``).

With `topology net30` each client takes a /30 of the pool, as in OpenVPN: the client's address is
the block's third (``.6`` of ``.4/30``) and its point-to-point peer the second (``.5``).
"""

from __future__ import annotations

import contextlib
import heapq
import ipaddress
import logging
import os
from pathlib import Path
from typing import IO

from pyovpn.config import Options
from pyovpn.errors import ConfigError, PyovpnError

log = logging.getLogger("pyovpn.server")


class AddressPool:
    """IPv4 (and optional IPv6) addresses for clients; sticky per common name like ifconfig-pool-persist.

    Internally an entry is its first address (a /30 block's network address with ``net30``); the
    addresses handed out and taken back are the clients' own.
    """

    def __init__(
        self,
        first: str,
        last: str,
        netmask: str,
        v6_base: str | None,
        persist_file: str | None = None,
        persist_seconds: int = 600,
        *,
        net30: bool = False,
    ) -> None:
        self.netmask = netmask
        self.net30 = net30
        self._step, self._offset = (4, 2) if net30 else (1, 0)
        start, end = int(ipaddress.IPv4Address(first)), int(ipaddress.IPv4Address(last))
        if net30:
            start = (start + 3) & ~3  # whole /30 blocks inside the range, as OpenVPN
            end = ((end + 1) & ~3) - 1
        if end < start:
            raise ConfigError(f"ifconfig-pool {first} {last}: the end is before the start")
        # a heap, lowest address first; may hold a taken address (a sticky one taken out of
        # order): _used is the truth and acquire() skips those. _queued is the heap's members, so
        # an address goes in once however often its client comes back (else the heap grows by one
        # entry per reconnect of a sticky client)
        self._free = list(range(start, end + 1, self._step))
        self._queued = set(self._free)
        self._start, self._end = start, end
        self._v6 = ipaddress.IPv6Interface(v6_base) if v6_base else None
        self._used: dict[int, str] = {}  # address -> common name
        self._sticky: dict[str, int] = {}
        # opened once, now, like OpenVPN: the server drops to `user nobody` later and could then
        # neither create nor rewrite a root-owned file; 0 seconds means read it, never write it
        self._persist: IO[str] | None = None
        if persist_file and persist_seconds > 0:
            try:
                self._persist = _persist_handle(persist_file)
            except OSError as exc:
                raise ConfigError(
                    f"ifconfig-pool-persist: cannot open '{persist_file}' for writing ({exc}); "
                    "fix the path or its permissions"
                ) from None
        if self._persist is not None:
            self._persist.seek(0)
            self._load(self._persist.read())
        elif persist_file and os.path.exists(persist_file):
            self._load(Path(persist_file).read_text())

    def _load(self, text: str) -> None:
        for line in text.splitlines():
            parts = line.split(",")
            if len(parts) >= 2:
                with contextlib.suppress(ValueError):
                    self._sticky[parts[0]] = int(ipaddress.IPv4Address(parts[1])) - self._offset

    @classmethod
    def from_options(cls, opts: Options) -> AddressPool | None:
        """The pool the options configure, or None (every client then needs an ifconfig-push)."""
        if not opts.ifconfig_pool:
            return None
        first, last, mask = opts.ifconfig_pool
        net30 = opts.topology == "net30"
        return cls(
            first,
            last,
            "" if net30 else mask or (opts.ifconfig[1] if opts.ifconfig else "255.255.255.0"),
            opts.ifconfig_ipv6_pool,
            opts.ifconfig_pool_persist[0] if opts.ifconfig_pool_persist else None,
            opts.ifconfig_pool_persist[1] if opts.ifconfig_pool_persist else 600,
            net30=net30,
        )

    @property
    def has_ipv6(self) -> bool:
        return self._v6 is not None

    def _v6_for(self, v4: int, start: int) -> str | None:
        if self._v6 is None:
            return None
        addr = self._v6.ip + (v4 - start) // self._step
        return f"{addr}/{self._v6.network.prefixlen}"

    def acquire(self, cn: str, *, exclusive_cn: bool) -> tuple[str, str | None]:
        want = self._sticky.get(cn) if exclusive_cn else None
        if (
            want is not None
            and self._start <= want <= self._end
            and (want - self._start) % self._step == 0
            and want not in self._used
        ):
            addr = want
        else:
            addr = self._take_free(cn)
        self._used[addr] = cn
        self._sticky[cn] = addr
        self._save()
        return str(ipaddress.IPv4Address(addr + self._offset)), self._v6_for(addr, self._start)

    def _take_free(self, cn: str) -> int:
        """The lowest free address not remembered for another common name (OpenVPN's order); when
        only remembered ones are left, the lowest of those is taken from the name it was kept for."""
        kept_for_others = {a for name, a in self._sticky.items() if name != cn}
        skipped: list[int] = []
        addr: int | None = None
        while self._free:
            candidate = heapq.heappop(self._free)
            self._queued.discard(candidate)
            if candidate in self._used:
                continue
            if candidate in kept_for_others:
                skipped.append(candidate)
                continue
            addr = candidate
            break
        if addr is None:
            if not skipped:
                raise PyovpnError("ifconfig pool exhausted")
            addr = skipped.pop(0)
            for name in [name for name, a in self._sticky.items() if a == addr]:
                del self._sticky[name]
        for candidate in skipped:
            self._queue(candidate)
        return addr

    def _queue(self, addr: int) -> None:
        if addr not in self._queued:
            self._queued.add(addr)
            heapq.heappush(self._free, addr)

    def release(self, address: str) -> None:
        addr = int(ipaddress.IPv4Address(address)) - self._offset
        if self._used.pop(addr, None) is not None:
            self._queue(addr)

    def persist_text(self) -> str:
        """The ifconfig-pool-persist file as OpenVPN 2.6 writes it: `CN,IPv4,IPv6` (IPv6 empty if none)."""
        lines = []
        for cn, a in sorted(self._sticky.items()):
            v6 = self._v6_for(a, self._start)
            lines.append(f"{cn},{ipaddress.IPv4Address(a + self._offset)},{v6.split('/')[0] if v6 else ''}\n")
        return "".join(lines)

    def _save(self) -> None:
        if self._persist is None:
            return
        try:
            self._persist.seek(0)
            self._persist.truncate()
            self._persist.write(self.persist_text())
            self._persist.flush()
        except OSError as exc:
            log.error("ifconfig-pool-persist: cannot write '%s': %s", self._persist.name, exc)


# one handle per file for the process's life: a restart (SIGHUP) after the privilege drop builds a
# new pool but could no longer open the root-owned file, so it reuses the handle opened as root
_PERSIST_HANDLES: dict[str, IO[str]] = {}


def _persist_handle(path: str) -> IO[str]:
    key = os.path.abspath(path)
    handle = _PERSIST_HANDLES.get(key)
    if handle is None or handle.closed:
        handle = _PERSIST_HANDLES[key] = open(key, "a+")  # noqa: SIM115 - held for the process's life
    return handle
