"""How the host reaches an address right now (``ip route get``): OpenVPN's "net_gateway".

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


def _lookup(ipr: IPRoute, address: str) -> RouteLookup | None:
    ip = ipaddress.ip_address(address)
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    try:
        answer = ipr.route("get", dst=str(ip))
    except NetlinkError as e:
        if e.code in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN):
            return None
        raise
    if not answer:
        return None
    msg = answer[0]
    oif = msg.get_attr("RTA_OIF")
    gateway = msg.get_attr("RTA_GATEWAY")
    if oif is None:
        return None
    links = ipr.get_links(oif)
    if not links:
        return None
    ifname = str(links[0].get_attr("IFLA_IFNAME"))
    networks = []
    for a in ipr.get_addr(index=oif, family=family):
        iface = ipaddress.ip_interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
        if not iface.network.is_link_local:
            networks.append(str(iface.network))
    metric = None
    for r in ipr.get_routes(family=family, table=MAIN_TABLE):
        if r["dst_len"] == 0 and r.get_attr("RTA_OIF") == oif and r.get_attr("RTA_GATEWAY") == gateway:
            metric = r.get_attr("RTA_PRIORITY")
            break
    return RouteLookup(ifname, None if gateway is None else str(gateway), tuple(networks), metric)


def route_to(address: str) -> RouteLookup | None:
    """The device and next hop the host uses for ``address`` now; None if it has no route."""

    def op() -> RouteLookup | None:
        try:
            with IPRoute() as ipr:
                return _lookup(ipr, address)
        except (NetlinkError, OSError):
            return None

    return call_outside_loop(op)
