"""The client's routes, computed as OpenVPN 2.6 computes them on Linux: `route`, `route-ipv6`,
`redirect-gateway`/`redirect-private` (def1, local, autolocal, block-local, ipv6, !ipv4) and the
`net_gateway`/`vpn_gateway`/`remote_host` keywords, local or pushed.

:func:`plan_routes` is pure: options + pushed options + the host's current gateway in, an ordered
list of :class:`RouteChange` out (plus notes for what OpenVPN also does not do on Linux). Applying
and undoing the list is :mod:`pyovpn.edge.routejournal`'s job.

A route "via the VPN gateway" is bound to the tun device without a next hop: a tun device is
layer 3, so the next hop changes nothing on the wire, and in `topology p2p` it need not be an
address the kernel can reach. Routes "via net_gateway" go through the original gateway's device.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from pyovpn.config import Options
from pyovpn.proto.push import PushedOptions
from pyovpn.proto.redirect import RedirectFlags, redirect_from

V6_REDIRECT_NETS = ("::/3", "2000::/4", "3000::/4", "fc00::/7")  # OpenVPN's `redirect-gateway ipv6`
REMOTE_V6_HOST_METRIC = 1  # OpenVPN's metric for the server's IPv6 host route


@dataclass(frozen=True)
class HostRoute:
    network: str  # the network address, without /prefix
    prefixlen: int
    ifname: str  # "": the device the kernel reaches the gateway through
    gateway: str | None = None
    metric: int | None = None

    def __str__(self) -> str:
        via = f" via {self.gateway}" if self.gateway else ""
        if not self.ifname:
            return f"{self.network}/{self.prefixlen}{via}" + (
                f" metric {self.metric}" if self.metric is not None else ""
            )
        metric = f" metric {self.metric}" if self.metric is not None else ""
        return f"{self.network}/{self.prefixlen}{via} dev {self.ifname}{metric}"


@dataclass(frozen=True)
class RouteChange:
    action: Literal["add", "del"]
    route: HostRoute

    def undone(self) -> RouteChange:
        return RouteChange("del" if self.action == "add" else "add", self.route)

    def __str__(self) -> str:
        return f"{self.action} {self.route}"


@dataclass(frozen=True)
class NetGateway:
    """The host's route to the server before the tunnel: OpenVPN's "net_gateway" (rgi)."""

    ifname: str
    address: str | None  # None: on-link (no next hop)
    networks: tuple[str, ...] = ()  # the device's own subnets ("192.168.1.0/24"), for local/block-local
    metric: int | None = None  # of the default route, to put it back exactly


@runtime_checkable
class FindsGateways(Protocol):
    """A host network that can say how it reaches an address now (``ip route get``)."""

    def gateway_to(self, address: str) -> NetGateway | None: ...


@dataclass(frozen=True)
class RouteSpec:
    """One `route`/`route-ipv6`, local or pushed; network/gateway may be OpenVPN's keywords."""

    network: str  # IPv4 address or keyword; IPv6 "net/bits"
    netmask: str | None  # None for IPv6
    gateway: str | None
    metric: int | None


@dataclass(frozen=True)
class RoutingInputs:
    tun: str
    redirect: RedirectFlags
    routes: Sequence[RouteSpec]
    routes_ipv6: Sequence[RouteSpec]
    vpn_gateway: str | None  # route-gateway, else the ifconfig remote in net30/p2p
    has_ipv6: bool  # the device has an IPv6 address (OpenVPN redirects IPv6 only then)
    remote_host: str | None  # the server's address
    net_gateway: NetGateway | None  # IPv4 route to the server (or the default route)
    net_gateway_v6: NetGateway | None = None
    default_metric: int | None = None  # route-metric
    tun_network_v6: str | None = None  # the device address's own network: routed by the address
    tun_network_v4: str | None = None  # a gateway inside it is reached through the device
    vpn_gateway_v6: str | None = None  # the ifconfig-ipv6 remote


@dataclass
class RoutePlan:
    changes: list[RouteChange] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # things not done, for a warning each

    def add(self, route: HostRoute) -> None:
        self.changes.append(RouteChange("add", route))


def inputs_for(
    opts: Options,
    pushed: PushedOptions | None,
    tun: str,
    *,
    remote_host: str | None,
    net_gateway: NetGateway | None,
    net_gateway_v6: NetGateway | None = None,
) -> RoutingInputs:
    """Gather what the plan needs from the local options and the server's push (which adds to them)."""
    flags = redirect_from(opts.redirects)
    routes = [RouteSpec(r.network, r.netmask, r.gateway, r.metric) for r in opts.routes]
    routes6 = [RouteSpec(r.network, None, r.gateway, r.metric) for r in opts.routes_ipv6]
    route_gateway = opts.route_gateway
    metric = opts.route_metric
    topology: str = opts.topology
    ifconfig = opts.ifconfig
    has_v6 = opts.ifconfig_ipv6 is not None
    if pushed is not None:
        flags = redirect_from(pushed.redirects, flags)
        routes += [RouteSpec(n, m, g, mt) for n, m, g, mt in pushed.routes]
        routes6 += [RouteSpec(n, None, g, mt) for n, g, mt in pushed.routes_ipv6]
        route_gateway = route_gateway or pushed.route_gateway
        metric = metric if metric is not None else pushed.route_metric
        topology = pushed.topology
        ifconfig = pushed.ifconfig or ifconfig
        has_v6 = pushed.ifconfig_ipv6 is not None
    # as the device's addresses: the pushed IPv6 address replaces a configured one
    v6_address = pushed.ifconfig_ipv6 if pushed is not None else opts.ifconfig_ipv6
    tun_net6 = str(ipaddress.IPv6Interface(v6_address[0]).network) if v6_address else None
    tun_net4 = None
    if ifconfig is not None:
        if topology == "subnet":
            tun_net4 = str(ipaddress.IPv4Network(f"{ifconfig[0]}/{ifconfig[1]}", strict=False))
        else:
            tun_net4 = f"{ifconfig[1]}/32"
    vpn_gateway = route_gateway
    if vpn_gateway is None and ifconfig is not None and topology != "subnet":
        vpn_gateway = ifconfig[1]  # the peer's address is the gateway on a point-to-point link
    return RoutingInputs(
        tun=tun,
        redirect=flags,
        routes=routes,
        routes_ipv6=routes6,
        vpn_gateway=vpn_gateway,
        has_ipv6=has_v6,
        remote_host=remote_host,
        net_gateway=net_gateway,
        net_gateway_v6=net_gateway_v6,
        default_metric=metric,
        tun_network_v6=tun_net6,
        tun_network_v4=tun_net4,
        vpn_gateway_v6=v6_address[1] if v6_address else None,
    )


def _version(address: str | None) -> int | None:
    if address is None:
        return None
    try:
        return ipaddress.ip_address(address).version
    except ValueError:
        return None


def _is_local(address: str, gw: NetGateway) -> bool:
    """OpenVPN's test_local_addr on Linux: the address lies in a subnet of the gateway's device."""
    ip = ipaddress.ip_address(address)
    return any(ip in ipaddress.ip_network(n, strict=False) for n in gw.networks)


def _via_net_gateway(network: str, prefixlen: int, gw: NetGateway, metric: int | None = None) -> HostRoute:
    return HostRoute(network, prefixlen, gw.ifname, gw.address, metric)


def plan_routes(inp: RoutingInputs) -> RoutePlan:
    """Every route change OpenVPN 2.6 makes on Linux for these inputs, in its order."""
    plan = RoutePlan()
    _plan_redirect(inp, plan)
    for spec in inp.routes:
        _plan_route_v4(inp, spec, plan)
    _plan_v6(inp, plan)
    return plan


def _plan_redirect(inp: RoutingInputs, plan: RoutePlan) -> None:
    rg = inp.redirect
    if not rg.enabled:
        return  # none given, or `!ipv4`: IPv6 redirection is planned with the IPv6 routes
    gw = inp.net_gateway
    remote_v4 = inp.remote_host if _version(inp.remote_host) == 4 else None
    if inp.vpn_gateway is None and rg.reroute_v4:
        plan.notes.append(
            "unable to redirect the IPv4 default gateway: the VPN gateway is unknown; the server "
            "must push `route-gateway` (or `ifconfig` in net30/p2p), or set `route-gateway` locally"
        )
        return
    if gw is None and not rg.local and remote_v4 is not None:
        plan.notes.append(
            "unable to redirect the IPv4 default gateway: cannot read the current default gateway "
            "(no route to the server); add a default route, or use `redirect-gateway local` if the "
            "server is on a directly connected network"
        )
        return
    local = rg.local
    if rg.autolocal and gw is not None and remote_v4 is not None:
        local = _is_local(remote_v4, gw)
    # OpenVPN's block_local_needed(): the server itself must not be on the blocked subnet
    block_local = (
        rg.block_local
        and gw is not None
        and inp.vpn_gateway is not None
        and not (remote_v4 is not None and _is_local(remote_v4, gw))
    )
    if not local and remote_v4 is not None and gw is not None:
        plan.add(_via_net_gateway(remote_v4, 32, gw))
    if block_local and gw is not None and gw.address is not None:
        plan.add(HostRoute(gw.address, 32, gw.ifname))  # the gateway itself stays reachable
    for flag, what in ((rg.bypass_dhcp, "bypass-dhcp"), (rg.bypass_dns, "bypass-dns")):
        if flag:
            plan.notes.append(
                f"redirect-gateway {what}: OpenVPN adds this bypass route on Windows only; on Linux "
                "no route is added. If the server must stay reachable outside the tunnel, add "
                "`route ADDRESS 255.255.255.255 net_gateway` for it"
            )
    if rg.reroute_v4:
        if rg.def1:
            plan.add(HostRoute("0.0.0.0", 1, inp.tun))
            plan.add(HostRoute("128.0.0.0", 1, inp.tun))
        else:
            if gw is not None and gw.address is not None:
                plan.changes.append(
                    RouteChange("del", HostRoute("0.0.0.0", 0, gw.ifname, gw.address, gw.metric))
                )
            plan.add(HostRoute("0.0.0.0", 0, inp.tun))
    if block_local and gw is not None:
        _plan_block_local(inp, gw, plan)


def _plan_block_local(inp: RoutingInputs, gw: NetGateway, plan: RoutePlan) -> None:
    """`block-local`: each subnet of the gateway's device, as two halves into the tunnel."""
    for net_text in gw.networks:
        net = ipaddress.ip_network(net_text, strict=False)
        if net.version != 4 or net.prefixlen >= 32:
            continue
        for half in net.subnets(prefixlen_diff=1):
            plan.add(HostRoute(str(half.network_address), half.prefixlen, inp.tun))


def _plan_route_v4(inp: RoutingInputs, spec: RouteSpec, plan: RoutePlan) -> None:
    metric = spec.metric if spec.metric is not None else inp.default_metric
    gw = inp.net_gateway
    network = spec.network
    if network == "remote_host":
        if _version(inp.remote_host) != 4:
            plan.notes.append(f"route {network}: the server's IPv4 address is not known; route not added")
            return
        network = str(inp.remote_host)
    elif network in ("vpn_gateway", "net_gateway"):
        address = inp.vpn_gateway if network == "vpn_gateway" else (gw.address if gw else None)
        if address is None:
            plan.notes.append(f"route {network}: its address is not known; route not added")
            return
        network = address
    net = ipaddress.IPv4Network(f"{network}/{spec.netmask or '255.255.255.255'}", strict=False)
    if spec.gateway == "net_gateway" or (
        gw is not None and gw.address is not None and spec.gateway == gw.address
    ):
        if gw is None:
            plan.notes.append(
                f"route {net} net_gateway: the host has no route to the server to take the gateway "
                "from; route not added"
            )
            return
        plan.add(_via_net_gateway(str(net.network_address), net.prefixlen, gw, metric))
        return
    gateway = inp.remote_host if spec.gateway == "remote_host" else spec.gateway
    if gateway is not None and not _in_tunnel(gateway, inp.vpn_gateway, inp.tun_network_v4):
        # a next hop outside the tunnel: the kernel finds its device, as for OpenVPN
        plan.add(HostRoute(str(net.network_address), net.prefixlen, "", gateway, metric))
        return
    plan.add(HostRoute(str(net.network_address), net.prefixlen, inp.tun, None, metric))


def _in_tunnel(gateway: str, vpn_gateway: str | None, tun_network: str | None) -> bool:
    if gateway == vpn_gateway:
        return True
    try:
        return tun_network is not None and ipaddress.ip_address(gateway) in ipaddress.ip_network(tun_network)
    except ValueError:
        return False


def _plan_v6(inp: RoutingInputs, plan: RoutePlan) -> None:
    specs = list(inp.routes_ipv6)
    if inp.redirect.reroute_v6 and inp.has_ipv6:
        specs += [RouteSpec(n, None, None, None) for n in V6_REDIRECT_NETS]
    elif inp.redirect.reroute_v6:
        plan.notes.append(
            "redirect-gateway ipv6: the tunnel has no IPv6 address (no `ifconfig-ipv6` configured or "
            "pushed), so IPv6 traffic is not redirected, as in OpenVPN"
        )
    remote6 = ipaddress.IPv6Address(inp.remote_host) if _version(inp.remote_host) == 6 else None
    routes: list[HostRoute] = []
    own = ipaddress.IPv6Network(inp.tun_network_v6) if inp.tun_network_v6 else None
    for spec in specs:
        net = ipaddress.IPv6Network(spec.network, strict=False)
        if net == own and spec.gateway is None:
            continue  # the device's address already routes its own network
        metric = spec.metric if spec.metric is not None else inp.default_metric
        if spec.gateway == "net_gateway":
            plan.notes.append(
                f"route-ipv6 {net} net_gateway: OpenVPN 2.6 cannot parse net_gateway for IPv6 and routes "
                f"{net} into the tunnel, and so does pyovpn; to keep it outside, give the IPv6 gateway's "
                "address instead of net_gateway"
            )
        elif spec.gateway is not None and not _in_tunnel(
            spec.gateway, inp.vpn_gateway_v6, inp.tun_network_v6
        ):
            routes.append(HostRoute(str(net.network_address), net.prefixlen, "", spec.gateway, metric))
            continue
        routes.append(HostRoute(str(net.network_address), net.prefixlen, inp.tun, None, metric))
    covers_server = remote6 is not None and any(
        r.ifname == inp.tun and remote6 in ipaddress.IPv6Network(f"{r.network}/{r.prefixlen}") for r in routes
    )
    if covers_server:
        server_gw6 = inp.net_gateway_v6
        if server_gw6 is None:
            plan.notes.append(
                "an IPv6 route covers the server's address but the IPv6 gateway is unknown; "
                "expect the connection to the server to break"
            )
        else:
            plan.add(
                HostRoute(str(remote6), 128, server_gw6.ifname, server_gw6.address, REMOTE_V6_HOST_METRIC)
            )
    for r in routes:
        plan.add(r)
