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
    try:
        net = ipaddress.ip_network(f"{network}/{prefixlen}", strict=False)
        gw = ipaddress.ip_address(gateway) if gateway is not None else None
    except ValueError as exc:
        raise BackendError(f"{what}: {exc}") from None

    def op() -> None:
        with IPRoute() as ipr:
            spec = _spec(ipr, what, net, ifname)
            spec.update(proto="boot", type="unicast")  # RTPROT_BOOT, as OpenVPN adds routes
            if gw is not None:
                spec["gateway"] = str(gw)
            if metric is not None:
                spec["priority"] = metric
            ipr.route(_CREATE_FIRST, **spec)

    _call(what, op)


def del_route_exact(
    ifname: str, network: str, prefixlen: int, gateway: str | None = None, metric: int | None = None
) -> None:
    """Remove the route :func:`add_route_first` added (the same device, gateway and metric only)."""
    what = f"delete route {network}/{prefixlen} via {gateway or ifname}"
    try:
        net = ipaddress.ip_network(f"{network}/{prefixlen}", strict=False)
        gw = ipaddress.ip_address(gateway) if gateway is not None else None
    except ValueError as exc:
        raise BackendError(f"{what}: {exc}") from None

    def op() -> None:
        with IPRoute() as ipr:
            spec = _spec(ipr, what, net, ifname)
            if gw is not None:
                spec["gateway"] = str(gw)
            if metric is not None:
                spec["priority"] = metric
            try:
                ipr.route("del", **spec)
            except NetlinkError as e:
                if e.code != errno.ESRCH:
                    raise

    _call(what, op)


def _spec(
    ipr: IPRoute, what: str, net: ipaddress.IPv4Network | ipaddress.IPv6Network, ifname: str
) -> dict[str, object]:
    spec: dict[str, object] = {
        "dst": str(net.network_address),
        "dst_len": net.prefixlen,
        "family": socket.AF_INET if net.version == 4 else socket.AF_INET6,
    }
    if ifname:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise BackendError(f"{what}: no interface named {ifname!r}")
        spec["oif"] = int(found[0])
    return spec


def _call(what: str, op: Callable[[], None]) -> None:
    try:
        call_outside_loop(op)
    except NetlinkError as e:
        reason = "it already exists" if e.code == errno.EEXIST else os.strerror(e.code)
        raise BackendError(f"{what}: {reason}") from None
    except OSError as e:
        raise BackendError(f"{what}: {e.strerror or e}") from None
