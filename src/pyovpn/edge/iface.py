"""The tunnel device's configuration: its addresses and routes (from the config or a push),
what the up/down scripts are told about it, and removing a stale device left by a killed run.

Every change goes through a :class:`pyovpn.edge.host.HostNetwork`, so tests can record it.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Protocol, runtime_checkable

from pyovpn.config import Options
from pyovpn.datachannel.api import DataChannel
from pyovpn.edge.host import HostNetwork
from pyovpn.proto.push import PushedOptions
from pyovpn.script_env import net_gateway, session_env
from pyovpn.scripts import TunParams

log = logging.getLogger("pyovpn")

# OpenVPN DCO installs iroutes with this metric, so they coexist with a `route` for the same network
IROUTE_METRIC = 100
# above IROUTE_METRIC, so a connected client's iroute for the same network wins over the server's route
SERVER_ROUTE_METRIC = 200


def _ipv6_of(opts: Options, pushed: PushedOptions | None) -> tuple[str, str | None] | None:
    """The device's IPv6 (address/bits, remote): pushed by the server, else configured, never both."""
    if pushed is None:
        return opts.ifconfig_ipv6
    return pushed.ifconfig_ipv6 or None


def tun_params(ifname: str, mtu: int, opts: Options, pushed: PushedOptions | None) -> TunParams:
    """The device as the up/down scripts see it: the same choices as configure_addresses()."""
    v6 = _ipv6_of(opts, pushed)
    topology = (pushed.topology if pushed else opts.topology) or "net30"
    ifconfig = pushed.ifconfig if pushed and pushed.ifconfig else opts.ifconfig
    remote = opts.remotes[0].host if opts.remotes else None
    gw = net_gateway(remote)
    env = session_env(opts, pushed, topology, ifconfig, net_gateway=gw, ipv6_remote=v6[1] if v6 else None)
    return TunParams(
        dev=ifname,
        tun_mtu=mtu,
        topology=topology,
        ifconfig=ifconfig,
        ifconfig_ipv6=v6[0] if v6 else None,
        ifconfig_ipv6_remote=v6[1] if v6 else None,
        session_env=tuple(env.items()),
        dev_type=opts.dev_type,
    )


def server_tun_params(ifname: str, opts: Options) -> TunParams:
    """The P2MP server's device for its up/down scripts (its own addresses, no push)."""
    return tun_params(ifname, opts.tun_mtu, opts, None)


def configure_addresses(net: HostNetwork, ifname: str, opts: Options, pushed: PushedOptions | None) -> None:
    """Put the tunnel's addresses on the interface (from config or from the push); its routes are
    :mod:`pyovpn.edge.clientroutes`'s. With `ifconfig-noexec` the addresses are left to a script."""
    topology = pushed.topology if pushed else opts.topology
    ifconfig = pushed.ifconfig if pushed and pushed.ifconfig else opts.ifconfig
    v6 = _ipv6_of(opts, pushed)
    if opts.ifconfig_noexec:
        log.info("ifconfig-noexec: pyovpn does not put the addresses %s %s on %s", ifconfig, v6, ifname)
        return
    if ifconfig:
        local, other = ifconfig
        if topology == "subnet":
            net.add_address(ifname, local, ipaddress.IPv4Network(f"0.0.0.0/{other}").prefixlen)
        else:
            net.add_address(ifname, local, 32, peer=other)
    if v6:
        iface6 = ipaddress.IPv6Interface(v6[0])
        net.add_address(ifname, str(iface6.ip), iface6.network.prefixlen)


def configure_server(net: HostNetwork, ifname: str, opts: Options) -> None:
    """The P2MP server's device: its addresses, its `route`s, client-to-client forwarding.

    With `topology net30` the device is point-to-point (.1 with peer .2) and the whole `server`
    network is routed through it, as OpenVPN's helper does.
    """
    if opts.ifconfig and opts.topology == "net30":
        net.add_address(ifname, opts.ifconfig[0], 32, peer=opts.ifconfig[1])
        if opts.server_network is not None:
            n = ipaddress.IPv4Network("/".join(opts.server_network))
            net.add_route(ifname, str(n.network_address), n.prefixlen, metric=SERVER_ROUTE_METRIC)
    elif opts.ifconfig:
        prefix = ipaddress.IPv4Network(f"0.0.0.0/{opts.ifconfig[1]}").prefixlen
        net.add_address(ifname, opts.ifconfig[0], prefix)
    if opts.ifconfig_ipv6:
        iface6 = ipaddress.IPv6Interface(opts.ifconfig_ipv6[0])
        net.add_address(ifname, str(iface6.ip), iface6.network.prefixlen)
    for r in opts.routes:
        n = ipaddress.IPv4Network(f"{r.network}/{r.netmask}", strict=False)
        metric = r.metric if r.metric is not None else SERVER_ROUTE_METRIC
        net.add_route(ifname, str(n.network_address), n.prefixlen, gateway=r.gateway, metric=metric)
    if opts.client_to_client:
        net.enable_forwarding(ifname)


@runtime_checkable
class CleansStaleLinks(Protocol):
    """A backend whose devices can outlive the process (the kernel's): it removes an idle one itself."""

    async def clean_stale_link(self, name: str) -> bool:
        """Remove the idle device ``name`` left by an earlier run; True if there was one."""
        ...


async def clean_stale_link(dc: DataChannel, name: str) -> None:
    """Remove an idle `ovpn` link of this name left by a killed earlier run (kernel backend only)."""
    if not isinstance(dc, CleansStaleLinks):
        return
    if await dc.clean_stale_link(name):
        log.info("removed stale ovpn interface %s left by an earlier run", name)
