"""A client's configuration on the server: its client-config-dir file, its addresses
(fixed there or from the pool), its iroutes and the push list it gets.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from pyovpn.config import CcdOptions, Options, parse_ccd
from pyovpn.errors import PyovpnError
from pyovpn.server.pool import AddressPool


def read_ccd(opts: Options, cn: str, extra: tuple[str, ...] = ()) -> CcdOptions | None:
    """The client-config-dir file for ``cn``, or None; a missing one refuses the client with ccd-exclusive.

    ``extra`` lines (a management `client-auth` block) are read as if they followed the file.
    """
    text = _ccd_file(opts, cn)
    if extra:
        text = (text or "") + "".join(f"{line}\n" for line in extra)
        return parse_ccd(text, source="management client-auth")
    return parse_ccd(text, source=str(Path(opts.client_config_dir or "") / cn)) if text is not None else None


def _ccd_file(opts: Options, cn: str) -> str | None:
    ccd_dir = opts.client_config_dir
    if not ccd_dir or not cn or "/" in cn or cn.startswith("."):
        return None
    path = Path(ccd_dir) / cn
    if not path.is_file():
        if opts.ccd_exclusive:
            raise PyovpnError(f"no client-config-dir file for '{cn}' (ccd-exclusive)")
        return None
    return path.read_text()


@dataclass
class Placement:
    """Where a client sits in the VPN, and what it is told."""

    vpn_ip: str
    netmask: str
    vpn_ip6: str | None = None  # "ADDRESS/BITS"
    pool_ip: str | None = None  # the pool's address, to give back when the client leaves
    iroutes: list[tuple[str, int]] = field(default_factory=list)  # (network, prefix length)
    iroutes6: list[tuple[str, int]] = field(default_factory=list)
    push: list[str] = field(default_factory=list)


def place_client(
    opts: Options,
    ccd: CcdOptions | None,
    pool: AddressPool | None,
    cn: str,
    server_ip: str,
    server_ip6: str | None,
) -> Placement:
    """The client's addresses, iroutes and push list, like OpenVPN's multi_select_virtual_addr + push."""
    c = ccd if ccd is not None else CcdOptions()
    push = [] if c.push_reset else list(opts.push)
    for prefix in c.push_remove:
        push = [opt for opt in push if not opt.startswith(prefix)]
    fixed, fixed6 = c.ifconfig_push, c.ifconfig_ipv6_push
    pool_ip = vpn_ip = vpn_ip6 = None
    mask = ""
    if pool is not None and (not fixed or (pool.has_ipv6 and not fixed6)):
        # like OpenVPN, a static IPv4 from the ccd still takes its IPv6 from the pool
        pool_ip, vpn_ip6 = pool.acquire(cn, exclusive_cn=not opts.duplicate_cn)
        vpn_ip, mask = pool_ip, pool.netmask
        if pool.net30:  # the client's point-to-point peer: the address before its own in its /30
            mask = str(ipaddress.IPv4Address(pool_ip) - 1)
    if fixed:
        vpn_ip, mask = fixed
    if vpn_ip is None:
        raise PyovpnError("no ifconfig-pool and no ifconfig-push for this client")
    if fixed6:
        vpn_ip6 = fixed6[0]
    base = []
    named = {opt.split()[0] for opt in push if opt.split()}
    net30 = opts.topology == "net30"
    if "topology" not in named:
        base.append(f"topology {'net30' if net30 else 'subnet'}")
    if server_ip and "route-gateway" not in named and not net30:
        # (net30 clients route through their point-to-point peer)
        base.append(f"route-gateway {server_ip}")
    base.append(f"ifconfig {vpn_ip} {mask}")
    if vpn_ip6 and server_ip6:
        base.append(f"ifconfig-ipv6 {vpn_ip6} {server_ip6}")
    push += c.push
    iroutes = [(net, ipaddress.IPv4Network(f"0.0.0.0/{m}").prefixlen) for net, m in c.iroutes]
    iroutes6 = [
        (str(n6.network_address), n6.prefixlen)
        for n6 in (ipaddress.IPv6Network(net6, strict=False) for net6 in c.iroutes_ipv6)
    ]
    return Placement(vpn_ip, mask, vpn_ip6, pool_ip, iroutes, iroutes6, base + push)
