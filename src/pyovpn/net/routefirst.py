"""Adding a route the way OpenVPN does on Linux: "create", without "exclusive".

With a route to the same destination and metric already there, the kernel then puts the new one
in front of it instead of refusing (EEXIST); only an identical route is refused. That is how
OpenVPN's `route 0.0.0.0 0.0.0.0` (or a pushed route the LAN also has) takes over while the
original route stays in place, to be used again once ours is deleted.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Callable

from pyroute2 import IPRoute, NetlinkError
from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST
from pyroute2.netlink.rtnl import RTM_NEWROUTE

from pyovpn.errors import BackendError
from pyovpn.net.blocking import call_outside_loop

_CREATE_FIRST = (RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE)


def add_route_first(
    ifname: str, network: str, prefixlen: int, gateway: str | None = None, metric: int | None = None
) -> None:
    """Route ``network/prefixlen`` through ``ifname`` (empty: wherever the gateway is), in front
    of an existing route to it."""
    what = f"add route {network}/{prefixlen} via {gateway or ifname}"
    route = _Route(what, ifname, network, prefixlen, gateway, metric)

    def op() -> None:
        with IPRoute() as ipr:
            spec = route.spec(ipr)
            spec.update(proto="boot", type="unicast")  # RTPROT_BOOT, as OpenVPN adds routes
            ipr.route(_CREATE_FIRST, **spec)

    _call(what, op)


def del_route_exact(
    ifname: str, network: str, prefixlen: int, gateway: str | None = None, metric: int | None = None
) -> None:
    """Remove the route :func:`add_route_first` added (the same device, gateway and metric only)."""
    what = f"delete route {network}/{prefixlen} via {gateway or ifname}"
    route = _Route(what, ifname, network, prefixlen, gateway, metric)

    def op() -> None:
        with IPRoute() as ipr:
            try:
                ipr.route("del", **route.spec(ipr))
            except NetlinkError as e:
                if e.code != errno.ESRCH:
                    raise

    _call(what, op)


class _Route:
    """One route's netlink attributes; a malformed address is refused before any netlink call."""

    def __init__(
        self, what: str, ifname: str, network: str, prefixlen: int, gateway: str | None, metric: int | None
    ) -> None:
        self.what, self.ifname, self.metric = what, ifname, metric
        try:
            self.net = ipaddress.ip_network(f"{network}/{prefixlen}", strict=False)
            self.gateway = ipaddress.ip_address(gateway) if gateway is not None else None
        except ValueError as exc:
            raise BackendError(f"{what}: {exc}") from None

    def spec(self, ipr: IPRoute) -> dict[str, object]:
        spec: dict[str, object] = {
            "dst": str(self.net.network_address),
            "dst_len": self.net.prefixlen,
            "family": socket.AF_INET if self.net.version == 4 else socket.AF_INET6,
        }
        if self.ifname:
            found = ipr.link_lookup(ifname=self.ifname)
            if not found:
                raise BackendError(f"{self.what}: no interface named {self.ifname!r}")
            spec["oif"] = int(found[0])
        if self.gateway is not None:
            spec["gateway"] = str(self.gateway)
        if self.metric is not None:
            spec["priority"] = self.metric
        return spec


def _call(what: str, op: Callable[[], None]) -> None:
    try:
        call_outside_loop(op)
    except NetlinkError as e:
        reason = "it already exists" if e.code == errno.EEXIST else os.strerror(e.code)
        raise BackendError(f"{what}: {reason}") from None
    except OSError as e:
        raise BackendError(f"{what}: {e.strerror or e}") from None
