"""Differential: the `up`/`route-up`/`down` script environment of pyovpn and of stock OpenVPN 2.6.

Same server, same script, same config but for pyovpn's `pyovpn-dns off`.

Both clients connect in turn to one stock OpenVPN server that pushes routes and dhcp-options;
their `up`, `route-up` and `down` script dumps its environment. The variable names must match
except for a short, documented list (NOT_YET_PREFIXES); deterministic values (pushed options,
addresses, routes) must be equal.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pyovpn.tools.pki import Pki
from tests.netns import harness as h

pytestmark = pytest.mark.netns

DUMP = """#!/bin/sh
env > "$1.$script_type.tmp" && mv "$1.$script_type.tmp" "$1.$script_type"
"""

# Nothing is left out any more; kept so a future gap is named here, not hidden in the assertion.
NOT_YET_PREFIXES: tuple[str, ...] = ()
# Set by the shell or the environment the processes were started with, not by either VPN.
SHELL = {"PWD", "SHLVL", "_", "OLDPWD"}

DETERMINISTIC = (
    "foreign_option_1",
    "foreign_option_2",
    "foreign_option_3",
    "route_vpn_gateway",
    "route_network_1",
    "route_netmask_1",
    "route_gateway_1",
    "ifconfig_local",
    "ifconfig_netmask",
    "dev",
    "tun_mtu",
    "script_type",
    "remote_1",
    "remote_port_1",
    "proto_1",
    "verb",
    "daemon",
    "ifconfig_ipv6_local",
    "ifconfig_ipv6_netbits",
    "route_ipv6_network_1",
    "route_ipv6_gateway_1",
    "route_net_gateway",
    "daemon_log_redirect",
    "script_context",
    "trusted_ip",
    "trusted_port",
    "untrusted_ip",
    "untrusted_port",
    "common_name",
    "redirect_gateway",
    "X509_0_CN",
    "X509_1_CN",
    "tls_id_0",
    "tls_id_1",
    "tls_digest_0",
    "tls_digest_sha256_1",
    "tls_serial_0",
    "tls_serial_hex_1",
)


def _dump(path: Path, timeout: float = 20.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name}: the up script never ran"
        time.sleep(0.1)
    out = {}
    for line in path.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and name.replace("_", "a").isalnum():
            out[name] = value
    return out


def test_up_env_names_match_stock_openvpn(net: h.Netns, pki: Pki) -> None:
    work = net.workdir
    script = h.write_script(work / "dump.sh", DUMP)
    spec = h.TunnelSpec(role="server", wrap="tls-crypt", verb=3)
    server_cfg = work / "server.conf"
    server_cfg.write_text(
        h.server_config(spec, pki, impl="openvpn", local=net.outer("b", 4))
        + 'push "route 10.99.0.0 255.255.0.0"\npush "route-ipv6 fd00:99::/48"\n'
        + 'push "dhcp-option DNS 10.77.0.1"\npush "dhcp-option DOMAIN example.test"\n'
        + 'push "dhcp-option DOMAIN-SEARCH other.test"\n'
        + 'push "dns server 0 address 10.77.0.1"\npush "dns search-domains dns.test"\n'
    )
    server = net.start_server("openvpn", server_cfg, port=spec.port, name="server", timeout=20)

    dumps: dict[tuple[h.Impl, str], dict[str, str]] = {}
    for impl in ("openvpn", "pyovpn"):
        cfg = work / f"{impl}-client.conf"
        extra = "pyovpn-dns off\n" if impl == "pyovpn" else ""
        out = work / f"{impl}.env"
        cfg.write_text(
            h.client_config(spec, pki, impl=impl, remote=net.outer("b", 4))
            + f'script-security 2\nup "{script} {out}"\ndown "{script} {out}"\nroute-up "{script} {out}"\n'
            + extra
        )
        client = net.spawn("a", h.vpn_argv(impl, cfg), f"{impl}-client")
        h.wait_for_lines([server, client], h.INIT_LINE, 40)
        dumps[impl, "up"] = _dump(out.with_name(out.name + ".up"))
        dumps[impl, "route-up"] = _dump(out.with_name(out.name + ".route-up"))
        client.stop(timeout=15)
        dumps[impl, "down"] = _dump(out.with_name(out.name + ".down"))
        time.sleep(1)  # let the server notice the exit before the next client takes the same address

    inherited = set(os.environ) | SHELL
    for kind in ("up", "route-up", "down"):
        stock = {n for n in dumps["openvpn", kind] if n not in inherited}
        ours = {n for n in dumps["pyovpn", kind] if n not in inherited}
        missing = {n for n in stock - ours if not n.startswith(NOT_YET_PREFIXES)}
        extra_names = ours - stock
        print(f"{kind}: stock-only names: {sorted(stock - ours)}; pyovpn-only names: {sorted(extra_names)}")
        assert not missing, f"stock OpenVPN sets these for `{kind}`, pyovpn does not: {sorted(missing)}"
        assert not extra_names, (
            f"pyovpn sets names stock OpenVPN does not for `{kind}`: {sorted(extra_names)}"
        )
        for name in (*DETERMINISTIC, *(n for n in stock if n.startswith("dns_"))):
            assert dumps["pyovpn", kind].get(name) == dumps["openvpn", kind].get(name), (kind, name)
    assert dumps["pyovpn", "down"]["signal"] == dumps["openvpn", "down"]["signal"] == "exit-with-notification"
