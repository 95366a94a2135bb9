"""The server's address pool (``ifconfig-pool``, ``ifconfig-ipv6-pool``, ``ifconfig-pool-persist``)."""

from __future__ import annotations

import contextlib
import heapq
import ipaddress
import os
from pathlib import Path

from pyovpn.config import Options
from pyovpn.errors import ConfigError, PyovpnError


class AddressPool:
    """IPv4 (and optional IPv6) addresses for clients; sticky per common name like ifconfig-pool-persist."""

    def __init__(
        self, first: str, last: str, netmask: str, v6_base: str | None, persist_file: str | None = None
    ) -> None:
        self.netmask = netmask
        start, end = int(ipaddress.IPv4Address(first)), int(ipaddress.IPv4Address(last))
        if end < start:
            raise ConfigError(f"ifconfig-pool {first} {last}: the end is before the start")
        # a heap, lowest address first; may hold taken addresses (a sticky one taken out of
        # order, or one pushed twice): _used is the truth and acquire() skips those
        self._free = list(range(start, end + 1))
        self._start, self._end = start, end
        self._v6 = ipaddress.IPv6Interface(v6_base) if v6_base else None
        self._used: dict[int, str] = {}  # address -> common name
        self._sticky: dict[str, int] = {}
        self._persist = persist_file
        if persist_file and os.path.exists(persist_file):
            for line in Path(persist_file).read_text().splitlines():
                parts = line.split(",")
                if len(parts) >= 2:
                    with contextlib.suppress(ValueError):
                        self._sticky[parts[0]] = int(ipaddress.IPv4Address(parts[1]))

    @classmethod
    def from_options(cls, opts: Options) -> AddressPool | None:
        """The pool the options configure, or None (every client then needs an ifconfig-push)."""
        if not opts.ifconfig_pool:
            return None
        first, last, mask = opts.ifconfig_pool
        return cls(
            first,
            last,
            mask or (opts.ifconfig[1] if opts.ifconfig else "255.255.255.0"),
            opts.ifconfig_ipv6_pool,
            opts.ifconfig_pool_persist[0] if opts.ifconfig_pool_persist else None,
        )

    @property
    def has_ipv6(self) -> bool:
        return self._v6 is not None

    def _v6_for(self, v4: int, start: int) -> str | None:
        if self._v6 is None:
            return None
        addr = self._v6.ip + (v4 - start)
        return f"{addr}/{self._v6.network.prefixlen}"

    def acquire(self, cn: str, *, exclusive_cn: bool) -> tuple[str, str | None]:
        want = self._sticky.get(cn) if exclusive_cn else None
        if want is not None and self._start <= want <= self._end and want not in self._used:
            addr = want
        else:
            while self._free and self._free[0] in self._used:
                heapq.heappop(self._free)
            if not self._free:
                raise PyovpnError("ifconfig pool exhausted")
            addr = heapq.heappop(self._free)
        self._used[addr] = cn
        self._sticky[cn] = addr
        self._save()
        return str(ipaddress.IPv4Address(addr)), self._v6_for(addr, self._start)

    def release(self, address: str) -> None:
        addr = int(ipaddress.IPv4Address(address))
        if self._used.pop(addr, None) is not None:
            heapq.heappush(self._free, addr)

    def _save(self) -> None:
        if not self._persist:
            return
        text = "".join(f"{cn},{ipaddress.IPv4Address(a)},\n" for cn, a in sorted(self._sticky.items()))
        with contextlib.suppress(OSError):
            Path(self._persist).write_text(text)
