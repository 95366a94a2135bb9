"""user/group: after setup pyovpn runs unprivileged with only CAP_NET_ADMIN, and rekeys keep working."""

from __future__ import annotations

import pwd
from pathlib import Path

import pytest

from pyovpn.privdrop import CAP_NET_ADMIN, effective_capabilities
from pyovpn.tools.pki import Pki
from tests.netns.harness import (
    INIT_LINE,
    Netns,
    TunnelSpec,
    client_config,
    ping,
    server_config,
    vpn_argv,
    wait_for_lines,
    wait_listening,
)

pytestmark = pytest.mark.netns


def test_user_nobody_keeps_only_cap_net_admin_and_rekeys(
    net: Netns, pki: Pki, dco: str = "userspace"
) -> None:
    spec = TunnelSpec(
        role="p2p",
        cipher="AES-256-GCM",
        wrap="tls-crypt",
        proto="udp",
        family=4,
        reneg_sec=5,
        dco=dco,
        openvpn_dco=dco == "kernel",
    )
    scfg = net.workdir / "s.conf"
    ccfg = net.workdir / "c.conf"
    scfg.write_text(server_config(spec, pki, impl="openvpn", local=net.outer("b", 4)))
    ccfg.write_text(
        client_config(spec, pki, impl="pyovpn", remote=net.outer("b", 4)) + "user nobody\ngroup nogroup\n"
    )
    # the unprivileged process must still be able to read nothing else: certs are loaded before the drop
    server = net.spawn("b", vpn_argv("openvpn", scfg), "server-openvpn")
    wait_listening(net.b, "udp", spec.port, proc=server)
    client = net.spawn("a", vpn_argv("pyovpn", ccfg), "client-pyovpn")
    wait_for_lines([server, client], INIT_LINE, 30)
    client.wait_for_line("privileges dropped", 10)
    status = Path(f"/proc/{client.pid}/status").read_text()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert all(int(u) == pwd.getpwnam("nobody").pw_uid for u in uid_line.split()[1:])
    assert effective_capabilities(client.pid) == 1 << CAP_NET_ADMIN
    perm = next(line for line in status.splitlines() if line.startswith("CapPrm:"))
    assert int(perm.split()[1], 16) == 1 << CAP_NET_ADMIN
    for n in range(1, 3):
        client.wait_for_line(f"data channel now sends with key_id={n}", 30)
    assert ping(net.a, "10.77.0.1").ok
    assert client.stop() == 0
