"""The session part of OpenVPN's script environment: options, routes and pushed `dhcp-option`s.

`scripts.up_down_env` covers the device (dev, tun_mtu, ifconfig_*); this adds what OpenVPN 2.6
also exports to up/down/route-up: `foreign_option_N` (each pushed `dhcp-option` verbatim, N from
1), `route_vpn_gateway`, `route_net_gateway`, `route_network_N`/`route_netmask_N`/
`route_gateway_N`/`route_metric_N`, `route_ipv6_network_N`/`route_ipv6_gateway_N`,
`dns_search_domain_N`/`dns_server_N_address_M` (the `dns` option), and `config`, `daemon`,
`daemon_log_redirect`, `daemon_pid`, `daemon_start_time`, `verb`, `remote_N`/`remote_port_N`/`proto_N`.
DNS scripts (update-resolv-conf, update-systemd-resolved) read exactly these.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import subprocess
import time

from pyovpn.config import Options
from pyovpn.errors import ProtocolError
from pyovpn.proto.dnsopts import parse_dns_lines
from pyovpn.proto.push import PushedOptions
from pyovpn.proto.redirect import BadRedirectFlag, RedirectFlags, redirect_from

_PROC_ROUTE = "/proc/net/route"
_STARTED = int(time.time())  # OpenVPN's daemon_start_time: when this process started (imported early)


def default_gateway(proc_route: str = _PROC_ROUTE) -> str | None:
    """The IPv4 default gateway of this network namespace (OpenVPN's `net_gateway`), if any."""
    try:
        with open(proc_route, encoding="ascii") as f:
            rows = [line.split() for line in f.readlines()[1:]]
    except OSError:
        return None
    for row in rows:
        if len(row) > 7 and row[1] == "00000000" and row[7] == "00000000" and row[2] != "00000000":
            return socket.inet_ntoa(struct.pack("<I", int(row[2], 16)))
    return None


def peer_env(peer: tuple[str, int] | None, common_name: str) -> dict[str, str]:
    """`trusted_ip`/`trusted_port` (and the `untrusted_` pair) and the peer's `common_name`."""
    env: dict[str, str] = {}
    if peer is not None:
        host = peer[0].removeprefix("::ffff:")  # a v4-mapped socket address, as OpenVPN prints it
        for prefix in ("trusted", "untrusted"):
            env[f"{prefix}_ip" if ":" not in host else f"{prefix}_ip6"] = host
            env[f"{prefix}_port"] = str(peer[1])
    if common_name:
        env["common_name"] = common_name
    return env


def net_gateway(remote_host: str | None) -> str | None:
    """OpenVPN 2.6's `net_gateway`: the gateway of the route to the VPN server, "0.0.0.0" if on-link.

    Falls back to the default gateway when the remote is a name or the lookup fails.
    """
    try:
        addr = ipaddress.IPv4Address(remote_host or "")
    except ValueError:
        return default_gateway()
    try:
        res = subprocess.run(
            ["ip", "-4", "-o", "route", "get", str(addr)],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return default_gateway()
    words = res.stdout.split()
    if res.returncode != 0 or not words:
        return default_gateway()
    return words[words.index("via") + 1] if "via" in words else "0.0.0.0"


def vpn_gateway(topology: str, ifconfig: tuple[str, str] | None, pushed: PushedOptions | None) -> str | None:
    """OpenVPN's `vpn_gateway`: `route-gateway` if given, else the far end of a net30/p2p link."""
    if pushed is not None and pushed.route_gateway:
        return pushed.route_gateway
    if ifconfig and topology != "subnet":
        return ifconfig[1]
    return None


def session_env(
    opts: Options,
    pushed: PushedOptions | None,
    topology: str,
    ifconfig: tuple[str, str] | None,
    *,
    net_gateway: str | None = None,
    ipv6_remote: str | None = None,
) -> dict[str, str]:
    """Script variables beyond the device ones (see the module docstring)."""
    env: dict[str, str] = {
        "verb": str(opts.verb),
        "daemon": "1" if opts.daemon else "0",
        "daemon_log_redirect": "0",
        "daemon_pid": str(os.getpid()),
        "daemon_start_time": str(_STARTED),
    }
    if opts.config_sources:
        env["config"] = opts.config_sources[0]
    for n, remote in enumerate(opts.remotes, 1):
        env[f"remote_{n}"] = remote.host
        env[f"remote_port_{n}"] = str(opts.remote_port_for(remote))
        env[f"proto_{n}"] = remote.proto or opts.proto

    try:
        redirect = redirect_from([*opts.redirects, *(pushed.redirects if pushed is not None else [])])
    except BadRedirectFlag:
        redirect = RedirectFlags()  # the route code reports the bad flag
    # OpenVPN's value: 0 without a gateway redirect, 2 with def1, 1 otherwise
    env["redirect_gateway"] = "0" if not redirect.reroute_v4 else ("2" if redirect.def1 else "1")
    vpn_gw = vpn_gateway(topology, ifconfig, pushed)
    if vpn_gw:
        env["route_vpn_gateway"] = vpn_gw
    if net_gateway:
        env["route_net_gateway"] = net_gateway
    gateway_words = {None: vpn_gw, "vpn_gateway": vpn_gw, "net_gateway": net_gateway}
    routes: list[tuple[str, str, str | None, int | None]] = []
    for r in opts.routes:
        network = gateway_words.get(r.network, r.network)
        gateway = gateway_words.get(r.gateway, r.gateway)
        if network is not None and network != "remote_host":
            routes.append((network, r.netmask, gateway, r.metric))
    if pushed is not None:
        for net, mask, gw, metric in pushed.routes:
            network = gateway_words.get(net, net)
            if network is not None and network != "remote_host":
                routes.append((network, mask, gateway_words.get(gw, gw), metric))
    for n, (network, netmask, gateway, metric) in enumerate(routes, 1):
        env[f"route_network_{n}"] = network
        env[f"route_netmask_{n}"] = netmask
        if gateway:
            env[f"route_gateway_{n}"] = gateway
        if metric is not None:
            env[f"route_metric_{n}"] = str(metric)
    routes6 = [(r.network, r.gateway, r.metric) for r in opts.routes_ipv6]
    if pushed is not None:
        routes6 += pushed.routes_ipv6
    for n, (network6, gateway6, metric6) in enumerate(routes6, 1):
        env[f"route_ipv6_network_{n}"] = str(ipaddress.IPv6Network(network6, strict=False))
        if gateway6 or ipv6_remote:
            env[f"route_ipv6_gateway_{n}"] = gateway6 or ipv6_remote or ""
        if metric6 is not None:
            env[f"route_ipv6_metric_{n}"] = str(metric6)

    pushed_dns = pushed.dns_lines if pushed is not None else []
    try:
        dns = parse_dns_lines([*opts.dns_lines, *pushed_dns])
    except ProtocolError:
        dns = None  # the daemon logs why these DNS settings were not applied
    foreign = [line for line in pushed_dns if line.startswith("dhcp-option ")]
    if dns is not None and pushed_dns and (dns.dns_servers or dns.dns_search):
        foreign = dns.foreign_options()
    for n, line in enumerate(foreign, 1):
        env[f"foreign_option_{n}"] = line
    if dns is not None:
        for n, domain in enumerate(dns.dns_search, 1):
            env[f"dns_search_domain_{n}"] = domain
        # numbered by position in priority order, not by the priority itself (as stock 2.6 does)
        for n, (_prio, server) in enumerate(sorted(dns.dns_servers.items()), 1):
            for m, addr in enumerate(server.addresses, 1):
                env[f"dns_server_{n}_address_{m}"] = addr
    return env
