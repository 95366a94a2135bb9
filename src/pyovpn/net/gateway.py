"""The host's current gateway, found as OpenVPN 2.6 finds its "net_gateway" on Linux.

Answers are plain tuples so this module stays below the edge; a lookup that finds no route (or
fails) answers None, which the caller reports as "the current gateway is unknown".
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from dataclasses import dataclass

from pyroute2 import IPRoute, NetlinkError

from pyovpn.net.blocking import call_outside_loop

MAIN_TABLE = 254


@dataclass(frozen=True)
class RouteLookup:
    ifname: str
    gateway: str | None  # None: the address is on-link
    networks: tuple[str, ...]  # the device's subnets of that family, "192.168.1.0/24"
    default_metric: int | None  # the metric of the main table's default route through that gateway


def _device(
    ipr: IPRoute, oif: int, family: int, gateway: str | None, metric: int | None
) -> RouteLookup | None:
    links = ipr.get_links(oif)
    if not links:
        return None
    networks = []
    for a in ipr.get_addr(index=oif, family=family):
        iface = ipaddress.ip_interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
        if not iface.network.is_link_local:
            networks.append(str(iface.network))
    return RouteLookup(str(links[0].get_attr("IFLA_IFNAME")), gateway, tuple(networks), metric)


def _default_v4(ipr: IPRoute) -> RouteLookup | None:
    """The main table's IPv4 default route in use (lowest metric): OpenVPN 2.6's net_gateway."""
    best = None
    for r in ipr.get_routes(family=socket.AF_INET, table=MAIN_TABLE):
        if r["dst_len"] != 0 or r.get_attr("RTA_OIF") is None:
            continue
        metric = r.get_attr("RTA_PRIORITY") or 0
        if best is None or metric < (best.get_attr("RTA_PRIORITY") or 0):
            best = r
    if best is None:
        return None
    gateway = best.get_attr("RTA_GATEWAY")
    metric = best.get_attr("RTA_PRIORITY")
    return _device(ipr, best.get_attr("RTA_OIF"), socket.AF_INET, gateway, metric)


def _route_get_v6(ipr: IPRoute, address: str) -> RouteLookup | None:
    """The kernel's route to ``address`` (OpenVPN 2.6 asks this for IPv6)."""
    try:
        answer = ipr.route("get", dst=address, family=socket.AF_INET6)
    except NetlinkError as e:
        if e.code in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN):
            return None
        raise
    if not answer or answer[0].get_attr("RTA_OIF") is None:
        return None
    msg = answer[0]
    gateway = msg.get_attr("RTA_GATEWAY")
    oif = msg.get_attr("RTA_OIF")
    metric = None
    for r in ipr.get_routes(family=socket.AF_INET6, table=MAIN_TABLE):
        if r["dst_len"] == 0 and r.get_attr("RTA_OIF") == oif and r.get_attr("RTA_GATEWAY") == gateway:
            metric = r.get_attr("RTA_PRIORITY")
            break
    return _device(ipr, oif, socket.AF_INET6, gateway, metric)


def _lookup(ipr: IPRoute, address: str) -> RouteLookup | None:
    if ipaddress.ip_address(address).version == 4:
        return _default_v4(ipr)
    return _route_get_v6(ipr, address)


def route_to(address: str) -> RouteLookup | None:
    """OpenVPN 2.6's "net_gateway" for a server at ``address``: for IPv4 the main table's default
    route (whatever the server's address), for IPv6 the kernel's route to the address; None if
    there is none."""

    def op() -> RouteLookup | None:
        try:
            with IPRoute() as ipr:
                return _lookup(ipr, address)
        except (NetlinkError, OSError):
            return None

    return call_outside_loop(op)
